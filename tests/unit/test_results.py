"""output.csv and errors.csv assembly: order, one output per input, neutralised formulas."""

from __future__ import annotations

import pytest

from imagebatch_common.contract import ImageResult
from imagebatch_operator.csvinput import Header, Row
from imagebatch_operator.results import RowTally, error_rows, neutralise, output_rows, to_csv

ROWS = [
    Row(
        2,
        1,
        "SKU1",
        ("https://x.test/a.jpg", "https://x.test/b.jpg"),
        "https://x.test/a.jpg,https://x.test/b.jpg",
    ),
    Row(3, 2, '=HYPERLINK("http://evil")', ("https://x.test/a.jpg",), "https://x.test/a.jpg"),
    Row(4, 3, "SKU3", ("https://x.test/gone.jpg",), "https://x.test/gone.jpg"),
]
RESULTS = {
    "https://x.test/a.jpg": ImageResult("https://x.test/a.jpg", "p/images/a1.jpg", True),
    "https://x.test/b.jpg": ImageResult(
        "https://x.test/b.jpg", "", False, stage="fetch", error="HTTP 404"
    ),
}


def test_output_csv_bytes() -> None:
    tally: list[RowTally] = []
    body = b"".join(
        to_csv(output_rows(Header(), ROWS, RESULTS.get, lambda k: f"https://cdn.test/{k}", tally))
    )
    assert body.decode() == (
        "S. No.,Product Name,Input Image Urls,Output Image Urls\r\n"
        '1,SKU1,"https://x.test/a.jpg,https://x.test/b.jpg","https://cdn.test/p/images/a1.jpg,"\r\n'
        '2,"\'=HYPERLINK(""http://evil"")",https://x.test/a.jpg,https://cdn.test/p/images/a1.jpg\r\n'
        "3,SKU3,https://x.test/gone.jpg,\r\n"
    )
    assert tally == [RowTally(rows=3, rows_ok=1, rows_failed=2)]


def test_errors_csv_lists_every_failure_with_row_and_stage() -> None:
    body = b"".join(to_csv(error_rows(ROWS, RESULTS.get))).decode()
    assert body == (
        "row,url,stage,reason\r\n"
        "2,https://x.test/b.jpg,fetch,HTTP 404\r\n"
        "4,https://x.test/gone.jpg,shard,no result was recorded for this image\r\n"
    )


@pytest.mark.parametrize(
    ("cell", "out"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("SKU-1", "SKU-1"),
        ("", ""),
    ],
)
def test_formula_cells_are_neutralised(cell: str, out: str) -> None:
    assert neutralise(cell) == out
