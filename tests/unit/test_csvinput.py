"""CSV reading and validation: tables of the files spreadsheets write, good and bad."""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Iterator

import pytest

from imagebatch_operator.csvinput import (
    MAX_PROBLEMS,
    CsvLimits,
    CsvProblem,
    CsvReader,
    Header,
    Row,
    check_url,
    parse,
)

HEADER = "S. No.,Product Name,Input Image Urls\n"
A, B, C = "http://x.test/a.jpg", "http://x.test/b.jpg", "http://x.test/c.jpg"


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def read(
    text: str | bytes, limits: CsvLimits | None = None, chunk: int = 7
) -> tuple[CsvReader, list[Row]]:
    data = text.encode() if isinstance(text, str) else text
    reader = CsvReader(chunked(data, chunk), limits or CsvLimits())
    rows = list(reader.rows())
    return reader, rows


def utf16_unicode_text(text: str) -> bytes:
    """Excel's "Unicode Text": UTF-16LE with a BOM, tab separated, CRLF."""
    return codecs.BOM_UTF16_LE + text.replace("\n", "\r\n").encode("utf-16-le")


def cp1252(text: str) -> bytes:
    """Excel's plain "CSV" on Windows."""
    return text.encode("cp1252")


# --- files that are read ------------------------------------------------------------

RowTuple = tuple[int, tuple[str, ...], tuple[str, ...], bool]


