"""The operator's CSV download: guarded like image fetches, streamed, capped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from imagebatch_common.storage_settings import StorageSettings
from imagebatch_operator.csvinput import CsvLimits
from imagebatch_operator.fetching import csv_url_opener
from imagebatch_operator.settings import Settings
from imagebatch_operator.sources import SourceUnavailable
from tests.support.servers import ImageServer

pytestmark = pytest.mark.e2e

BIG = b"S. No.,Product Name,Input Image Urls\n" + b"".join(
    b"%d,SKU%d,https://img.example.com/%d.jpg\n" % (i, i, i) for i in range(1, 80_001)
)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    files = {"/products.csv": (BIG, "text/csv")}
    srv = ImageServer(files)
    yield srv
    srv.close()


def settings(allow: str, max_bytes: int = 64 * 1024 * 1024) -> Settings:
    return Settings(
        storage=StorageSettings("unused:9000", "", ""),
        allow_nets=allow,
        csv_limits=CsvLimits(max_bytes=max_bytes),
    )


def test_a_big_csv_arrives_whole_in_chunks(server: ImageServer) -> None:
    chunks = list(csv_url_opener(settings("127.0.0.0/8"))(f"{server.url}/products.csv"))
    assert len(BIG) > 2 * 1024 * 1024
    assert max(len(c) for c in chunks) <= 64 * 1024
    assert b"".join(chunks) == BIG


def test_loopback_is_refused_unless_allowed(server: ImageServer) -> None:
    with pytest.raises(SourceUnavailable, match="address-blocked"):
        csv_url_opener(settings(""))(f"{server.url}/products.csv")
    assert server.hits == {}  # refused before any connection


def test_a_csv_over_the_byte_limit_is_refused_with_the_limit(server: ImageServer) -> None:
    with pytest.raises(SourceUnavailable, match=r"too-large: .*1000000-byte limit"):
        csv_url_opener(settings("127.0.0.0/8", max_bytes=1_000_000))(f"{server.url}/products.csv")


def test_a_missing_csv_names_the_status(server: ImageServer) -> None:
    with pytest.raises(SourceUnavailable, match="HTTP 404"):
        csv_url_opener(settings("127.0.0.0/8"))(f"{server.url}/nope.csv")
