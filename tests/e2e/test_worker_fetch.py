"""The fetcher against real misbehaving servers on 127.0.0.1.

Servers that drop connections, stall past the read timeout, trickle, stream 2 GB,
redirect forever, fail with 5xx or 429, and serve HTTPS for a host name whose address
the test's resolver pins to 127.0.0.1. Settings shrink every limit so each case ends
in a second or two; every case is also bounded by a pytest timeout.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imagebatch_common.envread import parse_networks
from imagebatch_common.failures import ImageFailure, Reason
from imagebatch_common.fetch import Fetcher, FetchSettings, request_target
from imagebatch_common.retry import retry_after_seconds
from imagebatch_worker.settings import WorkerSettings
from tests.bench.images import photo_jpeg
from tests.bench.local_http import LocalHTTPServer, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

IMAGE = photo_jpeg(320, 240, seed=11)


def settings(**overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {
        "allow_nets": parse_networks("127.0.0.1/32"),
        "connect_timeout": 1.0,
        "read_timeout": 0.5,
        "image_timeout": 5.0,
        "retries": 2,
        "retry_backoff": 0.05,
        "max_retry_after": 3.0,
        "max_redirects": 5,
        "max_image_bytes": 1024 * 1024,
    }
    values.update(overrides)
    return WorkerSettings(**values).fetch_settings()


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer({"a.jpg": IMAGE}, stall_seconds=10) as running:
        yield running


@dataclass(frozen=True)
class Expect:
    reason: Reason
    words: str
    requests: int  # how many requests the server saw on the path
    path: str


FAILURES = {
    "404-not-retried": ("status/404", Expect(Reason.HTTP_STATUS, "HTTP 404", 1, "/status/404")),
    "410-not-retried": ("status/410", Expect(Reason.HTTP_STATUS, "HTTP 410", 1, "/status/410")),
    "500-retried-then-given-up": (
        "status/500",
        Expect(Reason.HTTP_STATUS, "gave up after 3 attempts", 3, "/status/500"),
    ),
    "503-retried-then-given-up": (
        "status/503",
        Expect(Reason.HTTP_STATUS, "HTTP 503", 3, "/status/503"),
    ),
    "204-is-no-image": ("status/204", Expect(Reason.HTTP_STATUS, "HTTP 204", 1, "/status/204")),
    "dropped-connection-retried": (
        "drop",
        Expect(Reason.CONNECTION, "gave up after 3 attempts", 3, "/drop"),
    ),
    "body-cut-short": (
        "cut/a.jpg",
        Expect(Reason.CONNECTION, "closed before the whole body", 3, "/cut/a.jpg"),
    ),
    "stalls-after-headers": ("slow", Expect(Reason.TIMEOUT, "sent nothing for 0.5s", 3, "/slow")),
    "stalls-before-headers": (
        "slow-headers/a.jpg",
        Expect(Reason.TIMEOUT, "no response", 3, "/slow-headers/a.jpg"),
    ),
    "2GB-without-length": (
        "huge",
        Expect(Reason.TOO_LARGE, "larger than the 1048576-byte limit", 1, "/huge"),
    ),
    "2GB-declared": (
        "huge-declared",
        Expect(Reason.TOO_LARGE, "declares 2147483648 bytes", 1, "/huge-declared"),
    ),
    "redirect-loop": ("loop/0", Expect(Reason.TOO_MANY_REDIRECTS, "more than 5", 1, "/loop/5")),
}


@pytest.mark.parametrize(("path", "expect"), FAILURES.values(), ids=FAILURES.keys())
def test_fetch_failures(server: LocalHTTPServer, path: str, expect: Expect) -> None:
    with Fetcher(settings()) as fetcher, pytest.raises(ImageFailure) as caught:
        fetcher.fetch(server.url(f"{path}?signature=top-secret"))

    assert caught.value.reason == expect.reason
    assert expect.words in caught.value.message
    assert server.count(expect.path) == expect.requests
    assert "top-secret" not in caught.value.error  # messages never carry the URL


def test_2gb_stream_is_cut_off_at_the_cap(server: LocalHTTPServer) -> None:
    started = time.monotonic()
    with Fetcher(settings(max_image_bytes=256 * 1024)) as fetcher, pytest.raises(ImageFailure):
        fetcher.fetch(server.url("huge"))

    # Reading 2 GB from loopback would take seconds; stopping at 256 KiB takes none.
    assert time.monotonic() - started < 5


def test_trickling_server_is_bounded_by_the_image_time_limit(server: LocalHTTPServer) -> None:
    started = time.monotonic()
    with (
        Fetcher(settings(image_timeout=1.5, read_timeout=1.0, retries=0)) as fetcher,
        pytest.raises(ImageFailure) as caught,
    ):
        fetcher.fetch(server.url("trickle"))

    assert caught.value.reason == Reason.TIMEOUT
    assert "longer than 1.5s" in caught.value.message
    assert time.monotonic() - started < 1.5 + 1.0 + 1.0  # limit + one read timeout + slack


def test_flaky_server_succeeds_on_retry(server: LocalHTTPServer) -> None:
    with Fetcher(settings()) as fetcher:
        fetched = fetcher.fetch(server.url("flaky/2/a.jpg"))

    assert fetched.data == IMAGE
    assert fetched.attempts == 3
    assert server.count("/flaky/2/a.jpg") == 3


def test_429_retry_after_is_honoured(server: LocalHTTPServer) -> None:
    started = time.monotonic()
    with Fetcher(settings()) as fetcher:
        fetched = fetcher.fetch(server.url("ratelimited/1/a.jpg"))

    assert fetched.data == IMAGE
    assert time.monotonic() - started >= 0.95  # waited the second the server asked for


def test_429_asking_longer_than_the_time_left_fails_at_once(server: LocalHTTPServer) -> None:
    started = time.monotonic()
    with (
        Fetcher(settings(image_timeout=2.0, max_retry_after=30.0)) as fetcher,
        pytest.raises(ImageFailure) as caught,
    ):
        fetcher.fetch(server.url("ratelimited/120/a.jpg"))

    assert caught.value.reason == Reason.HTTP_STATUS
    assert "no time left" in caught.value.message
    assert time.monotonic() - started < 2.0


def test_redirects_within_the_limit_are_followed(server: LocalHTTPServer) -> None:
    with Fetcher(settings(max_redirects=1)) as fetcher:
        fetched = fetcher.fetch(server.url(f"redirect?to={server.image_url('a.jpg')}"))

    assert (fetched.data, fetched.redirects) == (IMAGE, 1)


def test_connection_refused_is_retried_then_reported() -> None:
    with LocalHTTPServer() as closed:
        url = closed.url("img/a.jpg")  # the port is free again once the server is gone
    with Fetcher(settings()) as fetcher, pytest.raises(ImageFailure) as caught:
        fetcher.fetch(url)

    assert caught.value.reason == Reason.CONNECTION
    assert "connection refused" in caught.value.message


def test_gzip_body_is_decoded(server: LocalHTTPServer) -> None:
    with Fetcher(settings()) as fetcher:
        fetched = fetcher.fetch(server.url("gzip/a.jpg"))

    assert fetched.data == IMAGE


def test_gzip_bomb_is_cut_off_at_the_decoded_cap(server: LocalHTTPServer) -> None:
    # 64 MiB of zeros arrive as a 64 KiB body; the cap counts what decoding produces.
    with Fetcher(settings()) as fetcher, pytest.raises(ImageFailure) as caught:
        fetcher.fetch(server.url(f"gzip-zeros/{64 * 1024 * 1024}"))

    assert caught.value.reason == Reason.TOO_LARGE


def test_keep_alive_connection_is_reused(
    server: LocalHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects: list[object] = []
    real_connect = socket.socket.connect

    def counting_connect(sock: socket.socket, address: Any) -> None:
        connects.append(address)
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counting_connect)
    with Fetcher(settings()) as fetcher:
        first = fetcher.fetch(server.image_url("a.jpg"))
        second = fetcher.fetch(server.image_url("a.jpg"))

    assert first.data == second.data == IMAGE
    assert len(connects) == 1


def test_connection_closed_by_the_server_is_replaced_without_a_retry(
    server: LocalHTTPServer,
) -> None:
    with Fetcher(settings(retries=0)) as fetcher:
        fetcher.fetch(server.url("then-close/a.jpg"))  # its connection is closed after
        assert wait_until(lambda: server.closed_connections == 1)
        fetched = fetcher.fetch(server.image_url("a.jpg"))

    assert (fetched.data, fetched.attempts) == (IMAGE, 1)
    assert server.count("/img/a.jpg") == 1


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://h/", "/"),
        ("http://h", "/"),
        ("http://h/a b/ü.jpg?x=ü y#frag", "/a%20b/%C3%BC.jpg?x=%C3%BC%20y"),
        ("http://h/already%20encoded?q=%2F", "/already%20encoded?q=%2F"),
        ("http://h/p;v=1/img.jpg?a=1&b=[2]", "/p;v=1/img.jpg?a=1&b=[2]"),
    ],
    ids=["root", "no-path", "non-ascii-and-space", "encoded-kept", "reserved-kept"],
)
def test_request_target(url: str, target: str) -> None:
    assert request_target(url) == target


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), ("0", 0.0), ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0), ("soon", None), ("", None)],
    ids=["seconds", "zero", "http-date", "garbage", "empty"],
)
def test_retry_after_parsing(value: str, seconds: float | None) -> None:
    now = datetime.datetime(2015, 10, 21, 7, 28, 0, tzinfo=datetime.UTC)

    assert retry_after_seconds(value, now) == seconds


# -- HTTPS to a pinned address ------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_context: ssl.SSLContext
    sni_seen: list[str]


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA and a certificate for images.test only (no IP address in it)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = _certificate("test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate("images.test", server_key, ca_name, ca_key, ca=False)
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(
        server_cert.public_bytes(serialization.Encoding.PEM)
        + server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem")
    sni_seen: list[str] = []

    def record_server_name(sock: Any, name: str | None, context: Any) -> None:
        sni_seen.append(name or "")

    context.sni_callback = record_server_name
    return Pki(tmp_path / "ca.pem", context, sni_seen)


def pin_to_loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


def test_https_to_a_pinned_address_keeps_sni_and_certificate_checks(pki: Pki) -> None:
    with LocalHTTPServer({"a.jpg": IMAGE}, tls=pki.server_context) as server:
        url = f"https://images.test:{server.port}/img/a.jpg"
        with Fetcher(settings(ca_bundle=str(pki.ca_file)), resolver=pin_to_loopback) as fetcher:
            fetched = fetcher.fetch(url)

    assert fetched.data == IMAGE
    assert pki.sni_seen == ["images.test"]
    assert server.requests[0].host == f"images.test:{server.port}"


@pytest.mark.parametrize(
    ("host", "why"),
    [("other.test", "certificate names images.test only"), ("127.0.0.1", "no IP in the cert")],
    ids=["wrong-host-name", "bare-ip"],
)
def test_https_certificate_must_match_the_url_host(pki: Pki, host: str, why: str) -> None:
    with LocalHTTPServer({"a.jpg": IMAGE}, tls=pki.server_context) as server:
        url = f"https://{host}:{server.port}/img/a.jpg"
        with (
            Fetcher(settings(ca_bundle=str(pki.ca_file)), resolver=pin_to_loopback) as fetcher,
            pytest.raises(ImageFailure) as caught,
        ):
            fetcher.fetch(url)

    assert caught.value.reason == Reason.TLS, why
    assert server.count("/img/a.jpg") == 0


def test_https_with_an_unknown_ca_fails(pki: Pki) -> None:
    with LocalHTTPServer({"a.jpg": IMAGE}, tls=pki.server_context) as server:
        url = f"https://images.test:{server.port}/img/a.jpg"
        with (
            Fetcher(settings(), resolver=pin_to_loopback) as fetcher,  # system CAs only
            pytest.raises(ImageFailure) as caught,
        ):
            fetcher.fetch(url)

    assert caught.value.reason == Reason.TLS
    assert server.count("/img/a.jpg") == 0