@pytest.mark.parametrize(
    ("text", "rows", "summary"),
    [
        pytest.param(
            HEADER + f'1,SKU1,"{A},{B}"\n2,SKU2,{C}\n',
            [(2, ("1", "SKU1", f"{A},{B}"), (A, B), False), (3, ("2", "SKU2", C), (C,), False)],
            "",
            id="the-design-example",
        ),
        pytest.param(
            "\ufeff" + HEADER + f"1,A,{A}\n", [(2, ("1", "A", A), (A,), False)], "", id="utf8-bom"
        ),
        pytest.param(
            HEADER.replace("\n", "\r\n") + f"1,A,{A}\r\n2,B,{B}\r\n",
            [(2, ("1", "A", A), (A,), False), (3, ("2", "B", B), (B,), False)],
            "",
            id="crlf",
        ),
        pytest.param(
            HEADER.replace("\n", "\r") + f"1,A,{A}\r2,B,{B}\r",
            [(2, ("1", "A", A), (A,), False), (3, ("2", "B", B), (B,), False)],
            "",
            id="cr-only-old-mac",
        ),
        pytest.param(
            HEADER.replace("\n", "\r") + f"1,A,{A}\r\n2,B,{B}\n3,C,{C}",
            [
                (2, ("1", "A", A), (A,), False),
                (3, ("2", "B", B), (B,), False),
                (4, ("3", "C", C), (C,), False),
            ],
            "",
            id="mixed-line-ends-no-final-newline",
        ),
        pytest.param(
            f"s.no , PRODUCT NAME,input image urls\n1,A,{A}\n",
            [(2, ("1", "A", A), (A,), False)],
            "",
            id="header-case-and-spacing",
        ),
        pytest.param(
            f"S/No:,Product-Name,input_image_URLs\n1,A,{A}\n",
            [(2, ("1", "A", A), (A,), False)],
            "",
            id="header-punctuation",
        ),
        pytest.param(
            f"Input Image Urls,S. No.,Product Name\n{A},1,A\n",
            [(2, (A, "1", "A"), (A,), False)],
            "",
            id="column-order",
        ),
        pytest.param(
            "\n \r\n" + HEADER + f"\n1,A,{A}\n,,\n\n2,B,{B}\n\n",
            [(5, ("1", "A", A), (A,), False), (8, ("2", "B", B), (B,), False)],
            "",
            id="blank-lines-first-line-included",
        ),
        pytest.param(
            HEADER + f'1,A," {A} , "\n',
            [(2, ("1", "A", f" {A} , "), (A,), False)],
            "",
            id="spaces-and-trailing-comma-in-the-url-cell",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Category\n007,SKU1,"
            f'"{A},{B}",Shoes\n0012,"  Two  spaces ",{C},\n',
            [
                (2, ("007", "SKU1", f"{A},{B}", "Shoes"), (A, B), False),
                (3, ("0012", "  Two  spaces ", C, ""), (C,), False),
            ],
            "",
            id="extra-column-and-leading-zero-serials-kept-as-written",
        ),
        pytest.param(
            HEADER + f'1,"Linen shirt\r\nsize M, blue",{A}\n2,B,{B}\n',
            [
                (2, ("1", "Linen shirt\r\nsize M, blue", A), (A,), False),
                (4, ("2", "B", B), (B,), False),
            ],
            "",
            id="multi-line-quoted-cell",
        ),
        pytest.param(
            "S. No.;Product Name;Input Image Urls\n"
            f'1;"Shirt; blue";{A}\n2;B;"{A},{B}"\n3;C;{A},{C}\n',
            [
                (2, ("1", "Shirt; blue", A), (A,), False),
                (3, ("2", "B", f"{A},{B}"), (A, B), False),
                (4, ("3", "C", f"{A},{C}"), (A, C), False),
            ],
            "separator ';'",
            id="semicolon-european-excel",
        ),
        pytest.param(
            f"sep=;\r\nS. No.;Product Name;Input Image Urls\r\n1;A;{A}\r\n",
            [(3, ("1", "A", A), (A,), False)],
            "separator ';'",
            id="sep-line-semicolon",
        ),
        pytest.param(
            f'"sep=,"\nS. No.,Product Name,Input Image Urls\n1,A;B,{A}\n',
            [(3, ("1", "A;B", A), (A,), False)],
            "",
            id="sep-line-comma-quoted",
        ),
        pytest.param(
            utf16_unicode_text(f"S. No.\tProduct Name\tInput Image Urls\n1\tÉtoile ★\t{A}\n"),
            [(2, ("1", "Étoile ★", A), (A,), False)],
            "UTF-16 decoded; separator tab",
            id="excel-unicode-text-utf16le",
        ),
        pytest.param(
            codecs.BOM_UTF16_BE
            + f"S. No.,Product Name,Input Image Urls\r\n1,日本,{A}\r\n".encode("utf-16-be"),
            [(2, ("1", "日本", A), (A,), False)],
            "UTF-16 decoded",
            id="utf16be-with-bom",
        ),
        pytest.param(
            HEADER + f"1,SKU1,{A},{B}\n2,SKU2,{C}\n3,SKU3,{A}, {B},,{C},\n",
            [
                (2, ("1", "SKU1", f"{A},{B}"), (A, B), True),
                (3, ("2", "SKU2", C), (C,), False),
                (4, ("3", "SKU3", f"{A}, {B},,{C}"), (A, B, C), True),
            ],
            "2 rows with an unquoted URL list (first: line 2); quote the URL cell",
            id="unquoted-url-list-folded",
        ),
        pytest.param(
            HEADER + f"1,A,{A},,\n",
            [(2, ("1", "A", A), (A,), False)],
            "",
            id="trailing-empty-fields",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,,\n" + f"1,A,{A}\n2,B,{B},,\n",
            [(2, ("1", "A", A), (A,), False), (3, ("2", "B", B, "", ""), (B,), False)],
            "",
            id="unnamed-trailing-columns-may-be-left-out",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,,\n" + f"1,A,{A},{B}\n2,B,{B},,{C}\n3,C,{C},x,\n",
            [
                (2, ("1", "A", f"{A},{B}", "", ""), (A, B), True),
                (3, ("2", "B", f"{B},,{C}", "", ""), (B, C), True),
                (4, ("3", "C", C, "x", ""), (C,), False),
            ],
            "2 rows with an unquoted URL list (first: line 2); quote the URL cell",
            id="urls-in-unnamed-columns-right-of-the-url-column-are-folded",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Output Image Urls\n"
            f"1,A,{A},https://cdn.test/old.jpg\n",
            [(2, ("1", "A", A, "https://cdn.test/old.jpg"), (A,), False)],
            "input column 'Output Image Urls' replaced",
            id="an-earlier-output-csv-sent-again",
        ),
        pytest.param(
            HEADER + f"1,Men's 12\" pipe,{A}\n",
            [(2, ("1", "Men's 12\" pipe", A), (A,), False)],
            "",
            id="quote-inside-an-unquoted-cell-is-text",
        ),
        pytest.param(
            HEADER + f'1,"Say ""hi""",{A}\n',
            [(2, ("1", 'Say "hi"', A), (A,), False)],
            "",
            id="doubled-quotes",
        ),
        pytest.param(
            HEADER + "1,A,HTTPS://X.test/a.jpg?w=1&h=2#f\n2,B,http://[::1]:8080/b.png\n",
            [
                (
                    2,
                    ("1", "A", "HTTPS://X.test/a.jpg?w=1&h=2#f"),
                    ("HTTPS://X.test/a.jpg?w=1&h=2#f",),
                    False,
                ),
                (3, ("2", "B", "http://[::1]:8080/b.png"), ("http://[::1]:8080/b.png",), False),
            ],
            "",
            id="urls-with-query-port-ipv6",
        ),
    ],
)
def test_files_that_are_read(text: str | bytes, rows: list[RowTuple], summary: str) -> None:
    reader, got = read(text)
    assert reader.problems == []
    assert [(r.line, r.cells, r.urls, r.folded) for r in got] == rows
    assert reader.summary() == summary


