"""Read and validate the product CSV as a stream, as spreadsheets really write it.

The input is the CSV the original systems take, with any further columns the user's
sheet has::

    S. No.,Product Name,Input Image Urls,Category
    007,SKU1,"https://img.example.com/a.jpg,https://img.example.com/b.jpg",Shoes

What is read:

- Encoding: UTF-8 with or without a BOM; UTF-16 (little- or big-endian) with a BOM,
  which is Excel's "Unicode Text". Anything else (Excel's plain "CSV" on Windows is
  cp1252) is refused with one problem at the line and byte column of the first byte
  that does not decode.
- Line ends: CRLF, LF and CR alone (old Mac), mixed. Line numbers count the physical
  lines of the file, blank ones included, so they match what an editor shows.
- Separator: comma, semicolon or tab, detected from the header line (the one that
  yields the required columns); Excel's ``sep=X`` first line is honoured.
- Blank lines (and lines of separators only) are skipped anywhere, before the header too.
- Header: the three required columns are matched ignoring case, spacing and
  punctuation, in any order; other columns are kept. A name given twice is refused.
- Rows: every cell is kept exactly as written (``007`` stays ``007``). A row with more
  fields than the header is taken as an unquoted URL list when the URL column is last
  and every extra field is a URL (a notice says to quote the cell); otherwise it is
  refused, as is a row with fewer fields. Control characters are refused in any cell,
  line breaks in the serial and URL cells (elsewhere they are multi-line text).

Every problem is a ``CsvProblem`` at the line where its record starts, with the column
name and a message in our words (never the csv module's), quoting at most a short
excerpt of the user's text and URLs without userinfo or query string. An unclosed or
misplaced quote is one problem at the line where the quote opened, not a cascade.

Nothing here does I/O: ``CsvReader`` takes an iterable of byte chunks and yields rows.
It holds one chunk and one record at a time (a record is capped at ``record_cap``
characters), plus one entry per serial number to find repeats, so its memory does not
grow with the file beyond ``max_rows``. For speed, each record first gets a cheap check
(field count, ASCII digits, a URL regex) that accepts the usual row; a record that
fails it gets the careful check that names the problem. Both reach the same verdict:
the fast check accepts nothing the careful one would refuse.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from _csv import Reader as _CsvRows

SERIAL = "S. No."
PRODUCT = "Product Name"
URLS = "Input Image Urls"
OUTPUT = "Output Image Urls"
COLUMNS = (SERIAL, PRODUCT, URLS)

SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab"}

# Enough problems to fix a file in a few passes; past this the reader stops, which also
# bounds memory for a file where every line is wrong.
MAX_PROBLEMS = 10_000
# Notices of one kind that are kept (a file may fold the URLs of every row); the
# summary counts them all.
MAX_NOTICES_PER_KIND = 10
# The most characters of the user's text one message quotes.
_EXCERPT = 60


@dataclass(frozen=True)
class CsvLimits:
    """Named limits; each has a default in the operator settings."""

    max_bytes: int = 64 * 1024 * 1024
    max_rows: int = 100_000
    max_urls_per_row: int = 50
    max_url_length: int = 2048

    @property
    def record_cap(self) -> int:
        """The most characters one record (all its lines) may have: room for a full URL
        cell twice over, and at least 1 MiB; past it a quote is taken as never closed."""
        return max(1 << 20, 2 * self.max_urls_per_row * (self.max_url_length + 1))


@dataclass(frozen=True)
class CsvProblem:
    """One thing wrong with the CSV: where (the line its record starts on, the column
    name, "" when not about one column) and what, in words a user can act on."""

    row: int
    column: str
    message: str

    def as_status(self) -> dict[str, object]:
        return {"row": self.row, "column": self.column, "message": self.message}


@dataclass(frozen=True)
class Header:
    """The header as written, how the file was read, and where the required columns are."""

    columns: tuple[str, ...]  # every header cell exactly as written
    separator: str  # "," ";" or "\t"
    encoding: str  # "utf-8", "utf-8-sig", "utf-16-le" or "utf-16-be"
    serial: int
    product: int
    urls: int
    output: int | None = None  # an input column named like "Output Image Urls", if any
    line: int = 1  # the physical line the header is on

    def to_json(self) -> str:
        """One line of JSON, read back by ``from_json``: output.csv is written at the end
        of a run, maybe by another operator process than the one that read the CSV."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes) -> Header:
        fields = json.loads(text)
        fields["columns"] = tuple(fields["columns"])
        return Header(**fields)


# Spooled rows are compact JSON, ASCII only, so a row is always one line whatever line
# separators (U+2028, CR in a multi-line cell) its cells hold. Each cell is quoted by the
# json module's own C quoting, for rows spooled by the hundred thousand.
_QUOTE = json.encoder.encode_basestring_ascii


