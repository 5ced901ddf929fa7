"""Read and validate the product CSV as a stream.

The input is the CSV the original systems take::

    S. No.,Product Name,Input Image Urls
    1,SKU1,"https://img.example.com/a.jpg,https://img.example.com/b.jpg"

Bytes are read in chunks and counted, so a CSV over the byte limit is refused without
ever being held whole; rows are yielded one at a time. The header is matched without
regard to case, spacing or a BOM; CRLF line endings are fine. Every problem becomes a
``CsvProblem`` naming its row (the 1-based line of the data row, header = row 1) and
column, so a user can fix the file in one pass.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

SERIAL = "S. No."
PRODUCT = "Product Name"
URLS = "Input Image Urls"
OUTPUT = "Output Image Urls"
COLUMNS = (SERIAL, PRODUCT, URLS)

# csv's own field limit is 128 KiB; a row with many long URLs can legitimately be longer.
csv.field_size_limit(8 * 1024 * 1024)


@dataclass(frozen=True)
class CsvLimits:
    """Named limits; each has a default in the operator settings."""

    max_bytes: int = 64 * 1024 * 1024
    max_rows: int = 100_000
    max_urls_per_row: int = 50
    max_url_length: int = 2048


@dataclass(frozen=True)
class CsvProblem:
    """One thing wrong with the CSV: where (row, column) and what."""

    row: int
    column: str
    message: str

    def as_status(self) -> dict[str, object]:
        return {"row": self.row, "column": self.column, "message": self.message}


@dataclass(frozen=True)
class Row:
    """A valid data row, with its URLs split and stripped, in input order."""

    line: int
    serial: int
    product: str
    urls: tuple[str, ...]
    raw_urls: str  # the cell as the user wrote it, echoed in output.csv


@dataclass(frozen=True)
class Header:
    """The header as written and where the required columns are."""

    columns: tuple[str, ...] = COLUMNS
    separator: str = ","
    encoding: str = "utf-8"
    serial: int = 0
    product: int = 1
    urls: int = 2


def row_to_json(row: Row) -> str:
    return json.dumps([row.line, row.serial, row.product, list(row.urls), row.raw_urls])


def row_from_json(line: str | bytes) -> Row:
    number, serial, product, urls, raw = json.loads(line)
    return Row(int(number), int(serial), str(product), tuple(urls), str(raw))


class CsvReader:
    """One pass over the CSV. Iterate ``rows()``; afterwards header and problems are final."""

    def __init__(self, chunks: Iterable[bytes], limits: CsvLimits) -> None:
        self._chunks = chunks
        self._limits = limits
        self.header: Header | None = None
        self.problems: list[CsvProblem] = []
        self.notices: list[CsvProblem] = []

    def rows(self) -> Iterator[Row]:
        self.header = Header()
        yield from parse(self._chunks, self._limits, self.problems)

    def summary(self) -> str:
        return ""


class CsvTooLarge(Exception):
    """The byte limit was hit; validation stops there."""


def _normalise(name: str) -> str:
    return re.sub(r"[\s._-]+", "", name.strip().lower())


_WANTED = {_normalise(c): c for c in COLUMNS}


def _counted_text(chunks: Iterable[bytes], max_bytes: int) -> Iterator[str]:
    """Decode UTF-8 (BOM dropped) chunk by chunk, failing once past ``max_bytes``."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise CsvTooLarge(f"the CSV is larger than the limit of {max_bytes} bytes")
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