def test_header_says_how_the_file_was_read() -> None:
    reader, _ = read(
        utf16_unicode_text(f"\nCategory\tInput Image Urls\tproduct name\tS.No.\nShoes\t{A}\tA\t1\n")
    )
    assert reader.header == Header(
        columns=("Category", "Input Image Urls", "product name", "S.No."),
        separator="\t",
        encoding="utf-16-le",
        serial=3,
        product=2,
        urls=1,
        output=None,
        line=2,
    )
    assert [(n.row, n.message) for n in reader.notices] == [
        (1, "the file is UTF-16 text (little-endian); it was decoded"),
        (2, "the separator is tab ('\\t'), read from the header line"),
    ]


def test_the_header_spools_as_one_line_of_json() -> None:
    reader, _ = read("S. No.;Product Name;Input Image Urls;Output Image Urls\n" + f"1;A;{A};\n")
    assert reader.header is not None
    text = reader.header.to_json()
    assert "\n" not in text
    assert Header.from_json(text) == reader.header
    assert Header.from_json(text.encode()).output == 3


def test_an_unquoted_url_list_is_a_notice_naming_the_row() -> None:
    reader, rows = read(HEADER + f"1,SKU1,{A},{B}\n")
    assert [r.urls for r in rows] == [(A, B)]
    assert reader.notices == [
        CsvProblem(
            2,
            "Input Image Urls",
            "1 more field after the 'Input Image Urls' cell read as further URLs of this row; "
            'quote the cell ("url1,url2") so every spreadsheet reads it as one cell',
        )
    ]


def test_notices_of_folded_rows_are_capped_and_counted() -> None:
    reader, rows = read(HEADER + "".join(f"{i},P,{A},{B}\n" for i in range(1, 31)))
    assert len(rows) == 30
    assert len(reader.notices) == 11
    assert reader.notices[-1].message == "20 more rows have an unquoted URL list"
    assert reader.summary().startswith("30 rows with an unquoted URL list (first: line 2)")


# --- problems: where and what -------------------------------------------------------

