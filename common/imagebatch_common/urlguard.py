"""Which URLs ImageBatch may fetch, and the one address each fetch may connect to.

Image URLs come from a user's CSV, a CSV URL and a webhook URL from a spec, so every
fetch is attack surface (server-side request forgery). Before any connection this
module parses the URL, resolves its host the way the operating system would
(``getaddrinfo``, which also reads ``http://2130706433/`` and ``http://0177.0.0.1/`` as
127.0.0.1) and refuses the URL if
*any* resolved address is loopback, link-local (169.254.169.254, the cloud metadata
service), private, multicast, reserved, unspecified (0.0.0.0, ::) or otherwise not
global, unless it lies in a network the settings allow. IPv6 forms that carry an IPv4
address (``::ffff:127.0.0.1``, 6to4, NAT64) are judged by that IPv4 address.

The result is a ``Target`` naming the checked address; the fetcher connects to that
address and nothing else, so a DNS answer that changes between the check and the
connection (DNS rebinding) cannot move the request. Every redirect goes through here
again.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from imagebatch_common.contract import Stage
from imagebatch_common.envread import IPNetwork
from imagebatch_common.failures import ImageFailure, Reason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# (host, port) -> the addresses it resolves to, best first (as getaddrinfo orders them).
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_PORTS = {"http": 80, "https": 443}

# Browsers read "\" as "/" and strip tabs and newlines; Python's and urllib3's parsers do
# not all agree, and a disagreement is how a checked host and a connected host differ.
# No legitimate image URL needs these characters raw, so such a URL is refused outright.
_AMBIGUOUS_URL_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")

_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")

_HEX_PART = re.compile(r"0[xX][0-9a-fA-F]*")
_OCTAL_PART = re.compile(r"0[0-7]*")
_DECIMAL_PART = re.compile(r"[1-9][0-9]*")


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve like the OS does for a TCP connection; addresses in preference order."""
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    ):
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` as ``inet_aton`` does: 1-4 parts, each decimal, octal (0..) or hex (0x..).

    ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and ``127.1`` all mean 127.0.0.1 to the C
    library. Parsing them here, instead of trusting the resolver to, means the check
    holds even on a system whose resolver reads them differently.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # a trailing dot: "127.0.0.1." is still that address to many resolvers
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if _HEX_PART.fullmatch(part):
            values.append(int(part[2:] or "0", 16))
        elif _OCTAL_PART.fullmatch(part):
            values.append(int(part, 8))
        elif _DECIMAL_PART.fullmatch(part):
            values.append(int(part))
        else:
            return None
    *leading, last = values
    # Leading parts are one byte each; the last part fills every byte left.
    if any(value > 255 for value in leading) or last >= 256 ** (4 - len(leading)):
        return None
    number = last
    for position, value in enumerate(leading):
        number |= value << (8 * (3 - position))
    return ipaddress.IPv4Address(number)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells directly, in any form the OS accepts, else ``None``."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return parse_legacy_ipv4(host)


def _non_global_category(address: IPAddress) -> str | None:
    """Name the kind of non-global address this is, or ``None`` for a public address."""
    # Order matters: 0.0.0.0 is also "private" to ipaddress, but "unspecified" is
    # what a reader needs to see.
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-global"  # e.g. 100.64.0.0/10, carrier-grade NAT
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and may be routed to (6to4, Teredo, ...)."""
    embedded: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.append(address.teredo[1])
    if int(address) >> 32 == 0 and int(address) > 1:
        # Deprecated IPv4-compatible form ::a.b.c.d.
        embedded.append(ipaddress.IPv4Address(int(address)))
    return embedded


def connect_address(address: IPAddress) -> IPAddress:
    """The address a socket really reaches: ``::ffff:a.b.c.d`` is a.b.c.d."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses the fetcher may connect to: global ones, plus ``allow_nets``.

    ``deny`` lists endpoints (address, port) that are refused whatever the networks
    allow: the object store's and the Kubernetes API server's own, so that allowing a
    cluster's private range for an internal image host never lets a URL reach them.
    """

    allow_nets: tuple[IPNetwork, ...] = ()
    deny: frozenset[tuple[str, int]] = frozenset()

    def allows(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allow_nets)

    def denied(self, address: IPAddress, port: int) -> bool:
        return (str(connect_address(address)), port) in self.deny

    def refusal(self, address: IPAddress) -> str | None:
        """``None`` when a connection to ``address`` is allowed, else the kind it is."""
        address = connect_address(address)
        if self.allows(address):
            return None
        if address in _NAT64_PREFIX:
            # A DNS64 network writes IPv4-only hosts as 64:ff9b::a.b.c.d, which Python
            # calls reserved; what the gateway reaches is a.b.c.d, so judge that.
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            inner_category = None if self.allows(inner) else _non_global_category(inner)
            return f"{inner_category} (IPv4 {inner} inside IPv6)" if inner_category else None
        category = _non_global_category(address)
        if category is not None:
            return category
        if isinstance(address, ipaddress.IPv6Address):
            for inner in _embedded_ipv4(address):
                inner_category = _non_global_category(inner)
                if inner_category is not None and not self.allows(inner):
                    return f"{inner_category} (IPv4 {inner} inside IPv6)"
        return None


@dataclass(frozen=True)
class Target:
    """A URL that passed the check, and the one address its connection must go to."""

    url: str
    scheme: str  # "http" or "https"
    host: str  # lower-case, IDNA-encoded, without brackets: the Host header and TLS name
    port: int
    address: str  # the checked IP address, in the form to connect to

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def _blocked(message: str) -> ImageFailure:
    return ImageFailure(Stage.FETCH, Reason.ADDRESS_BLOCKED, message)


def _invalid(message: str) -> ImageFailure:
    return ImageFailure(Stage.FETCH, Reason.URL_INVALID, message)


def _idna_host(host: str) -> str:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise _invalid(f"host name is not valid IDNA: {error}") from error


def resolve_target(url: str, policy: AddressPolicy, resolver: Resolver = system_resolver) -> Target:
    """Check ``url`` and pick the address to connect to; raise ``ImageFailure`` if refused.

    Every resolved address must be allowed, not just the first: a host that answers
    with one public and one private address is refused.
    """
    if _AMBIGUOUS_URL_CHARACTERS.search(url):
        raise _invalid("URL contains whitespace, control characters or a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise _invalid(f"URL cannot be parsed: {error}") from error
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _invalid(f"scheme {scheme or '(none)'!r} is not http or https")
    if not parts.hostname:
        raise _invalid("URL has no host")
    host = _idna_host(parts.hostname)
    port = port or DEFAULT_PORTS[scheme]

    literal = parse_ip_literal(host)
    if literal is not None:
        if policy.denied(literal, port):
            raise _blocked(f"{host}:{port} is a service of the cluster itself")
        refusal = policy.refusal(literal)
        if refusal is not None:
            raise _blocked(f"{host} is a {refusal} address")
        return Target(url, scheme, host, port, str(connect_address(literal)))

    try:
        resolved = resolver(host, port)
    except socket.gaierror as error:
        # EAI_AGAIN is the resolver saying "try later"; everything else is a fact.
        raise ImageFailure(
            Stage.FETCH,
            Reason.DNS_FAILED,
            f"{host} does not resolve: {error.strerror or error}",
            transient=error.errno == socket.EAI_AGAIN,
        ) from error
    except (OSError, UnicodeError) as error:
        raise ImageFailure(
            Stage.FETCH, Reason.DNS_FAILED, f"{host} does not resolve: {error}"
        ) from error
    addresses: list[IPAddress] = []
    for text in resolved:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError as error:
            raise ImageFailure(
                Stage.FETCH, Reason.DNS_FAILED, f"{host} resolved to a non-address {text!r}"
            ) from error
    if not addresses:
        raise ImageFailure(Stage.FETCH, Reason.DNS_FAILED, f"{host} resolves to no address")
    for address in addresses:
        if policy.denied(address, port):
            raise _blocked(f"{host}:{port} is a service of the cluster itself")
        refusal = policy.refusal(address)
        if refusal is not None:
            raise _blocked(f"{host} resolves to {address}, a {refusal} address")
    return Target(url, scheme, host, port, str(connect_address(addresses[0])))


def parse_endpoints(text: str, resolver: Resolver = system_resolver) -> frozenset[tuple[str, int]]:
    """``"host:port,host:port"`` as the (address, port) pairs they resolve to now.

    For the deny list: a name that does not resolve is skipped (nothing to refuse).
    """
    found: set[tuple[str, int]] = set()
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        host, _, raw_port = item.rpartition(":")
        host = host.strip("[]")
        if not host or not raw_port.isdigit():
            raise ValueError(f"{item!r} is not host:port")
        port = int(raw_port)
        literal = parse_ip_literal(host)
        if literal is not None:
            found.add((str(connect_address(literal)), port))
            continue
        try:
            for address in resolver(host, port):
                found.add((str(connect_address(ipaddress.ip_address(address))), port))
        except (OSError, UnicodeError, ValueError):
            continue
    return frozenset(found)
