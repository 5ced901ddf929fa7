"""Typed readers for settings that come from environment variables.

Both the operator and the worker are configured through the environment (the chart sets
the operator's, the operator's Job sets the worker's). Every reader names the variable
in its error, so a bad value says which one it was.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from typing import TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_T = TypeVar("_T")


def read_env(env: Mapping[str, str], name: str, parse: Callable[[str], _T], default: _T) -> _T:
    """``parse(env[name])``, or ``default`` when unset or blank; errors name the variable."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r} is not valid: {error}") from error


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or math.isinf(value):  # `not >` also refuses NaN
        raise ValueError("must be a finite number greater than zero")
    return value


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or math.isinf(value):
        raise ValueError("must be a finite number, zero or more")
    return value


def boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Parse a comma- or space-separated list of CIDRs; raise ``ValueError`` naming a bad one."""
    networks: list[IPNetwork] = []
    for item in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as error:
            raise ValueError(f"{item!r} is not a CIDR: {error}") from error
    return tuple(networks)