@dataclass(frozen=True, slots=True)
class Row:
    """A valid data row.

    ``cells`` holds every cell as the user wrote it, one per header column (fewer only
    when trailing columns without a name were left out); when extra unquoted fields were
    taken as further URLs (``folded``), the URL cell holds all of them, comma-joined, so
    the columns stay aligned in output.csv. ``urls`` are the row's URLs, split on commas
    and stripped, in order.
    """

    line: int
    cells: tuple[str, ...]
    urls: tuple[str, ...]
    folded: bool = False

    def to_spool(self) -> str:
        """One line of JSON without the URLs, which ``from_spool`` splits again from the
        URL cell: a run spools every row, and the URLs would be written twice."""
        # What json.dumps((line, cells), separators=(",", ":")) writes, at a third of its cost.
        cells = ",".join(map(_QUOTE, self.cells))
        if self.folded:
            return f"[{self.line},[{cells}],1]"
        return f"[{self.line},[{cells}]]"

    @staticmethod
    def from_spool(line: str | bytes, url_column: int) -> Row:
        number, cells, *folded = json.loads(line)
        return Row(
            int(number),
            tuple(cells),
            tuple(split_urls(cells[url_column])),
            bool(folded and folded[0]),
        )


# --- small pure helpers ---------------------------------------------------------------

_NOT_ALNUM = re.compile(r"[\W_]+")


def _normalise(name: str) -> str:
    """A column name without case, spacing or punctuation: "S. No." -> "sno"."""
    return _NOT_ALNUM.sub("", name).casefold()


_REQUIRED = {_normalise(c): c for c in COLUMNS}
_OUTPUT_NAME = _normalise(OUTPUT)

