"""CSV reading and validation: a table of good and bad inputs."""

from __future__ import annotations

import pytest

from imagebatch_operator.csvinput import CsvLimits, CsvProblem, Row, parse

HEADER = "S. No.,Product Name,Input Image Urls\n"


def run(
    text: str | bytes, limits: CsvLimits | None = None, chunk: int = 7
) -> tuple[list[Row], list[CsvProblem]]:
    data = text.encode() if isinstance(text, str) else text
    problems: list[CsvProblem] = []
    chunks = (data[i : i + chunk] for i in range(0, len(data), chunk))
    rows = list(parse(chunks, limits or CsvLimits(), problems))
    return rows, problems


def test_the_example_from_the_design_parses() -> None:
    rows, problems = run(
        HEADER
        + '1,SKU1,"https://img.example.com/a.jpg,https://img.example.com/b.jpg"\n'
        + "2,SKU2,https://img.example.com/c.png\n"
    )
    assert problems == []
    assert rows == [
        Row(
            2,
            1,
            "SKU1",
            ("https://img.example.com/a.jpg", "https://img.example.com/b.jpg"),
            "https://img.example.com/a.jpg,https://img.example.com/b.jpg",
        ),
        Row(3, 2, "SKU2", ("https://img.example.com/c.png",), "https://img.example.com/c.png"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("\ufeff" + HEADER + "1,A,http://x.test/a.jpg\n", id="bom"),
        pytest.param(HEADER.replace("\n", "\r\n") + "1,A,http://x.test/a.jpg\r\n", id="crlf"),
        pytest.param(
            "s.no , PRODUCT NAME,input image urls\n1,A,http://x.test/a.jpg\n", id="case-and-spacing"
        ),
        pytest.param(
            "Input Image Urls,S. No.,Product Name\nhttp://x.test/a.jpg,1,A\n", id="column-order"
        ),
        pytest.param(HEADER + "\n1,A,http://x.test/a.jpg\n\n", id="blank-lines"),
        pytest.param(HEADER + '1,A," http://x.test/a.jpg , "\n', id="spaces-and-trailing-comma"),
    ],
)
def test_tolerated_variations(text: str) -> None:
    rows, problems = run(text)
    assert problems == []
    assert [(r.serial, r.product, r.urls) for r in rows] == [(1, "A", ("http://x.test/a.jpg",))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", [(1, "", "the CSV is empty; expected a header row")], id="empty"),
        pytest.param(
            "No,Name,Urls\n1,A,http://x/a\n",
            [
                (
                    1,
                    "S. No., Product Name, Input Image Urls",
                    "missing column(s) 'S. No.', 'Product Name', 'Input Image Urls'; the header "
                    "must name the columns 'S. No.', 'Product Name', 'Input Image Urls' "
                    "(found 'No', 'Name', 'Urls')",
                )
            ],
            id="wrong-header",
        ),
        pytest.param(
            HEADER + "x,A,http://x.test/a\n",
            [(2, "S. No.", "'x' is not a positive whole number")],
            id="serial-text",
        ),
        pytest.param(
            HEADER + "0,A,http://x.test/a\n",
            [(2, "S. No.", "'0' is not a positive whole number")],
            id="serial-zero",
        ),
        pytest.param(
            HEADER + "-3,A,http://x.test/a\n",
            [(2, "S. No.", "'-3' is not a positive whole number")],
            id="serial-negative",
        ),
        pytest.param(
            HEADER + "1,A,http://x.test/a\n1,B,http://x.test/b\n",
            [(3, "S. No.", "serial number 1 repeats row 2")],
            id="serial-duplicate",
        ),
        pytest.param(
            HEADER + "1,,http://x.test/a\n",
            [(2, "Product Name", "the product name is empty")],
            id="no-product",
        ),
        pytest.param(
            HEADER + "1,A,\n", [(2, "Input Image Urls", "no image URL in this row")], id="no-urls"
        ),
        pytest.param(
            HEADER + "1,A,ftp://x.test/a\n",
            [(2, "Input Image Urls", "URL 'ftp://x.test/a' is not http or https")],
            id="ftp",
        ),
        pytest.param(
            HEADER + "1,A,/images/a.jpg\n",
            [(2, "Input Image Urls", "URL '/images/a.jpg' is not http or https")],
            id="relative",
        ),
        pytest.param(
            HEADER + "1,A,http:///a.jpg\n",
            [(2, "Input Image Urls", "URL 'http:///a.jpg' has no host")],
            id="no-host",
        ),
        pytest.param(
            HEADER + "1,A,http://x.test:99999/a\n",
            [
                (
                    2,
                    "Input Image Urls",
                    "URL 'http://x.test:99999/a' is malformed: Port out of range 0-65535",
                )
            ],
            id="bad-port",
        ),
        pytest.param(
            HEADER + '1,A,"http://x.test/a b.jpg"\n',
            [(2, "Input Image Urls", "URL 'http://x.test/a b.jpg' contains white space")],
            id="space-in-url",
        ),
        pytest.param(
            b"S. No.,Product Name,Input Image Urls\n1,\xff,http://x/a\n",
            [(0, "", "the CSV is not valid UTF-8: invalid start byte")],
            id="not-utf8",
        ),
    ],
)
def test_problems_name_row_and_column(
    text: str | bytes, expected: list[tuple[int, str, str]]
) -> None:
    _, problems = run(text)
    assert [(p.row, p.column, p.message) for p in problems] == expected


def test_every_problem_is_reported_in_one_pass_and_good_rows_still_parse() -> None:
    rows, problems = run(HEADER + "1,A,http://x.test/a\nx,,ftp://y\n3,C,http://x.test/c\n")
    assert [r.serial for r in rows] == [1, 3]
    assert [(p.row, p.column) for p in problems] == [
        (3, "S. No."),
        (3, "Product Name"),
        (3, "Input Image Urls"),
    ]


@pytest.mark.parametrize(
    ("limits", "text", "message"),
    [
        pytest.param(
            CsvLimits(max_rows=2),
            HEADER + "1,A,http://x/a\n2,B,http://x/b\n3,C,http://x/c\n",
            "more than 2 rows (the limit); stopped here",
            id="rows",
        ),
        pytest.param(
            CsvLimits(max_urls_per_row=2),
            HEADER + '1,A,"http://x/a,http://x/b,http://x/c"\n',
            "3 URLs, more than the limit of 2",
            id="urls-per-row",
        ),
        pytest.param(
            CsvLimits(max_bytes=60),
            HEADER + "1,A,http://x.test/a\n" * 5,
            "the CSV is larger than the limit of 60 bytes",
            id="bytes",
        ),
        pytest.param(
            CsvLimits(max_url_length=20),
            HEADER + "1,A,http://x.test/aaaaaaaaaaaaaaaa\n",
            "URL longer than 20 characters",
            id="url-length",
        ),
    ],
)
def test_limits_are_named_when_hit(limits: CsvLimits, text: str, message: str) -> None:
    _, problems = run(text, limits)
    assert message in [p.message for p in problems]


def test_reading_stops_at_the_byte_limit_without_consuming_the_rest() -> None:
    consumed = []

    def endless() -> object:
        yield HEADER.encode()
        while True:
            consumed.append(1)
            yield b"1,A,http://x.test/a\n" * 100

    problems: list[CsvProblem] = []
    list(parse(endless(), CsvLimits(max_bytes=10_000), problems))  # type: ignore[arg-type]
    assert problems[-1].message == "the CSV is larger than the limit of 10000 bytes"
    assert len(consumed) <= 6