# (row, column, a phrase the message contains)
Expected = list[tuple[int, str, str]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # reading the file
        pytest.param("", [(1, "", "the CSV is empty; expected a header line")], id="empty"),
        pytest.param(
            "\n\r\n  \n",
            [(1, "", "the CSV has no header: it holds only blank lines")],
            id="only-blank-lines",
        ),
        pytest.param(
            cp1252(HEADER + f"1,A,{A}\n2,“Quoted” name,{B}\n3,C,{C}\n"),
            [
                (
                    3,
                    "Product Name",
                    "byte 0x93 at line 3, byte 3 is not UTF-8 (the file looks like a "
                    "Windows-1252 or Latin-1 export",
                )
            ],
            id="cp1252-smart-quotes",
        ),
        pytest.param(
            cp1252(HEADER + f"1,A,{A}\n2,B,{B}\n3,Café,{C}\n"),
            [(4, "Product Name", 'save it as "CSV UTF-8"')],
            id="cp1252-accent",
        ),
        pytest.param(
            "S. No.,Désignation,Product Name,Input Image Urls\n".encode("latin-1"),
            [(1, "", "byte 0xE9 at line 1, byte 9 is not UTF-8")],
            id="latin1-in-the-header",
        ),
        pytest.param(
            HEADER.encode("utf-16-le"),
            [(1, "", "the file looks like UTF-16 text without a BOM")],
            id="utf16-without-bom",
        ),
        pytest.param(
            "sep=|\nS. No.|Product Name|Input Image Urls\n",
            [(1, "", "the sep= line names the separator '|'; only comma, semicolon and tab")],
            id="sep-line-unsupported",
        ),
        # the header
        pytest.param(
            "No,Name,Urls\n1,A,http://x/a\n",
            [
                (
                    1,
                    "S. No., Product Name, Input Image Urls",
                    "the header needs the columns 'S. No.', 'Product Name' and 'Input Image "
                    "Urls'; missing: 'S. No.', 'Product Name' and 'Input Image Urls' (found "
                    "3 named columns, read with the comma separator)",
                )
            ],
            id="wrong-header",
        ),
        pytest.param(
            f"S. No.,Product Name,Images\n1,A,{A}\n",
            [(1, "Input Image Urls", "missing: 'Input Image Urls' (found")],
            id="one-column-missing",
        ),
        pytest.param(
            f"1,SKU1,{A}\n2,SKU2,{B}\n",
            [(1, "S. No., Product Name, Input Image Urls", "is the header line missing?")],
            id="no-header-line",
        ),
        pytest.param(
            f"S. No.,Product Name,Input Image Urls,Input Image Urls\n1,A,{A},{B}\n",
            [
                (
                    1,
                    "Input Image Urls",
                    "the header names the column 'Input Image Urls' twice: column 3 "
                    "'Input Image Urls' and column 4 'Input Image Urls'; keep one",
                )
            ],
            id="second-input-image-urls-column",
        ),
        pytest.param(
            f"S.No,Product Name,Input Image Urls,sno\n1,A,{A},2\n",
            [(1, "S. No.", "names the column 'S. No.' twice: column 1 'S.No' and column 4 'sno'")],
            id="duplicate-after-normalisation",
        ),
        pytest.param(
            f"S. No.,Category,Product Name,Input Image Urls,Category\n1,x,A,{A},y\n",
            [
                (
                    1,
                    "Category",
                    "names the column 'Category' twice: column 2 'Category' and column 5",
                )
            ],
            id="duplicate-extra-column",
        ),
        pytest.param(
            f"S. No.,Product\x07Name,Input Image Urls\n1,A,{A}\n",
            [(1, "Product\x07Name", "control character U+0007 (BEL) in the header cell")],
            id="control-character-in-the-header",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls\r\n",
            [(2, "", "the CSV has a header but no data rows")],
            id="header-only",
        ),
        # fields and cells
        pytest.param(
            HEADER + f"1,A\x00B,{A}\n",
            [(2, "Product Name", "control character U+0000 (NUL) in this cell at character 2")],
            id="nul-in-a-product-name",
        ),
        pytest.param(
            HEADER + "1,A,http://x.test/a\x00.jpg\n",
            [(2, "Input Image Urls", "control character U+0000 (NUL) in this cell")],
            id="nul-in-a-url",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Notes\n"
            + f"1,A,{A},bell\x07\n2,B,{B},del\x7f\n3,C\x1b,{C},\n",
            [
                (2, "Notes", "U+0007 (BEL)"),
                (3, "Notes", "U+007F (DEL)"),
                (4, "Product Name", "U+001B (ESC)"),
            ],
            id="control-characters-in-any-cell",
        ),
        pytest.param(
            HEADER + f'1,A,"{A}\n{B}"\n2,B,{B}\n',
            [
                (
                    2,
                    "Input Image Urls",
                    "this cell spans lines 2 to 3; separate URLs with commas, not line breaks",
                )
            ],
            id="line-break-in-a-url-cell",
        ),
        pytest.param(
            HEADER + f'1,A,"{A}\n2,B,{B}\n3,C,{C}"\n4,D,{A}\n',
            [
                (
                    2,
                    "Input Image Urls",
                    "a quote opened on line 2 is not closed where this cell should end: the cell "
                    "runs on to line 4",
                )
            ],
            id="url-cell-quote-swallows-rows",
        ),
        pytest.param(
            HEADER + f'1,A,"{A}\n2,B,{B}\n3,C,{C}\n',
            [
                (
                    2,
                    "Input Image Urls",
                    "a quote opened on line 2 is never closed; lines 3 to 4 were read as part "
                    "of this cell; add the closing quote",
                )
            ],
            id="unclosed-quote-to-the-end",
        ),
        pytest.param(
            HEADER + f'1,A,{A}\n2,B,"{B}',
            [
                (
                    3,
                    "Input Image Urls",
                    "a quote opened on line 3 is never closed; add the closing quote",
                )
            ],
            id="unclosed-quote-on-the-last-line",
        ),
        pytest.param(
            HEADER + f'1,"SKU1,{A}\n2,SKU2,{B}\n3,"SKU3",{C}\n4,,{A}\n',
            [
                (
                    2,
                    "Product Name",
                    "a quote opened on line 2 closes only on line 4, followed by more text; add "
                    "the missing closing quote on line 2 (lines 3 to 4 were read as part of this "
                    "cell)",
                ),
                (5, "Product Name", "the product name is empty"),
            ],
            id="unclosed-quote-closed-by-a-later-one",
        ),
        pytest.param(
            HEADER + f'1,"12" pipe",{A}\n',
            [(2, "Product Name", "text after the closing quote of this cell (' pipe\"')")],
            id="text-after-closing-quote",
        ),
        pytest.param(
            HEADER + f'1,"SKU1"x,{A}\n',
            [(2, "Product Name", 'a quote inside a quoted cell is written twice ("")')],
            id="letter-after-closing-quote",
        ),
        pytest.param(
            HEADER + f'1,A,"{A}"  \n',
            [(2, "Input Image Urls", "space after the closing quote of this cell; remove it")],
            id="space-after-closing-quote",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Category\n"
            + f"1,A,{A},{B}\n2,Shirt, blue,{A},Tops\n",
            [
                (
                    3,
                    "",
                    "this row has 5 fields but the header has 4 columns; a cell that contains "
                    "the comma must be in double quotes",
                )
            ],
            id="more-fields-url-column-not-last",
        ),
        pytest.param(
            HEADER + f"1,Shirt, blue,{A}\n",
            [
                (
                    2,
                    "",
                    "this row has 4 fields but the header has 3 columns; a cell that contains the "
                    "comma must be in double quotes (the 'Input Image Urls' field is not a URL "
                    "here: an earlier cell probably holds a comma)",
                )
            ],
            id="unquoted-comma-in-a-product-name",
        ),
        pytest.param(
            HEADER + f"1,A,{A},Shoes\n",
            [(2, "", "(the fields after 'Input Image Urls' are not all URLs)")],
            id="more-fields-not-urls",
        ),
        pytest.param(
            "S. No.,Product Name,Input Image Urls,Category\n" + f"1,A,{A}\n",
            [
                (
                    2,
                    "Category",
                    "this row has 3 fields but the header has 4 columns: no value for 'Category'",
                )
            ],
            id="fewer-fields",
        ),
        pytest.param(
            HEADER + "1\n",
            [(2, "Product Name, Input Image Urls", "no value for 'Product Name' and 'Input Image")],
            id="one-field",
        ),
        # serials, products, URLs
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
            HEADER + "1.5,A,http://x.test/a\n٣,B,http://x.test/b\n",
            [
                (2, "S. No.", "'1.5' is not a positive whole number"),
                (3, "S. No.", "'٣' is not a positive whole number"),
            ],
            id="serial-fraction-and-non-ascii-digit",
        ),
        pytest.param(
            HEADER + " ,A,http://x.test/a\n",
            [(2, "S. No.", "the serial number is empty")],
            id="serial-empty",
        ),
        pytest.param(
            HEADER + "1,A,http://x.test/a\n1,B,http://x.test/b\n",
            [(3, "S. No.", "serial number 1 repeats line 2")],
            id="serial-duplicate",
        ),
        pytest.param(
            HEADER + "007,A,http://x.test/a\n7,B,http://x.test/b\n07,C,http://x.test/c\n",
            [
                (
                    3,
                    "S. No.",
                    "serial number 7 repeats line 2, where it is written 007 (serial numbers "
                    "are compared as numbers)",
                ),
                (4, "S. No.", "serial number 07 repeats line 2, where it is written 007"),
            ],
            id="serial-007-and-7-collide",
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
                    "URL 'http://x.test:99999/a' is malformed: its port is not a number from 0 "
                    "to 65535",
                )
            ],
            id="bad-port",
        ),
        pytest.param(
            HEADER + "1,A,http://[::1/a\n",
            [(2, "Input Image Urls", "is malformed: its [host] is not an IPv6 address")],
            id="bad-ipv6",
        ),
        pytest.param(
            HEADER + '1,A,"http://x.test/a b.jpg"\n',
            [(2, "Input Image Urls", "URL 'http://x.test/a b.jpg' contains white space")],
            id="space-in-url",
        ),
        pytest.param(
            HEADER + f"1,A,{A},ftp://x.test/b\n",
            [(2, "Input Image Urls", "URL 'ftp://x.test/b' is not http or https")],
            id="folded-urls-are-checked",
        ),
        # line numbers are physical lines, whatever came before
        pytest.param(
            "\r\r" + HEADER.replace("\n", "\r") + f'1,"a\rb",{A}\r\r2,,{B}\r',
            [(7, "Product Name", "the product name is empty")],
            id="line-numbers-cr-only-blank-lines-and-multi-line-cell",
        ),
        pytest.param(
            f"S. No.;Product Name;Input Image Urls;Category\n1;A;{A};x\n2;B;{B}\n",
            [(3, "Category", "no value for 'Category'")],
            id="semicolon-file-problem",
        ),
    ],
)
def test_problems_name_line_column_and_what(text: str | bytes, expected: Expected) -> None:
    reader, _ = read(text)
    got = [(p.row, p.column, p.message) for p in reader.problems]
    assert [(row, column) for row, column, _ in got] == [(r, c) for r, c, _ in expected], got
    for (_, _, message), (_, _, phrase) in zip(got, expected, strict=True):
        assert phrase in message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(HEADER.replace("\n", "\r") + '1,A,"http://x/a\r', id="cr-only-open-quote"),
        pytest.param(HEADER + '1,A,"http://x/a"b\n', id="char-after-quote"),
        pytest.param(HEADER + "1,A,http://x:http/a\n", id="port-not-a-number"),
        # A fullwidth @ in the host, which Unicode normalisation turns into "@".
        pytest.param(HEADER + "1,A,http://x\uff20y.test/a\n", id="nfkc-host"),
        pytest.param("\n\n", id="blank"),
        pytest.param(b"S. No.\xff", id="undecodable"),
        pytest.param(codecs.BOM_UTF16_LE + b"S\x00.\x00\x00\xd8", id="utf16-lone-surrogate"),
    ],
)
def test_no_python_wording_reaches_a_user(text: str | bytes) -> None:
    reader, _ = read(text)
    assert reader.problems
    for problem in reader.problems:
        for words in (
            "new-line character",
            "unquoted field",
            "universal-newline",
            "expected after",
            "unexpected end of data",
            "field larger",
            "codec",
            "can't decode",
            "Port out of range",
            "Port could not be cast",
            "Invalid IPv6",
            "NFKC",
            "Error",
            "(found )",
        ):
            assert words not in problem.message