# C0 controls but tab, CR and LF (those are separators and line ends), and DEL.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL_NAMES = {0: "NUL", 7: "BEL", 8: "backspace", 11: "vertical tab", 12: "form feed"}
_CONTROL_NAMES |= {27: "ESC", 127: "DEL"}
# The same, one by one: testing a whole piece of text with ``in`` for each is ten times
# faster than a regex character class, and most text has none of them.
_CONTROL_CHARS = tuple(map(chr, [*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]))
# Characters str.splitlines() breaks on besides CR and LF: a CSV line ends only at CR/LF.
_ODD_BREAKS = tuple("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")
_BLANK = re.compile("[\\s,;\ufeff]*")  # a second BOM is as blank as a space
_SEP_LINE = re.compile(r'\s*"?sep=(.)"?[,;\t]*\s*', re.IGNORECASE | re.DOTALL)
# A URL check_url surely accepts: http(s), a plain ASCII host without port or userinfo,
# printable ASCII after it. Anything else goes through check_url itself.
_PLAIN_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9][A-Za-z0-9.-]*(?:[/?#][!-~]*)?")
_URL_LIKE = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
_SPACE = re.compile(r"\s")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@")


def _line_breaks(text: str) -> int:
    """Line ends in ``text``; CRLF counts once."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _excerpt(text: str, limit: int = _EXCERPT) -> str:
    """The user's text as quoted in a message: short, with invisible characters escaped."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return repr(text)


def _show_url(url: str) -> str:
    """A URL as quoted in a message: no userinfo and no query string or fragment (they
    may hold credentials or a signature), and short."""
    shown = _USERINFO.sub(r"\1", url)
    cut = min((i for i in (shown.find("?"), shown.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        shown = shown[:cut] + shown[cut] + "…"
    return _excerpt(shown)


def _excerpt_list(names: Iterable[str]) -> str:
    shown: list[str] = []
    size = 0
    for name in names:
        item = _excerpt(name)
        if size + len(item) > 80 and shown:
            shown.append("…")
            break
        shown.append(item)
        size += len(item) + 2
    return ", ".join(shown)


def _quoted_names(names: Iterable[str]) -> str:
    items = [repr(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _control_message(match: re.Match[str], what: str) -> str:
    code = ord(match.group())
    name = _CONTROL_NAMES.get(code)
    label = f"U+{code:04X}" + (f" ({name})" if name else "")
    return f"control character {label} in {what} at character {match.start() + 1}; remove it"


def _plural(items: list[str], word: str) -> str:
    return word if len(items) == 1 else word + "s"


def _count(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"


def _separator_name(separator: str) -> str:
    return SEPARATORS.get(separator, repr(separator))


def check_url(url: str, limits: CsvLimits) -> str | None:
    """Why ``url`` is not an absolute http(s) URL, or None when it is."""
    if len(url) > limits.max_url_length:
        return (
            f"URL {_show_url(url)} is longer than the limit of {limits.max_url_length} characters"
        )
    control = _CONTROL.search(url)
    if control:
        return f"URL {_show_url(url)}: " + _control_message(control, "the URL")
    if _SPACE.search(url):
        return f"URL {_show_url(url)} contains white space"
    try:
        parts = urlsplit(url)
    except ValueError:
        if "[" in url or "]" in url:
            return f"URL {_show_url(url)} is malformed: its [host] is not an IPv6 address"
        return f"URL {_show_url(url)} is malformed: its host changes under Unicode normalisation"
    if parts.scheme.lower() not in ("http", "https"):
        return f"URL {_show_url(url)} is not http or https"
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"URL {_show_url(url)} is malformed: its port is not a number from 0 to 65535"
    if not parts.hostname:
        return f"URL {_show_url(url)} has no host"
    return None


def split_urls(cell: str) -> list[str]:
    """The URLs of one cell: comma separated, blanks ignored."""
    return [u for u in map(str.strip, cell.split(",")) if u]


@dataclass(frozen=True)
class _QuoteTrouble:
    """Where quoting went wrong in one record's text."""

    field: int  # index of the field whose quote is at fault
    opened: int  # line (0 = the record's first) where that field's quote opened
    closed: int | None  # line of a closing quote followed by text; None: never closed
    after: str  # the text after that closing quote, up to the next separator or line end


def _quote_trouble(text: str, separator: str) -> _QuoteTrouble | None:
    """Scan one record character by character the way csv does in strict mode.

    Only called once a record is known to be wrong, on at most ``record_cap`` characters.
    """
    start, unquoted, quoted, closed = range(4)
    state, field, line, opened = start, 0, 0, 0
    for index, char in enumerate(text):
        if state == quoted:
            if char == '"':
                state = closed
            elif char == "\n" or (char == "\r" and text[index + 1 : index + 2] != "\n"):
                line += 1
        elif char == separator:
            field, state = field + 1, start
        elif char in "\r\n":
            if char == "\n" or text[index + 1 : index + 2] != "\n":
                field, state, line = 0, start, line + 1
        elif state == start:
            state = quoted if char == '"' else unquoted
            opened = line
        elif state == closed:
            if char != '"':
                after = re.match(f"[^{re.escape(separator)}\r\n]*", text[index : index + 200])
                return _QuoteTrouble(field, opened, line, after.group() if after else char)
            state = quoted
    if state == quoted:
        return _QuoteTrouble(field, opened, None, "")
    return None


# --- the reader ---------------------------------------------------------------------


class _Stop(Exception):
    """Reading cannot go on; ``problem`` says why (the column may be filled in later)."""

    def __init__(self, problem: CsvProblem, partial_line: bool = False) -> None:
        super().__init__(problem.message)
        self.problem = problem
        self.partial_line = partial_line  # the problem is in the line being assembled


class _Runaway(Exception):
    """A record (or one line) grew past the record cap: ``line`` is where it was seen;
    ``end``, when known, the record's last line (else it is still open)."""

    def __init__(self, line: int, end: int | None = None) -> None:
        super().__init__(line)
        self.line = line
        self.end = end


class CsvReader:
    """One pass over the CSV. Iterate ``rows()``; afterwards header, problems, notices are final.

    ``problems``: any problem makes the CSV invalid as a whole; all of them are found in
    the one pass (up to ``MAX_PROBLEMS``). ``rows()`` yields the valid rows only, in order.
    ``notices``: things that do not invalidate the file but that the user should hear
    about (a non-comma separator, a decoded encoding, unquoted URL lists, an input
    column replaced by the output).
    """

    def __init__(self, chunks: Iterable[bytes], limits: CsvLimits) -> None:
        self.header: Header | None = None
        self.problems: list[CsvProblem] = []
        self.notices: list[CsvProblem] = []
        self._chunks = chunks
        self._limits = limits
        self._cap = limits.record_cap
        self._started = False
        self._encoding = "utf-8"
        self._codec = "utf-8"
        self._separator = ","
        self._separator_source = ""
        # Decoder position, for the line and byte column of an undecodable byte.
        self._line = 0  # line ends decoded so far
        self._column = 0  # bytes of the current line decoded so far
        self._after_cr = False
        self._controls = False  # a control character was decoded somewhere
        # Line assembly: the partial last line, and the lines of the record being read.
        self._carry = ""
        self._window: deque[tuple[int, list[str]]] = deque()
        self._last_end = 0  # last line of the last complete record
        self._folded = 0
        self._first_folded = 0
        self._last_named = 0  # index of the header's last column with a name
        # Serials written other than as the plain number (007), to say so on a repeat.
        self._written: dict[int, str] = {}
        if csv.field_size_limit() < 2 * self._cap:
            # The record cap is checked here (between pieces of text, so a record may pass
            # it by a piece); csv's own smaller default must not refuse a legitimate long
            # URL cell first. Raising this process-wide limit harms no other reader.
            csv.field_size_limit(2 * self._cap)

    # public -------------------------------------------------------------------------

    def rows(self) -> Iterator[Row]:
        """The valid rows, in order; fills ``header``, ``problems`` and ``notices``."""
        if self._started:
            raise RuntimeError("a CsvReader reads its chunks once")
        self._started = True
        lines = chain.from_iterable(self._line_lists(self._texts()))
        try:
            yield from self._read(lines)
        except _Stop as stop:
            problem = stop.problem
            if stop.partial_line and problem.row == self._last_end + 1:
                problem = CsvProblem(problem.row, self._column_at(self._carry), problem.message)
            self._problem(problem)
        except _Runaway as runaway:
            self._problem(self._runaway_problem(runaway.line, runaway.end))
        if self._folded > MAX_NOTICES_PER_KIND:
            self.notices.append(
                CsvProblem(
                    0,
                    self.header.columns[self.header.urls] if self.header else URLS,
                    f"{self._folded - MAX_NOTICES_PER_KIND} more rows have an unquoted URL list",
                )
            )

    def summary(self) -> str:
        """One short line for the Validated condition's message; "" when nothing is noteworthy."""
        parts = []
        if self._encoding.startswith("utf-16"):
            parts.append("UTF-16 decoded")
        if self._separator != ",":
            shown = "tab" if self._separator == "\t" else repr(self._separator)
            parts.append(f"separator {shown}")
        if self._folded:
            rows = "1 row" if self._folded == 1 else f"{self._folded} rows"
            parts.append(
                f"{rows} with an unquoted URL list (first: line {self._first_folded}); "
                "quote the URL cell"
            )
        if self.header is not None and self.header.output is not None:
            parts.append(f"input column {self.header.columns[self.header.output]!r} replaced")
        return "; ".join(parts)

    # bytes -> text ------------------------------------------------------------------

    def _texts(self) -> Iterator[str]:
        """Decoded text, chunk by chunk; raw bytes are counted against ``max_bytes``."""
        limit = self._limits.max_bytes
        total = 0
        head = b""
        decoder: codecs.IncrementalDecoder | None = None
        for chunk in self._chunks:
            total += len(chunk)
            over = total > limit
            data = chunk[: max(0, len(chunk) - (total - limit))] if over else chunk
            if decoder is None:
                head += data
                if len(head) < 4 and not over:
                    continue  # a BOM is up to 4 bytes; chunks may be single bytes
                decoder, data = self._open(head)
            yield from self._decode(decoder, data, final=False)
            if over:
                raise _Stop(
                    CsvProblem(
                        self._line + 1,
                        "",
                        f"the CSV is larger than the limit of {limit} bytes; "
                        f"reading stopped in line {self._line + 1}",
                    )
                )
        if decoder is None:
            decoder, head = self._open(head)
            yield from self._decode(decoder, head, final=False)
        yield from self._decode(decoder, b"", final=True)

    def _open(self, head: bytes) -> tuple[codecs.IncrementalDecoder, bytes]:
        """The decoder the first bytes call for, and those bytes without a BOM."""
        if head.startswith(codecs.BOM_UTF8):
            self._encoding, self._codec, head = "utf-8-sig", "utf-8", head[3:]
        elif head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
            raise _Stop(CsvProblem(1, "", "the file is UTF-32 text; " + _EXPORT_HINT))
        elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            little = head.startswith(codecs.BOM_UTF16_LE)
            self._encoding = self._codec = "utf-16-le" if little else "utf-16-be"
            head = head[2:]
            endian = "little" if little else "big"
            self.notices.append(
                CsvProblem(1, "", f"the file is UTF-16 text ({endian}-endian); it was decoded")
            )
        elif len(head) >= 4 and (
            (head[1] == head[3] == 0 and head[0] and head[2])
            or (head[0] == head[2] == 0 and head[1] and head[3])
        ):
            raise _Stop(
                CsvProblem(1, "", "the file looks like UTF-16 text without a BOM; " + _EXPORT_HINT)
            )
        return codecs.getincrementaldecoder(self._codec)(errors="strict"), head

    def _decode(
        self, decoder: codecs.IncrementalDecoder, data: bytes, *, final: bool
    ) -> Iterator[str]:
        """The text of ``data``; on a byte that does not decode, the text before it and
        then a problem at that byte's line and byte column."""
        try:
            text = decoder.decode(data, final)
        except UnicodeDecodeError as error:
            raw = bytes(error.object)  # the decoder's pending bytes + data
            before = raw[: error.start].decode(self._codec, errors="replace")
            self._advance(before)
            if before:
                yield before
            line, column = self._line + 1, self._column + 1
            if self._codec == "utf-8":
                message = (
                    f"byte 0x{raw[error.start]:02X} at line {line}, byte {column} is not UTF-8 "
                    '(the file looks like a Windows-1252 or Latin-1 export, Excel\'s plain "CSV"); '
                    + _EXPORT_HINT
                )
            else:
                message = (
                    f"the UTF-16 text has a broken character at line {line}, byte {column}; "
                    + _EXPORT_HINT
                )
            raise _Stop(CsvProblem(line, "", message), partial_line=True) from None
        if text:
            self._advance(text)
            yield text

    def _advance(self, text: str) -> None:
        """Move the decoder's line/byte position past ``text``."""
        if not self._controls and any(char in text for char in _CONTROL_CHARS):
            self._controls = True
        ends = _line_breaks(text)
        if self._after_cr and text.startswith("\n"):
            ends -= 1  # the second half of a CRLF split between two chunks
        self._line += ends
        cut = max(text.rfind("\n"), text.rfind("\r"))
        if cut >= 0:
            self._column = len(text[cut + 1 :].encode(self._codec))
        else:
            self._column += len(text.encode(self._codec))
        self._after_cr = text.endswith("\r")

    # text -> physical lines ---------------------------------------------------------

    def _line_lists(self, texts: Iterator[str]) -> Iterator[list[str]]:
        """Physical lines with their line ends (CRLF, LF or CR), one list per piece of text.

        Lists, not single lines, so that csv.reader iterates them at C speed. The lists
        since the open record's first line stay in ``_window`` for the careful checks.
        """
        carry = ""
        number = 1  # the line number of the next line yielded
        for piece in texts:
            text = carry + piece if carry else piece
            cut = max(text.rfind("\n"), text.rfind("\r")) + 1
            if cut == len(text) and text.endswith("\r"):
                # A CR at the very end may be the first half of a CRLF: keep it back.
                cut = max(text.rfind("\n", 0, cut - 1), text.rfind("\r", 0, cut - 1)) + 1
            carry = self._carry = text[cut:]
            lines: list[str] = []
            if cut:
                body = text[:cut]
                odd = any(char in body for char in _ODD_BREAKS)
                lines = _LINE.findall(body) if odd else body.splitlines(True)
                self._keep(number, lines)
                if len(body) > self._cap and max(map(len, lines)) > self._cap:
                    # A piece larger than the cap holds a line longer than it: read the
                    # lines before it, as smaller pieces would have, then stop.
                    long = next(i for i, line in enumerate(lines) if len(line) > self._cap)
                    if long:
                        yield lines[:long]
                    raise _Runaway(number + long)
            if len(carry) > self._cap:
                raise _Runaway(number + len(lines))
            if lines:
                number += len(lines)
                yield lines
        if carry:
            self._carry = ""
            self._keep(number, [carry])
            yield [carry]

    def _keep(self, number: int, lines: list[str]) -> None:
        """Add ``lines`` to the window, dropping what precedes the open record."""
        window = self._window
        start = self._last_end + 1
        while window and window[0][0] + len(window[0][1]) <= start:
            window.popleft()
        window.append((number, lines))
        if len(window) > 1:  # the open record spans pieces: it must stay under the cap
            size = len(self._carry) + sum(
                len(line) for first, kept in window for line in kept[max(0, start - first) :]
            )
            if size > self._cap:
                raise _Runaway(start)

    def _record_text(self, start: int, end: int) -> str:
        """The raw text of lines ``start``..``end`` (they are in the window)."""
        parts = []
        for first, lines in self._window:
            lo, hi = max(start - first, 0), min(end - first + 1, len(lines))
            if lo < hi:
                parts.extend(lines[lo:hi])
        return "".join(parts)

    # lines -> header and rows -------------------------------------------------------

    def _read(self, lines: Iterator[str]) -> Iterator[Row]:
        number = 0
        first = None
        for line in lines:
            number += 1
            if _BLANK.fullmatch(line):
                self._last_end = number
                continue
            sep_line = _SEP_LINE.fullmatch(line) if not self._separator_source else None
            if sep_line:
                self._last_end = number
                char = sep_line.group(1)
                if char not in SEPARATORS:
                    self._problem(
                        CsvProblem(
                            number,
                            "",
                            f"the sep= line names the separator {char!r}; "
                            "only comma, semicolon and tab are read",
                        )
                    )
                    return
                self._separator, self._separator_source = char, "the sep= line"
                continue
            first = line
            break
        if first is None:
            self._problem(CsvProblem(1, "", _ONLY_BLANK if number else _EMPTY))
            return
        if not self._separator_source:
            self._separator = _detect_separator(first)
            self._separator_source = "the header line"
        offset = number - 1  # lines before the header
        reader = csv.reader(chain((first,), lines), delimiter=self._separator, strict=True)
        try:
            cells = next(reader)
        except csv.Error:
            self._problem(self._quote_problem(number, offset + reader.line_num, None))
            return
        self._last_end = offset + reader.line_num
        header = self._check_header(cells, number)
        if header is None:
            return
        self.header = header
        if header.separator != ",":
            self.notices.append(
                CsvProblem(
                    number,
                    "",
                    f"the separator is {_separator_name(header.separator)} "
                    f"({header.separator!r}), read from {self._separator_source}",
                )
            )
        if header.output is not None:
            self.notices.append(
                CsvProblem(
                    number,
                    header.columns[header.output],
                    "this input column is replaced by the output URLs in output.csv",
                )
            )
        yield from self._records(reader, offset, header)

    def _records(self, reader: _CsvRows, offset: int, header: Header) -> Iterator[Row]:
        ncols = len(header.columns)
        serial_at, product_at, urls_at = header.serial, header.product, header.urls
        limits = self._limits
        max_rows, max_urls, max_length = (
            limits.max_rows,
            limits.max_urls_per_row,
            limits.max_url_length,
        )
        plain_url = _PLAIN_URL.fullmatch
        named = [i for i, c in enumerate(header.columns) if c.strip()]
        self._last_named = named[-1]
        # Columns without a name right of a last URL column may hold more URLs: a row
        # with anything there takes the careful path, which folds them in.
        spill_at = urls_at + 1 if urls_at == named[-1] else ncols
        seen: dict[int, int] = {}
        count = 0
        last_end = self._last_end
        problems = self.problems
        while True:
            try:
                for record in reader:
                    end = reader.line_num + offset
                    start = last_end + 1
                    self._last_end = last_end = end
                    # The fast check: the usual row passes it and is yielded right here.
                    if (
                        len(record) == ncols
                        and start == end
                        and not self._controls
                        and (spill_at == ncols or not any(record[spill_at:]))
                    ):
                        serial = record[serial_at]
                        product = record[product_at]
                        cell = record[urls_at]
                        if "," in cell:
                            urls = [u for u in map(str.strip, cell.split(",")) if u]
                        else:
                            cell = cell.strip()
                            urls = [cell] if cell else []
                        if (
                            serial.isdigit()
                            and serial.isascii()
                            and product
                            and not product.isspace()
                            and 0 < len(urls) <= max_urls
                        ):
                            for url in urls:
                                if len(url) > max_length or plain_url(url) is None:
                                    break
                            else:
                                number = int(serial)
                                if number and number not in seen:
                                    count += 1
                                    if count > max_rows:
                                        self._problem(_too_many_rows(start, max_rows))
                                        return
                                    seen[number] = start
                                    if serial[0] == "0":
                                        self._written[number] = serial
                                    yield Row(start, tuple(record), tuple(urls))
                                    continue
                    # The careful check: names every problem, or accepts the row.
                    if not any(not c.isspace() for c in record if c):
                        continue  # a blank line, or one of separators only
                    count += 1
                    if count > max_rows:
                        self._problem(_too_many_rows(start, max_rows))
                        return
                    row = self._check_record(record, start, end, header, seen)
                    if row is not None:
                        yield row
                    if len(problems) >= MAX_PROBLEMS:
                        self._problem(_too_many_problems(start))
                        return
                break
            except csv.Error:
                end = reader.line_num + offset
                if len(self._record_text(last_end + 1, end)) > self._cap:
                    raise _Runaway(end) from None  # csv's field limit: a quote left open
                self._problem(self._quote_problem(last_end + 1, end, header))
                self._last_end = last_end = end
                count += 1
                if len(problems) >= MAX_PROBLEMS:
                    self._problem(_too_many_problems(end))
                    return
        if count == 0 and not problems:
            self._problem(CsvProblem(header.line + 1, "", "the CSV has a header but no data rows"))

    def _check_header(self, cells: list[str], line: int) -> Header | None:
        """The header, or None when a required column is missing. A duplicate name or a
        control character is a problem, but the rows are still checked.

        Required columns are looked for first: a line without them is not our header, and
        nothing of it is quoted back (see ``_missing_columns``).
        """
        names = [_normalise(c) for c in cells]
        positions = {key: i for i, key in reversed(list(enumerate(names)))}
        missing = [c for c in COLUMNS if _normalise(c) not in positions]
        if missing:
            self._problem(self._missing_columns(cells, missing, line))
            return None
        for name in cells:
            control = _CONTROL.search(name)
            if control:
                self._problem(CsvProblem(line, name, _control_message(control, "the header cell")))
        first_at: dict[str, int] = {}
        for index, (name, normalised) in enumerate(zip(cells, names, strict=True)):
            if not name.strip():
                continue  # columns without a name may repeat (trailing separators)
            known = normalised in _REQUIRED or normalised == _OUTPUT_NAME
            key = normalised if known else name.strip()
            if key not in first_at:
                first_at[key] = index
                continue
            other = first_at[key]
            canonical = _REQUIRED.get(key, OUTPUT) if known else name.strip()
            self._problem(
                CsvProblem(
                    line,
                    canonical,
                    f"the header names the column {_excerpt(canonical, 36)} twice: column "
                    f"{other + 1} {_excerpt(cells[other], 36)} and column {index + 1} "
                    f"{_excerpt(name, 36)}; "
                    "keep one, or rename the other",
                )
            )
        return Header(
            columns=tuple(cells),
            separator=self._separator,
            encoding=self._encoding,
            serial=positions[_normalise(SERIAL)],
            product=positions[_normalise(PRODUCT)],
            urls=positions[_normalise(URLS)],
            output=positions.get(_OUTPUT_NAME),
            line=line,
        )

    def _missing_columns(self, cells: list[str], missing: list[str], line: int) -> CsvProblem:
        # What was found is counted, never quoted: a file that is not the expected CSV
        # may be anything (another team's object, a secret), and its first line must not
        # travel into a status, an Event or errors.csv.
        named = sum(1 for c in cells if c.strip())
        found = f"{named} named column{'s' if named != 1 else ''}" if named else "no names"
        message = (
            f"the header needs the columns {_quoted_names(COLUMNS)}; missing: "
            f"{_quoted_names(missing)} (found {found}, read with the "
            f"{_separator_name(self._separator)} separator); case, spacing and punctuation "
            "do not matter"
        )
        if any(c.strip().isdigit() for c in cells) and any(_URL_LIKE.match(c) for c in cells):
            message += f"; line {line} looks like a data row: is the header line missing?"
        return CsvProblem(line, ", ".join(missing), message)

    def _check_record(
        self, record: list[str], start: int, end: int, header: Header, seen: dict[int, int]
    ) -> Row | None:
        """Every problem of one non-blank record, or the row when it has none."""
        if end > start and sum(map(len, record)) > self._cap:
            # Read whole from one large piece of text; read in smaller pieces it would
            # have been stopped at the cap. Either way the same: stop here.
            raise _Runaway(start, end)
        before = len(self.problems)
        columns = header.columns
        fields = self._fields(record, start, header)
        if fields is None:
            return None
        cells, folded = fields
        bad: set[int] = set()
        for index, cell in enumerate(cells):
            control = _CONTROL.search(cell)
            if control:
                bad.add(index)
                self._problem(
                    CsvProblem(start, columns[index], _control_message(control, "this cell"))
                )
        if end > start:  # quoted cells span lines: fine for text, not for serials or URLs
            opened = start
            for index, cell in enumerate(cells):
                breaks = _line_breaks(cell)
                if breaks and index in (header.serial, header.urls) and index not in bad:
                    bad.add(index)
                    self._problem(
                        self._spanning_cell(cell, columns[index], start, opened, breaks, header)
                    )
                opened += breaks
        if header.serial not in bad:
            self._check_serial(cells[header.serial], columns[header.serial], start, seen)
        if header.product not in bad and not cells[header.product].strip():
            self._problem(CsvProblem(start, columns[header.product], "the product name is empty"))
        urls: list[str] = []
        if header.urls not in bad:
            urls = split_urls(cells[header.urls])
            column = columns[header.urls]
            limit = self._limits.max_urls_per_row
            if not urls:
                self._problem(CsvProblem(start, column, "no image URL in this row"))
            elif len(urls) > limit:
                self._problem(
                    CsvProblem(
                        start, column, f"{len(urls)} URLs, more than the limit of {limit} per row"
                    )
                )
            else:
                max_length = self._limits.max_url_length
                for url in urls:
                    if len(url) <= max_length and _PLAIN_URL.fullmatch(url):
                        continue  # surely fine: skip the slower full check
                    reason = check_url(url, self._limits)
                    if reason:
                        self._problem(CsvProblem(start, column, reason))
        if len(self.problems) != before:
            return None
        return Row(start, tuple(cells), tuple(urls), folded)

    def _fields(
        self, record: list[str], start: int, header: Header
    ) -> tuple[list[str], bool] | None:
        """The row's cells, one per header column, and whether an unquoted URL list was
        folded into the URL cell; None (with a problem) when the fields do not fit."""
        columns = header.columns
        ncols, count, at = len(columns), len(record), header.urls
        if count < ncols:
            missing = [c for c in columns[count:] if c.strip()]
            if missing:
                self._problem(
                    CsvProblem(
                        start,
                        ", ".join(missing),
                        f"this row has {_count(count, 'field')} but the header has "
                        f"{_count(ncols, 'column')}: no value for {_quoted_names(missing)}; "
                        "give every column a field, an empty one if need be",
                    )
                )
                return None
        used = count
        while used > ncols and not record[used - 1].strip():
            used -= 1  # trailing empty fields hold nothing
        # When the URL column is the last one with a name, URLs to its right (in columns
        # without a name, or past the header) are taken as an unquoted URL list.
        urls_last = at == self._last_named
        spill = record[at + 1 : used] if urls_last else record[ncols:used]
        extra = [f for f in spill if f.strip()]
        if not extra:
            return record[:ncols], False
        if urls_last and _URL_LIKE.match(record[at]) and all(_URL_LIKE.match(f) for f in extra):
            self._fold_notice(start, columns[at], len(extra))
            cells = [*record[:at], ",".join(record[at:used])]
            return cells + [""] * (ncols - len(cells)), True
        if used <= ncols:
            return record[:ncols], False  # text in columns without a name: kept, not read
        separator = _separator_name(header.separator)
        hint = f"a cell that contains the {separator} must be in double quotes"
        if urls_last and not _URL_LIKE.match(record[at]):
            hint += f" (the {columns[at]!r} field is not a URL here: "
            hint += f"an earlier cell probably holds a {separator})"
        elif urls_last:
            hint += f" (the fields after {columns[at]!r} are not all URLs)"
        self._problem(
            CsvProblem(
                start,
                "",
                f"this row has {_count(used, 'field')} but the header has "
                f"{_count(ncols, 'column')}; {hint}",
            )
        )
        return None

    def _check_serial(self, cell: str, column: str, line: int, seen: dict[int, int]) -> None:
        text = cell.strip()
        if not text:
            self._problem(CsvProblem(line, column, "the serial number is empty"))
            return
        if not (text.isascii() and text.isdigit()) or int(text) == 0:
            self._problem(
                CsvProblem(line, column, f"{_excerpt(text)} is not a positive whole number")
            )
            return
        number = int(text)
        if number not in seen:
            seen[number] = line
            if text != str(number):
                self._written[number] = text
            return
        earlier = self._written.get(number, str(number))
        message = f"serial number {text} repeats line {seen[number]}"
        if earlier != text:
            message += f", where it is written {earlier} (serial numbers are compared as numbers)"
        self._problem(CsvProblem(line, column, message))

    def _spanning_cell(
        self, cell: str, column: str, start: int, opened: int, breaks: int, header: Header
    ) -> CsvProblem:
        """A serial or URL cell that spans lines: a quote left open, or line-separated URLs."""
        rest = cell[min(i for i in (cell.find("\n"), cell.find("\r")) if i >= 0) :]
        if re.search(r"[\r\n][ \t]*[0-9]+[ \t]*" + re.escape(header.separator), rest):
            message = (
                f"a quote opened on line {opened} is not closed where this cell should end: "
                f"the cell runs on to line {opened + breaks} and takes in what look like "
                f"further rows; add the closing quote on line {opened}"
            )
        elif column == header.columns[header.urls]:
            message = (
                f"this cell spans lines {opened} to {opened + breaks}; "
                "separate URLs with commas, not line breaks"
            )
        else:
            message = (
                f"this cell spans lines {opened} to {opened + breaks}; a serial number is one line"
            )
        return CsvProblem(start, column, message)

    def _quote_problem(self, start: int, end: int, header: Header | None) -> CsvProblem:
        """The problem of a record csv refused (strict quoting): which quote, where."""
        trouble = _quote_trouble(self._record_text(start, end), self._separator)
        if trouble is None:
            return CsvProblem(start, "", f"line {end} cannot be read as CSV")
        column = _column_name(header, trouble.field)
        opened = start + trouble.opened
        if trouble.closed is None:
            tail = ""
            if end > opened + 1:
                tail = f"; lines {opened + 1} to {end} were read as part of this cell"
            elif end > opened:
                tail = f"; line {end} was read as part of this cell"
            message = (
                f"a quote opened on line {opened} is never closed{tail}; add the closing quote"
            )
        elif trouble.closed == trouble.opened:
            if trouble.after.isspace():
                message = "space after the closing quote of this cell; remove it"
            else:
                message = (
                    f"text after the closing quote of this cell ({_excerpt(trouble.after)}); "
                    'a quote inside a quoted cell is written twice ("")'
                )
        else:
            closed = start + trouble.closed
            message = (
                f"a quote opened on line {opened} closes only on line {closed}, followed by "
                f"more text; add the missing closing quote on line {opened} (lines "
                f"{opened + 1} to {closed} were read as part of this cell)"
            )
        return CsvProblem(start, column, message)

    def _runaway_problem(self, line: int, end: int | None) -> CsvProblem:
        if end is None:  # the record is still open: all that was read of it
            start = self._last_end + 1
            text = self._record_text(start, 1 << 62) + self._carry
        else:  # a complete record, seen as too long only once read
            start = line
            text = self._record_text(start, end)[: self._cap]
        trouble = _quote_trouble(text, self._separator)
        if trouble is not None and trouble.closed is None:
            opened = start + trouble.opened
            return CsvProblem(
                start,
                _column_name(self.header, trouble.field),
                f"a quote opened on line {opened} is not closed within {self._cap} "
                "characters; add the closing quote (reading stopped here)",
            )
        return CsvProblem(
            line, "", f"line {line} is longer than {self._cap} characters; reading stopped here"
        )

    def _column_at(self, partial: str) -> str:
        """The column a partial line (a record's start) has reached."""
        if self.header is None:
            return ""
        fields = next(csv.reader([partial], delimiter=self._separator), [""])
        return _column_name(self.header, len(fields) - 1)

    def _fold_notice(self, line: int, column: str, extra: int) -> None:
        self._folded += 1
        if self._folded == 1:
            self._first_folded = line
        if self._folded <= MAX_NOTICES_PER_KIND:
            fields = "1 more field" if extra == 1 else f"{extra} more fields"
            self.notices.append(
                CsvProblem(
                    line,
                    column,
                    f"{fields} after the {column!r} cell read as further URLs of this row; "
                    'quote the cell ("url1,url2") so every spreadsheet reads it as one cell',
                )
            )

    def _problem(self, problem: CsvProblem) -> None:
        self.problems.append(problem)


_EXPORT_HINT = (
    'save it as "CSV UTF-8" (Excel: Save As, "CSV UTF-8 (Comma delimited)"; '
    'LibreOffice: character set "Unicode (UTF-8)")'
)
_EMPTY = "the CSV is empty; expected a header line naming the columns " + _quoted_names(COLUMNS)
_ONLY_BLANK = (
    "the CSV has no header: it holds only blank lines; expected a header line naming "
    "the columns " + _quoted_names(COLUMNS)
)


def _detect_separator(line: str) -> str:
    """The separator that yields the most required columns from the header line;
    comma on a tie."""
    best, score = ",", -1
    for candidate in SEPARATORS:
        cells = next(csv.reader([line], delimiter=candidate), [])
        found = len({_normalise(c) for c in cells} & _REQUIRED.keys())
        if found > score:
            best, score = candidate, found
    return best


def _column_name(header: Header | None, index: int) -> str:
    if header is None or index >= len(header.columns):
        return ""
    return header.columns[index]


def _too_many_rows(line: int, limit: int) -> CsvProblem:
    return CsvProblem(line, "", f"more than {limit} rows (the limit); stopped here")


def _too_many_problems(line: int) -> CsvProblem:
    return CsvProblem(
        line, "", f"more than {MAX_PROBLEMS} problems; checking stopped at line {line}"
    )


def parse(chunks: Iterable[bytes], limits: CsvLimits, problems: list[CsvProblem]) -> Iterator[Row]:
    """Yield every valid row; append every problem found to ``problems`` at the end."""
    reader = CsvReader(chunks, limits)
    yield from reader.rows()
    problems.extend(reader.problems)