class _Lines:
    """An iterator of lines over an iterator of decoded pieces, for ``csv.reader``."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self._buffer = ""

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        while "\n" not in self._buffer:
            piece = next(self._pieces, None)
            if piece is None:
                if not self._buffer:
                    raise StopIteration
                line, self._buffer = self._buffer, ""
                return line
            self._buffer += piece
        line, _, self._buffer = self._buffer.partition("\n")
        return line + "\n"


def check_url(url: str, limits: CsvLimits) -> str | None:
    """Why ``url`` is not an absolute http(s) URL, or None when it is."""
    if len(url) > limits.max_url_length:
        return f"URL longer than {limits.max_url_length} characters"
    if any(c.isspace() for c in url):
        return f"URL {url!r} contains white space"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as error:
        return f"URL {url!r} is malformed: {error}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"URL {url!r} is not http or https"
    if not parts.hostname:
        return f"URL {url!r} has no host"
    return None


def split_urls(cell: str) -> list[str]:
    """The URLs of one cell: comma separated, blanks ignored."""
    return [u.strip() for u in cell.split(",") if u.strip()]


def parse(chunks: Iterable[bytes], limits: CsvLimits, problems: list[CsvProblem]) -> Iterator[Row]:
    """Yield every valid row; append every problem found to ``problems``.

    A CSV with any problem is invalid as a whole: the caller decides not to run it but
    still gets the complete list of problems in one pass.
    """
    try:
        yield from _parse(chunks, limits, problems)
    except CsvTooLarge as error:
        problems.append(CsvProblem(0, "", str(error)))
    except UnicodeDecodeError as error:
        problems.append(CsvProblem(0, "", f"the CSV is not valid UTF-8: {error.reason}"))
    except csv.Error as error:
        problems.append(CsvProblem(0, "", f"the CSV cannot be parsed: {error}"))


def _parse(chunks: Iterable[bytes], limits: CsvLimits, problems: list[CsvProblem]) -> Iterator[Row]:
    reader = csv.reader(_Lines(_counted_text(chunks, limits.max_bytes)))
    header = next(reader, None)
    if header is None:
        problems.append(CsvProblem(1, "", "the CSV is empty; expected a header row"))
        return
    positions: dict[str, int] = {}
    for index, name in enumerate(header):
        wanted = _WANTED.get(_normalise(name))
        if wanted is not None and wanted not in positions:
            positions[wanted] = index
    missing = [c for c in COLUMNS if c not in positions]
    if missing:
        found = ", ".join(repr(h) for h in header)
        problems.append(
            CsvProblem(
                1,
                ", ".join(missing),
                f"missing column(s) {', '.join(repr(m) for m in missing)}; the header must "
                f"name the columns {', '.join(repr(c) for c in COLUMNS)} (found {found})",
            )
        )
        return
    seen: dict[int, int] = {}
    count = 0
    for record in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue  # blank lines are not rows
        count += 1
        if count > limits.max_rows:
            problems.append(
                CsvProblem(line, "", f"more than {limits.max_rows} rows (the limit); stopped here")
            )
            return
        row = _check_row(record, line, positions, limits, seen, problems)
        if row is not None:
            yield row


def _check_row(
    record: list[str],
    line: int,
    positions: dict[str, int],
    limits: CsvLimits,
    seen: dict[int, int],
    problems: list[CsvProblem],
) -> Row | None:
    def cell(column: str) -> str:
        index = positions[column]
        return record[index].strip() if index < len(record) else ""

    before = len(problems)
    serial_text = cell(SERIAL)
    serial = 0
    if not re.fullmatch(r"\d+", serial_text) or int(serial_text) < 1:
        problems.append(CsvProblem(line, SERIAL, f"{serial_text!r} is not a positive whole number"))
    else:
        serial = int(serial_text)
        if serial in seen:
            problems.append(
                CsvProblem(line, SERIAL, f"serial number {serial} repeats row {seen[serial]}")
            )
        else:
            seen[serial] = line
    product = cell(PRODUCT)
    if not product:
        problems.append(CsvProblem(line, PRODUCT, "the product name is empty"))
    raw_urls = cell(URLS)
    urls = split_urls(raw_urls)
    if not urls:
        problems.append(CsvProblem(line, URLS, "no image URL in this row"))
    elif len(urls) > limits.max_urls_per_row:
        problems.append(
            CsvProblem(
                line, URLS, f"{len(urls)} URLs, more than the limit of {limits.max_urls_per_row}"
            )
        )
    else:
        for url in urls:
            reason = check_url(url, limits)
            if reason:
                problems.append(CsvProblem(line, URLS, reason))
    if len(problems) != before:
        return None
    return Row(line=line, serial=serial, product=product, urls=tuple(urls), raw_urls=raw_urls)