def test_an_unclosed_quote_is_one_problem_not_a_cascade() -> None:
    rows = "".join(f"{i},P{i},http://x.test/{i}.jpg\n" for i in range(3, 40))
    reader, got = read(HEADER + f'1,A,{A}\n2,"SKU2,{B}\n' + rows)
    assert [r.line for r in got] == [2]
    assert len(reader.problems) == 1
    assert (reader.problems[0].row, reader.problems[0].column) == (3, "Product Name")
    assert "a quote opened on line 3 is never closed" in reader.problems[0].message


def test_an_unclosed_quote_stops_within_the_record_cap() -> None:
    consumed: list[int] = []

    def endless() -> Iterator[bytes]:
        yield (HEADER + f'1,A,{A}\n2,"SKU2,{B}\n').encode()
        while True:
            consumed.append(1)
            yield b"3,C,http://x.test/c.jpg\n" * 1000

    reader = CsvReader(endless(), CsvLimits())
    assert [r.line for r in reader.rows()] == [2]
    assert [(p.row, p.column) for p in reader.problems] == [(3, "Product Name")]
    assert "a quote opened on line 3 is not closed within 1048576 characters" in (
        reader.problems[0].message
    )
    assert len(consumed) < 50  # about 1 MiB read past the quote, not the endless rest


