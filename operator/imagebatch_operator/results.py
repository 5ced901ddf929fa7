"""Pure assembly of the user's results: output.csv and errors.csv.

output.csv gives the user's file back: every input column in the input's order with
every cell exactly as written (the serial ``007``, extra columns such as ``Category``,
multi-line text), then ``Output Image Urls``: one output URL per input URL, in the same
order, left empty where that image failed. A row whose URL list was not quoted gets its
URL cell written as one cell holding all of its URLs, so the columns stay aligned. An
input column already named ``Output Image Urls`` (an earlier output.csv sent again) is
filled with this run's URLs rather than repeated.

Every failure (fetch, decode, encode, store, a whole shard) becomes one errors.csv
line. Cells that a spreadsheet would run as a formula are neutralised (OWASP CSV
injection) in both files. Results are looked up one URL at a time through a mapping or
a function, so a caller can keep them outside memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from imagebatch_common.contract import ImageResult
from imagebatch_operator.csvinput import OUTPUT, Header, Row

ERROR_COLUMNS = ("row", "url", "stage", "reason")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")

# How a result is found for a URL: a mapping, or a function returning None when absent.
Results = Mapping[str, ImageResult] | Callable[[str], ImageResult | None]


def neutralise(cell: str) -> str:
    """Prefix a cell a spreadsheet would treat as a formula with a quote."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


@dataclass(frozen=True)
class RowTally:
    """How the rows came out: a row succeeded when every one of its images did."""

    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0


def _lookup(results: Results) -> Callable[[str], ImageResult | None]:
    return results.get if isinstance(results, Mapping) else results


def output_rows(
    header: Header,
    rows: Iterable[Row],
    results: Results,
    url_of: Callable[[str], str],
    tally: list[RowTally],
) -> Iterator[list[str]]:
    """The output CSV's rows (header first); appends the final tally to ``tally``."""
    result_of = _lookup(results)
    width = len(header.columns)
    into = header.output  # the input's own output column, or None: append one
    yield [*header.columns] if into is not None else [*header.columns, OUTPUT]
    count = ok = failed = 0
    for row in rows:
        count += 1
        outputs = []
        for url in row.urls:
            result = result_of(url)
            outputs.append(url_of(result.key) if result is not None and result.ok else "")
        if all(outputs):
            ok += 1
        else:
            failed += 1
        cells = [*row.cells]
        if len(cells) < width:  # trailing columns without a name were left out
            cells.extend([""] * (width - len(cells)))
        if into is None:
            cells.append(",".join(outputs))
        else:
            cells[into] = ",".join(outputs)
        yield cells
    tally.append(RowTally(count, ok, failed))


def error_rows(rows: Iterable[Row], results: Results) -> Iterator[list[str]]:
    """errors.csv rows (header first): each failed image once per row that lists it."""
    result_of = _lookup(results)
    yield list(ERROR_COLUMNS)
    for row in rows:
        for url in row.urls:
            result = result_of(url)
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
