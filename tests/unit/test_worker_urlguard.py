"""The URL guard: which addresses the fetcher refuses, and that it refuses before connecting.

The table cases need no network: IP literals are parsed, host names go through an
injected resolver. The redirect and pinning cases use a real HTTP server on 127.0.0.1
with only 127.0.0.1/32 allowed, and a connect spy that records every TCP connection
the process opens and refuses any that is not to 127.0.0.1, so a guard bug could never
send a packet anywhere else.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from imagebatch_common.contract import Stage
from imagebatch_common.envread import parse_networks
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_common.fetch import Fetcher, FetchSettings
from imagebatch_common.urlguard import (
    AddressPolicy,
    parse_endpoints,
    parse_legacy_ipv4,
    resolve_target,
    system_resolver,
)
from imagebatch_worker.settings import WorkerSettings
from tests.bench.images import photo_jpeg
from tests.bench.local_http import LocalHTTPServer

pytestmark = pytest.mark.timeout(60)  # real sockets and processes: never hang

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700:4700::1111"

DNS: dict[str, list[str]] = {
    "images.example": [PUBLIC_V4],
    "v6.example": [PUBLIC_V6],
    "internal.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": [PUBLIC_V4, "192.168.1.10"],
    "loopback.example": ["127.0.0.1"],
    "mapped.example": ["::ffff:10.1.2.3"],
    "ula.example": ["fd12:3456::1"],
    "a.com": [PUBLIC_V4],
}


def fake_dns(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return DNS[host]


@dataclass(frozen=True)
class Refused:
    reason: Reason
    words: str = ""  # a phrase the message must contain


def allowed(address: str) -> str:
    return address


GUARD_CASES: dict[str, tuple[str, str, str | Refused]] = {
    # id: (url, allow-nets, expected address or refusal)
    "public-name": ("https://images.example/a.jpg", "", PUBLIC_V4),
    "public-ipv6-name": ("http://v6.example/a.jpg", "", PUBLIC_V6),
    "public-literal": (f"http://{PUBLIC_V4}:8080/a.jpg", "", PUBLIC_V4),
    "loopback": ("http://127.0.0.1/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "loopback-other": ("http://127.9.9.9/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "ipv6-loopback": ("http://[::1]:8080/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "private-10": ("http://10.1.2.3/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "private-172-16": ("http://172.16.0.1/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "private-172-31": ("http://172.31.255.254/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "private-192-168": ("http://192.168.0.1/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "cloud-metadata": (
        "http://169.254.169.254/latest/meta-data/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "link-local"),
    ),
    "ipv6-unique-local": ("http://[fd00::1]/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "ipv6-link-local": ("http://[fe80::1]/", "", Refused(Reason.ADDRESS_BLOCKED, "link-local")),
    "ipv4-mapped-loopback": (
        "http://[::ffff:127.0.0.1]/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "loopback"),
    ),
    "ipv4-mapped-hex-form": (
        "http://[::ffff:7f00:1]/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "loopback"),
    ),
    "ipv4-mapped-private": (
        "http://[::ffff:10.0.0.1]/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "private"),
    ),
    "6to4-carrying-loopback": (
        "http://[2002:7f00:1::1]/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "127.0.0.1 inside IPv6"),
    ),
    "nat64-carrying-private": (
        "http://[64:ff9b::a00:1]/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "10.0.0.1 inside IPv6"),
    ),
    "nat64-carrying-public": ("http://[64:ff9b::5db8:d822]/", "", "64:ff9b::5db8:d822"),
    "decimal-ip": ("http://2130706433/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "octal-ip": ("http://0177.0.0.1/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "octal-whole-number": (
        "http://017700000001/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "loopback"),
    ),
    "hex-ip": ("http://0x7f.0x0.0x0.0x1/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "short-ip": ("http://127.1/", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "decimal-private": ("http://167772161/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "trailing-dot-ip": ("http://127.0.0.1./", "", Refused(Reason.ADDRESS_BLOCKED, "loopback")),
    "unspecified-v4": ("http://0.0.0.0:8080/", "", Refused(Reason.ADDRESS_BLOCKED, "unspecified")),
    "unspecified-zero": ("http://0/", "", Refused(Reason.ADDRESS_BLOCKED, "unspecified")),
    "unspecified-v6": ("http://[::]/", "", Refused(Reason.ADDRESS_BLOCKED, "unspecified")),
    "multicast-v4": ("http://224.0.0.1/", "", Refused(Reason.ADDRESS_BLOCKED, "multicast")),
    "multicast-v6": ("http://[ff02::1]/", "", Refused(Reason.ADDRESS_BLOCKED, "multicast")),
    "reserved": ("http://240.0.0.1/", "", Refused(Reason.ADDRESS_BLOCKED)),
    "broadcast": ("http://255.255.255.255/", "", Refused(Reason.ADDRESS_BLOCKED)),
    "carrier-grade-nat": ("http://100.64.0.1/", "", Refused(Reason.ADDRESS_BLOCKED, "non-global")),
    "documentation-range": ("http://192.0.2.1/", "", Refused(Reason.ADDRESS_BLOCKED)),
    "name-to-private": (
        "http://internal.example/a.jpg",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "internal.example resolves to 10.0.0.5"),
    ),
    "name-to-metadata": (
        "http://metadata.example/",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "link-local"),
    ),
    "name-one-of-many-private": (
        "http://mixed.example/a.jpg",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "192.168.1.10"),
    ),
    "name-to-mapped-private": ("http://mapped.example/", "", Refused(Reason.ADDRESS_BLOCKED)),
    "name-to-ula": ("http://ula.example/", "", Refused(Reason.ADDRESS_BLOCKED, "private")),
    "userinfo-hides-real-host": (
        "http://a.com@127.0.0.1/a.jpg",
        "",
        Refused(Reason.ADDRESS_BLOCKED, "loopback"),
    ),
    "userinfo-with-port-looking-part": (
        "http://127.0.0.1:80@a.com/a.jpg",
        "",
        PUBLIC_V4,
    ),
    "backslash-parser-confusion": (
        "http://127.0.0.1\\@a.com/",
        "",
        Refused(Reason.URL_INVALID, "backslash"),
    ),
    "whitespace-in-url": ("http://a.com/ a.jpg", "", Refused(Reason.URL_INVALID)),
    "ftp-scheme": ("ftp://images.example/a.jpg", "", Refused(Reason.URL_INVALID, "'ftp'")),
    "file-scheme": ("file:///etc/passwd", "", Refused(Reason.URL_INVALID, "'file'")),
    "gopher-scheme": ("gopher://127.0.0.1:11211/", "", Refused(Reason.URL_INVALID)),
    "no-scheme": ("//images.example/a.jpg", "", Refused(Reason.URL_INVALID)),
    "no-host": ("http:///a.jpg", "", Refused(Reason.URL_INVALID, "no host")),
    "bad-port": ("http://images.example:99999/", "", Refused(Reason.URL_INVALID)),
    "unknown-name": ("http://nowhere.example/", "", Refused(Reason.DNS_FAILED, "nowhere")),
    "allowed-loopback": ("http://127.0.0.1:8080/a.jpg", "127.0.0.0/8", "127.0.0.1"),
    "allowed-mapped-loopback": ("http://[::ffff:127.0.0.1]/", "127.0.0.0/8", "127.0.0.1"),
    "allowed-name-to-loopback": ("http://loopback.example/", "127.0.0.1/32", "127.0.0.1"),
    "allow-list-is-exact": (
        "http://127.0.0.2/",
        "127.0.0.1/32",
        Refused(Reason.ADDRESS_BLOCKED, "loopback"),
    ),
    "allow-list-does-not-open-others": (
        "http://169.254.169.254/",
        "127.0.0.0/8, 10.0.0.0/8",
        Refused(Reason.ADDRESS_BLOCKED, "link-local"),
    ),
}


@pytest.mark.parametrize(
    ("url", "allow_nets", "expected"), GUARD_CASES.values(), ids=GUARD_CASES.keys()
)
def test_guard(url: str, allow_nets: str, expected: str | Refused) -> None:
    policy = AddressPolicy(parse_networks(allow_nets))

    if isinstance(expected, str):
        target = resolve_target(url, policy, fake_dns)
        assert target.address == expected
        assert target.url == url
    else:
        with pytest.raises(ImageFailure) as caught:
            resolve_target(url, policy, fake_dns)
        assert caught.value.stage == Stage.FETCH
        assert caught.value.reason == expected.reason
        assert expected.words in caught.value.message
        assert not caught.value.transient


def test_nothing_is_allowed_by_default() -> None:
    assert WorkerSettings().allow_nets == ()
    assert WorkerSettings.from_env({}).allow_nets == ()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.258", "10.0.1.2"),
        ("0", "0.0.0.0"),  # noqa: S104 - an address being parsed, not bound
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("08.0.0.1", None),  # 8 is not an octal digit: a name, not an address
        ("images.example", None),
        ("4294967296", None),
    ],
    ids=str,
)
def test_legacy_ipv4_forms(host: str, expected: str | None) -> None:
    parsed = parse_legacy_ipv4(host)

    assert (str(parsed) if parsed else None) == expected


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "127.1"])
def test_legacy_forms_agree_with_the_system_resolver(host: str) -> None:
    # getaddrinfo parses numeric hosts itself (no DNS query): the guard reads them alike.
    assert system_resolver(host, 80) == [str(parse_legacy_ipv4(host))]


def test_resolver_try_again_is_transient() -> None:
    def flaky_dns(host: str, port: int) -> Sequence[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(ImageFailure) as caught:
        resolve_target("http://images.example/", AddressPolicy(), flaky_dns)

    assert caught.value.reason == Reason.DNS_FAILED
    assert caught.value.transient


# -- redirects and pinning, against a real server on 127.0.0.1 ------------------


@dataclass
class ConnectSpy:
    """Every TCP connection the process attempts; only 127.0.0.1 is let through."""

    seen: list[str]


@pytest.fixture
def connect_spy(monkeypatch: pytest.MonkeyPatch) -> ConnectSpy:
    spy = ConnectSpy([])
    real_connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        spy.seen.append(host)
        if host != "127.0.0.1":
            raise ConnectionRefusedError(f"test refuses to connect to {host}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return spy


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer({"a.jpg": photo_jpeg(64, 48)}) as running:
        yield running


def loopback_only(**overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {
        "allow_nets": parse_networks("127.0.0.1/32"),
        "retries": 0,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "image_timeout": 10.0,
    }
    values.update(overrides)
    return WorkerSettings(**values).fetch_settings()


def redirect_to(server: LocalHTTPServer, location: str) -> str:
    return server.url(f"redirect?to={quote(location, safe='')}")


REDIRECT_TARGETS = {
    "private-10": ("http://10.0.0.1/a.jpg", "10.0.0.1 is a private"),
    "loopback-not-allowed": ("http://127.0.0.2:{port}/img/a.jpg", "127.0.0.2 is a loopback"),
    "metadata-service": ("http://169.254.169.254/latest/meta-data/", "link-local"),
    "decimal-private": ("http://167772161/", "private"),
    "userinfo-trick": ("http://127.0.0.1@10.0.0.1/", "10.0.0.1 is a private"),
    "name-to-private": ("http://internal.example/a.jpg", "resolves to 10.0.0.5"),
}


@pytest.mark.parametrize(
    ("location", "words"), REDIRECT_TARGETS.values(), ids=REDIRECT_TARGETS.keys()
)
def test_redirect_to_a_refused_address_is_stopped_before_connecting(
    server: LocalHTTPServer, connect_spy: ConnectSpy, location: str, words: str
) -> None:
    url = redirect_to(server, location.format(port=server.port))
    with (
        Fetcher(loopback_only(), resolver=fake_dns) as fetcher,
        pytest.raises(ImageFailure) as caught,
    ):
        fetcher.fetch(url)

    assert caught.value.reason == Reason.ADDRESS_BLOCKED
    assert words in caught.value.message
    assert connect_spy.seen == ["127.0.0.1"]  # the redirecting server, nothing else
    assert server.count("/redirect") == 1


def test_redirect_to_an_allowed_address_is_followed(
    server: LocalHTTPServer, connect_spy: ConnectSpy
) -> None:
    with Fetcher(loopback_only()) as fetcher:
        fetched = fetcher.fetch(redirect_to(server, server.image_url("a.jpg")))

    assert fetched.data == server.files["a.jpg"]
    assert fetched.redirects == 1
    assert set(connect_spy.seen) == {"127.0.0.1"}


def test_connection_goes_to_the_checked_address_not_a_new_lookup(
    server: LocalHTTPServer, connect_spy: ConnectSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: the first answer passes the check, later ones would point elsewhere.
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    lookups: list[str] = []

    def rebinding_dns(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    real_getaddrinfo = socket.getaddrinfo

    def no_second_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        assert host != "images.test", "the HTTP client resolved the host name itself"
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_second_lookup)
    with Fetcher(loopback_only(), resolver=rebinding_dns) as fetcher:
        fetched = fetcher.fetch(f"http://images.test:{server.port}/img/a.jpg")

    assert fetched.data == server.files["a.jpg"]
    assert lookups == ["images.test"]
    assert connect_spy.seen == ["127.0.0.1"]
    # The server still sees the URL's host name, as a virtual host needs.
    assert server.requests[-1].host == f"images.test:{server.port}"


def test_allow_list_entry_may_be_any_network() -> None:
    policy = AddressPolicy((ipaddress.ip_network("10.0.0.0/8"),))

    assert resolve_target("http://10.1.2.3/", policy, fake_dns).address == "10.1.2.3"
    with pytest.raises(ImageFailure):
        resolve_target("http://11.0.0.1.nip.example/", policy, fake_dns)


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        pytest.param("http://10.1.2.3:9000/x.jpg", True, id="the-store-itself"),
        pytest.param("http://10.1.2.3:443/x.jpg", True, id="the-api-server"),
        pytest.param("http://10.1.2.3:8080/x.jpg", False, id="another-port-of-that-host"),
        pytest.param("http://store.internal:9000/x.jpg", True, id="by-name"),
        pytest.param("http://[::ffff:10.1.2.3]:9000/x.jpg", True, id="ipv4-mapped"),
    ],
)
def test_the_clusters_own_endpoints_are_refused_even_inside_an_allowed_network(
    url: str, refused: bool
) -> None:
    def dns(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    policy = AddressPolicy(
        (ipaddress.ip_network("10.0.0.0/8"),),
        parse_endpoints("10.1.2.3:9000, store.internal:9000, 10.1.2.3:443", dns),
    )
    if refused:
        with pytest.raises(ImageFailure, match="a service of the cluster itself"):
            resolve_target(url, policy, dns)
    else:
        assert resolve_target(url, policy, dns).address == "10.1.2.3"