def test_every_problem_is_reported_in_one_pass_and_good_rows_still_parse() -> None:
    reader, rows = read(HEADER + "1,A,http://x.test/a\nx,,ftp://y\n3,C,http://x.test/c\n")
    assert [r.cells[0] for r in rows] == ["1", "3"]
    assert [(p.row, p.column) for p in reader.problems] == [
        (3, "S. No."),
        (3, "Product Name"),
        (3, "Input Image Urls"),
    ]


def test_problems_are_capped() -> None:
    reader, _ = read(HEADER + "x,A,http://x.test/a\n" * (MAX_PROBLEMS + 5), chunk=65536)
    assert len(reader.problems) == MAX_PROBLEMS + 1
    assert reader.problems[-1] == CsvProblem(
        MAX_PROBLEMS + 1, "", f"more than {MAX_PROBLEMS} problems; checking stopped at line 10001"
    )


def test_messages_quote_little_of_the_users_text_and_no_secrets() -> None:
    long_url = "http://user:secret@x.test/" + "a" * 3000 + " b.jpg?signature=abc"
    long_name = "N" * 500 + "\x00"
    reader, _ = read(HEADER + f'1,{long_name},"{long_url}"\n2,A,http://u:pw@x.test/a b?sig=1\n')
    assert [p.row for p in reader.problems] == [2, 2, 3]
    for problem in reader.problems:
        assert len(problem.message) < 200
        assert "secret" not in problem.message
        assert "signature" not in problem.message
        assert "pw" not in problem.message
        assert "sig=" not in problem.message
        assert "a" * 100 not in problem.message
    assert "'http://x.test/a b?…' contains white space" in reader.problems[2].message


# --- limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "text", "expected"),
    [
        pytest.param(
            CsvLimits(max_rows=2),
            HEADER + "1,A,http://x/a\n2,B,http://x/b\n\n3,C,http://x/c\n",
            (5, "", "more than 2 rows (the limit); stopped here"),
            id="rows",
        ),
        pytest.param(
            CsvLimits(max_urls_per_row=2),
            HEADER + '1,A,"http://x/a,http://x/b,http://x/c"\n',
            (2, "Input Image Urls", "3 URLs, more than the limit of 2 per row"),
            id="urls-per-row",
        ),
        pytest.param(
            CsvLimits(max_urls_per_row=2),
            HEADER + "1,A,http://x/a,http://x/b,http://x/c\n",
            (2, "Input Image Urls", "3 URLs, more than the limit of 2 per row"),
            id="urls-per-row-folded",
        ),
        pytest.param(
            CsvLimits(max_bytes=60),
            HEADER + "1,A,http://x.test/a\n" * 5,
            (3, "", "the CSV is larger than the limit of 60 bytes; reading stopped in line 3"),
            id="bytes",
        ),
        pytest.param(
            CsvLimits(max_url_length=20),
            HEADER + "1,A,http://x.test/aaaaaaaaaaaaaaaa\n",
            (
                2,
                "Input Image Urls",
                "URL 'http://x.test/aaaaaaaaaaaaaaaa' is longer than the limit of 20 characters",
            ),
            id="url-length",
        ),
    ],
)
def test_limits_are_named_when_hit(
    limits: CsvLimits, text: str, expected: tuple[int, str, str]
) -> None:
    reader, _ = read(text, limits)
    assert [(p.row, p.column, p.message) for p in reader.problems][-1] == expected


