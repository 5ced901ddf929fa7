"""output.csv and errors.csv: the user's columns back as written, one output per input URL,
neutralised formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from imagebatch_common.contract import ImageResult
from imagebatch_operator.csvinput import CsvLimits, CsvReader, Header, Row
from imagebatch_operator.results import (
    Results,
    RowTally,
    error_rows,
    neutralise,
    output_rows,
    to_csv,
)

HEADER = Header(
    columns=("S. No.", "Product Name", "Input Image Urls"),
    separator=",",
    encoding="utf-8",
    serial=0,
    product=1,
    urls=2,
)
ROWS = [
    Row(
        2,
        ("1", "SKU1", "https://x.test/a.jpg,https://x.test/b.jpg"),
        ("https://x.test/a.jpg", "https://x.test/b.jpg"),
    ),
    Row(3, ("2", '=HYPERLINK("http://evil")', "https://x.test/a.jpg"), ("https://x.test/a.jpg",)),
    Row(4, ("3", "SKU3", "https://x.test/gone.jpg"), ("https://x.test/gone.jpg",)),
]
RESULTS = {
    "https://x.test/a.jpg": ImageResult("https://x.test/a.jpg", "p/images/a1.jpg", True),
    "https://x.test/b.jpg": ImageResult(
        "https://x.test/b.jpg", "", False, stage="fetch", error="HTTP 404"
    ),
    "https://x.test/c.jpg": ImageResult("https://x.test/c.jpg", "p/images/c1.jpg", True),
}


def cdn(key: str) -> str:
    return f"https://cdn.test/{key}"


def output(header: Header, rows: list[Row], results: Results = RESULTS) -> str:
    tally: list[RowTally] = []
    return b"".join(to_csv(output_rows(header, rows, results, cdn, tally))).decode()


@pytest.mark.parametrize("results", [RESULTS, RESULTS.get], ids=["mapping", "function"])
def test_output_csv_bytes(results: Results) -> None:
    tally: list[RowTally] = []
    body = b"".join(to_csv(output_rows(HEADER, ROWS, results, cdn, tally)))
    assert body.decode() == (
        "S. No.,Product Name,Input Image Urls,Output Image Urls\r\n"
        '1,SKU1,"https://x.test/a.jpg,https://x.test/b.jpg","https://cdn.test/p/images/a1.jpg,"\r\n'
        '2,"\'=HYPERLINK(""http://evil"")",https://x.test/a.jpg,https://cdn.test/p/images/a1.jpg\r\n'
        "3,SKU3,https://x.test/gone.jpg,\r\n"
    )
    assert tally == [RowTally(rows=3, rows_ok=1, rows_failed=2)]


def read(text: str) -> tuple[Header, list[Row]]:
    reader = CsvReader([text.encode()], CsvLimits())
    rows = list(reader.rows())
    assert reader.problems == []
    assert reader.header is not None
    return reader.header, rows


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Category\r\n"
            "007,SKU1,https://x.test/a.jpg,Shoes\r\n"
            '0012,"  Two  spaces ",https://x.test/c.jpg,\r\n',
            "S. No.,Product Name,Input Image Urls,Category,Output Image Urls\r\n"
            "007,SKU1,https://x.test/a.jpg,Shoes,https://cdn.test/p/images/a1.jpg\r\n"
            "0012,  Two  spaces ,https://x.test/c.jpg,,https://cdn.test/p/images/c1.jpg\r\n",
            id="extra-column-and-leading-zeros-come-back",
        ),
        pytest.param(
            "Category;input image urls;S.No;Product Name\nShoes;https://x.test/a.jpg;1;=SUM(A1)\n",
            "Category,input image urls,S.No,Product Name,Output Image Urls\r\n"
            "Shoes,https://x.test/a.jpg,1,'=SUM(A1),https://cdn.test/p/images/a1.jpg\r\n",
            id="columns-in-the-users-order-and-names-semicolons-become-commas",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls\n"
            "1,SKU1,https://x.test/a.jpg,https://x.test/c.jpg\n",
            "S. No.,Product Name,Input Image Urls,Output Image Urls\r\n"
            '1,SKU1,"https://x.test/a.jpg,https://x.test/c.jpg",'
            '"https://cdn.test/p/images/a1.jpg,https://cdn.test/p/images/c1.jpg"\r\n',
            id="an-unquoted-url-list-comes-back-as-one-quoted-cell",
        ),
        pytest.param(
            'S. No.,Product Name,Input Image Urls\n1,"Linen\r\nshirt",https://x.test/a.jpg\n',
            "S. No.,Product Name,Input Image Urls,Output Image Urls\r\n"
            '1,"Linen\r\nshirt",https://x.test/a.jpg,https://cdn.test/p/images/a1.jpg\r\n',
            id="multi-line-text-kept",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Output Image Urls,Note\n"
            "1,A,https://x.test/a.jpg,https://old.test/a.jpg,n\n",
            "S. No.,Product Name,Input Image Urls,Output Image Urls,Note\r\n"
            "1,A,https://x.test/a.jpg,https://cdn.test/p/images/a1.jpg,n\r\n",
            id="an-earlier-output-column-is-filled-not-repeated",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,,\n1,A,https://x.test/a.jpg\n",
            "S. No.,Product Name,Input Image Urls,,,Output Image Urls\r\n"
            "1,A,https://x.test/a.jpg,,,https://cdn.test/p/images/a1.jpg\r\n",
            id="left-out-unnamed-columns-keep-the-output-aligned",
        ),
    ],
)
def test_the_users_columns_come_back(text: str, expected: str) -> None:
    header, rows = read(text)
    assert output(header, rows) == expected


def test_a_lookup_function_is_asked_once_per_url_and_row() -> None:
    asked: list[str] = []

    def lookup(url: str) -> ImageResult | None:
        asked.append(url)
        return RESULTS.get(url)

    results: Callable[[str], ImageResult | None] = lookup
    output(HEADER, ROWS, results)
    assert asked == [
        "https://x.test/a.jpg",
        "https://x.test/b.jpg",
        "https://x.test/a.jpg",
        "https://x.test/gone.jpg",
    ]


@pytest.mark.parametrize("results", [RESULTS, RESULTS.get], ids=["mapping", "function"])
def test_errors_csv_lists_every_failure_with_row_and_stage(results: Results) -> None:
    body = b"".join(to_csv(error_rows(ROWS, results))).decode()
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
