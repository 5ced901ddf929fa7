"""Pure assembly of the user's results: output.csv and errors.csv.

Rows come back in input order with one output URL per input URL, in the same order,
left empty where that image failed. Every failure (validation, fetch, decode, encode,
store, a whole shard) becomes one errors.csv line. Cells that a spreadsheet would run as
a formula are neutralised (OWASP CSV injection), in both files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from imagebatch_common.contract import ImageResult
from imagebatch_operator.csvinput import COLUMNS, OUTPUT, Header, Row

ERROR_COLUMNS = ("row", "url", "stage", "reason")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def neutralise(cell: str) -> str:
    """Prefix a cell a spreadsheet would treat as a formula with a quote."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


@dataclass(frozen=True)
class RowTally:
    """How the rows came out: a row succeeded when every one of its images did."""

    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0


Lookup = Callable[[str], ImageResult | None]


def output_rows(
    header: Header,
    rows: Iterable[Row],
    results: Lookup,
    url_of: Callable[[str], str],
    tally: list[RowTally],
) -> Iterator[list[str]]:
    """The output CSV's rows (header first); appends the final tally to ``tally``."""
    yield [*COLUMNS, OUTPUT]
    count = ok = failed = 0
    for row in rows:
        count += 1
        outputs = []
        for url in row.urls:
            result = results(url)
            outputs.append(url_of(result.key) if result is not None and result.ok else "")
        if all(outputs):
            ok += 1
        else:
            failed += 1
        yield [str(row.serial), row.product, row.raw_urls, ",".join(outputs)]
    tally.append(RowTally(count, ok, failed))


def error_rows(rows: Iterable[Row], results: Lookup) -> Iterator[list[str]]:
    """errors.csv rows (header first): each failed image once per row that lists it."""
    yield list(ERROR_COLUMNS)
    for row in rows:
        for url in row.urls:
            result = results(url)
            if result is None:
                yield [str(row.line), url, "shard", "no result was recorded for this image"]
            elif not result.ok:
                yield [str(row.line), url, result.stage, result.error]


def to_csv(rows: Iterable[list[str]]) -> Iterator[bytes]:
    """Encode rows as UTF-8 CSV with CRLF line ends, every cell neutralised."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    for row in rows:
        writer.writerow([neutralise(c) for c in row])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()