def test_reading_stops_at_the_byte_limit_without_consuming_the_rest() -> None:
    consumed = []

    def endless() -> Iterator[bytes]:
        yield HEADER.encode()
        while True:
            consumed.append(1)
            yield b"1,A,http://x.test/a\n" * 100

    reader = CsvReader(endless(), CsvLimits(max_bytes=10_000))
    list(reader.rows())
    assert reader.problems[-1].message.startswith("the CSV is larger than the limit of 10000 bytes")
    assert len(consumed) <= 6


def test_the_byte_limit_counts_raw_bytes() -> None:
    text = utf16_unicode_text(f"S. No.\tProduct Name\tInput Image Urls\n1\tA\t{A}\n")
    assert read(text, CsvLimits(max_bytes=len(text)))[0].problems == []
    reader, _ = read(text, CsvLimits(max_bytes=len(text) - 1))
    assert reader.problems[0].message.startswith("the CSV is larger than the limit")


# --- streaming ------------------------------------------------------------------------

TRICKY = (
    "\r\n"
    "S. No.,Product Name,Input Image Urls,Category\r\n"
    '1,"Étoile ★ ""Nova""\r\nsecond line, still the name",'
    f'"{A},{B}",日本語\r\n'
    f"2,😀 emoji,{C},\r"
    f"3,Ärmel,{A},{B}\n"
    f'4,"",{A},\r\n'
    f"5,Ω,{B},z"
)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_chunk_boundaries_anywhere_read_the_same(encoding: str) -> None:
    data = TRICKY.encode(encoding)  # utf-16: a BOM, then little-endian on this machine
    expected = read(data, chunk=1 << 16)
    rows = [(r.line, r.cells, r.urls, r.folded) for r in expected[1]]
    assert [r[0] for r in rows] == [3, 5, 6, 8]
    assert rows[0][1] == (
        "1",
        'Étoile ★ "Nova"\r\nsecond line, still the name',
        f"{A},{B}",
        "日本語",
    )
    assert [(p.row, p.column) for p in expected[0].problems] == [(7, "Product Name")]
    for size in [1, 2, 3, 5, 7, 11, 13, 64]:
        reader, got = read(data, chunk=size)
        assert [(r.line, r.cells, r.urls, r.folded) for r in got] == rows, size
        assert reader.problems == expected[0].problems, size
        assert reader.notices == expected[0].notices, size


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 64])
def test_an_undecodable_byte_is_found_at_the_same_place_in_any_chunking(size: int) -> None:
    data = (HEADER + "1,A,http://x/a\r\n2,Ünïcödé ✓,http://x/b\r\n").encode() + cp1252(
        "3,“x”,http://x/c\n"
    )
    reader, rows = read(data, chunk=size)
    assert [r.line for r in rows] == [2, 3]
    assert [(p.row, p.column) for p in reader.problems] == [(4, "Product Name")]
    assert "byte 0x93 at line 4, byte 3 is not UTF-8" in reader.problems[0].message


@pytest.mark.parametrize("size", [1 << 16, 1 << 30], ids=["64KiB-chunks", "one-chunk"])
@pytest.mark.parametrize(
    ("middle", "expected"),
    [
        pytest.param(
            '2,"' + "long text\n" * 150_000 + f'",{B}\n',
            (3, "Product Name", "a quote opened on line 3 is not closed within 1048576 characters"),
            id="a-record-over-the-cap",
        ),
        pytest.param(
            "2," + "x" * (1 << 21) + f",{B}\n",
            (3, "", "line 3 is longer than 1048576 characters; reading stopped here"),
            id="a-line-over-the-cap",
        ),
    ],
)
def test_the_record_cap_holds_whatever_the_chunk_size(
    size: int, middle: str, expected: tuple[int, str, str]
) -> None:
    reader, rows = read(HEADER + f"1,A,{A}\n" + middle + f"3,C,{C}\n", chunk=size)
    assert [r.line for r in rows] == [2]
    assert [(p.row, p.column) for p in reader.problems] == [expected[:2]]
    assert expected[2] in reader.problems[0].message


