"""URLs made safe to show: no userinfo, query string or fragment.

A presigned URL carries its signature in the query string and a webhook URL often a
token; ``http://user:pass@host`` carries a password. Anything that ends up in a log
line, a status field, an Event or an error message goes through ``redact_url``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` reduced to scheme, host, port and path: safe to log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (for messages built around library errors)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