def test_any_input_in_any_chunking_reads_the_same_in_our_words() -> None:
    pieces = [*HEADER[:-1].split(","), ",", ",", ";", "\t", '"', '"', "\r", "\n", "\r\n"]
    pieces += [A, "1", "007", " ", "é", "\x00", "sep=;", "\ufeff", "😀", "https://", "x"]
    pick = random.Random(12)
    for _ in range(300):
        text = "".join(pick.choice(pieces) for _ in range(pick.randint(0, 60)))
        if pick.random() < 0.5:
            text = HEADER + text
        data = text.encode(pick.choice(["utf-8", "utf-8-sig", "utf-16"]))
        limits = CsvLimits(max_bytes=pick.choice([1 << 20, 50]))
        whole, whole_rows = read(data, limits, chunk=1 << 20)
        for size in (1, 3):
            reader, rows = read(data, limits, chunk=size)
            assert rows == whole_rows, text
            assert reader.problems == whole.problems, text
            assert reader.notices == whole.notices, text
        for problem in whole.problems:
            assert "Error" not in problem.message
            assert "unexpected end" not in problem.message


# --- the fast check and the careful check agree ---------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://x.test/a.jpg",
        "HTTPS://X.TEST/A.JPG",
        "https://x-y.test/a%20b.jpg?x=1&y=2#frag",
        "https://x.test/ünï.jpg",
        "https://ünï.test/a.jpg",
        "http://x.test:8080/a.jpg",
        "http://x.test:99999/a.jpg",
        "http://user:pw@x.test/a.jpg",
        "http://[::1]/a.jpg",
        "http://[::1/a.jpg",
        "http:///a.jpg",
        "http:/x.test/a.jpg",
        "ftp://x.test/a.jpg",
        "javascript:alert(1)",
        "http://x.test/a\u00a0b.jpg",
        "http://x.test/a\u2028b.jpg",
        "http://-x.test/a",
        "http://x.test\\a",
        "http://x.test/" + "a" * 2100,
    ],
)
def test_a_url_gets_the_same_verdict_on_both_paths(url: str) -> None:
    fast_reader, fast_rows = read(HEADER + f'1,A,"{url}"\n')
    # A multi-line cell in the row sends it down the careful path.
    careful_reader, careful_rows = read(HEADER + f'1,"A\nB","{url}"\n')
    assert [r.urls for r in fast_rows] == [r.urls for r in careful_rows]
    assert [p.message for p in fast_reader.problems] == [p.message for p in careful_reader.problems]
    assert (check_url(url, CsvLimits()) is None) == bool(fast_rows)


# --- the spool form and the old entry point -------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        Row(2, ("007", "SKU1", f"{A},{B}", "Shoes"), (A, B)),
        Row(9, ("1", 'Multi\r\nline "name"\u2028€', A), (A,), folded=False),
        Row(100_000, ("1", "x", f"{A},{B}"), (A, B), folded=True),
    ],
)
def test_a_row_spools_as_one_line_of_json(row: Row) -> None:
    text = row.to_spool()
    plain = (row.line, row.cells, 1) if row.folded else (row.line, row.cells)
    assert text == json.dumps(plain, separators=(",", ":"))
    assert "\n" not in text
    assert "\r" not in text
    assert "\u2028" not in text
    assert text.isascii()
    assert Row.from_spool(text, 2) == row
    assert Row.from_spool(text.encode(), 2) == row


def test_parse_keeps_the_old_entry_point() -> None:
    problems: list[CsvProblem] = []
    rows = list(parse(chunked((HEADER + f"1,A,{A}\nx,B,{B}\n").encode(), 5), CsvLimits(), problems))
    assert [r.line for r in rows] == [2]
    assert [(p.row, p.column) for p in problems] == [(3, "S. No.")]


def test_rows_are_read_once() -> None:
    reader = CsvReader([HEADER.encode()], CsvLimits())
    list(reader.rows())
    with pytest.raises(RuntimeError):
        list(reader.rows())


def test_a_file_that_is_not_our_csv_is_described_never_quoted() -> None:
    secret = "aws_secret_access_key=AKIAEXAMPLE0123456789,password=hunter2\nmore,stuff\n"
    reader = CsvReader([secret.encode()], CsvLimits())
    assert list(reader.rows()) == []
    assert reader.problems
    for problem in reader.problems:
        for word in ("AKIAEXAMPLE", "hunter2", "aws_secret", "more", "stuff"):
            assert word not in problem.message and word not in problem.column


@pytest.mark.parametrize("folded", [False, True])
def test_a_spooled_row_comes_back_with_its_urls(folded: bool) -> None:
    row = Row(
        7,
        ("007", "SKU, with comma", " https://a.test/1.jpg , https://a.test/2.jpg"),
        ("https://a.test/1.jpg", "https://a.test/2.jpg"),
        folded,
    )
    assert Row.from_spool(row.to_spool(), 2) == row
    assert "\n" not in row.to_spool()
