"""How fast the CSV reader validates, and how much memory it holds, on generated files.

Run ``python -m tests.bench.bench_csv``. No cluster: the reader is pure, so this times
``CsvReader.rows()`` alone over 64 KiB chunks of an in-memory file (the operator's
source chunk size), best of three runs, and reports rows/s. Peak memory is the peak of
Python allocations (tracemalloc) while reading, in a separate run (tracing slows the
reader): the file itself is excluded, so the figure is what the reader holds. Files of
the same row count but longer lines show whether that peak follows the file's size
(it should not) or only the row count (the serial-number index does).
"""

from __future__ import annotations

import argparse
import codecs
import gc
import platform
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence

from imagebatch_operator.csvinput import CsvLimits, CsvReader

CHUNK = 64 * 1024


def product_csv(
    rows: int,
    *,
    separator: str = ",",
    quote_lists: bool = True,
    name_length: int = 24,
    seed: int = 1,
) -> str:
    """A CSV as an export writes it: CRLF, 1 or 2 URLs per row, a product name."""
    pick = random.Random(seed)
    lines = [separator.join(("S. No.", "Product Name", "Input Image Urls")) + "\r\n"]
    for serial in range(1, rows + 1):
        urls = [
            f"https://img{pick.randint(1, 9)}.example.com/p/{pick.randint(0, 10**9):09d}-{i}.jpg"
            for i in range(pick.choice((1, 2)))
        ]
        cell = ",".join(urls)
        if len(urls) > 1 and quote_lists and separator == ",":
            cell = f'"{cell}"'  # a list needs quotes only where the comma separates cells
        name = f"Product {serial} " + "x" * max(0, name_length - 9 - len(str(serial)))
        lines.append(separator.join((str(serial), name, cell)) + "\r\n")
    return "".join(lines)


def chunks(data: bytes) -> Iterator[bytes]:
    return (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))


def read_all(data: bytes, limits: CsvLimits) -> tuple[int, int]:
    reader = CsvReader(chunks(data), limits)
    count = sum(1 for _ in reader.rows())
    return count, len(reader.problems)


def rows_per_second(data: bytes, limits: CsvLimits, runs: int = 3) -> tuple[float, int, int]:
    best = float("inf")
    count = problems = 0
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        count, problems = read_all(data, limits)
        best = min(best, time.perf_counter() - start)
    return count / best, count, problems


def peak_bytes(data: bytes, limits: CsvLimits) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        read_all(data, limits)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    rows: int = args.rows
    limits = CsvLimits(max_rows=max(rows, 400_000))
    utf8: Callable[[str], bytes] = str.encode
    cases: list[tuple[str, bytes]] = [
        ("comma, quoted URL lists (the usual export)", utf8(product_csv(rows))),
        ("semicolon (European Excel)", utf8(product_csv(rows, separator=";"))),
        (
            "UTF-16 tab (Excel Unicode Text)",
            codecs.BOM_UTF16_LE + product_csv(rows, separator="\t").encode("utf-16-le"),
        ),
        ("unquoted URL lists (folded, careful path)", utf8(product_csv(rows, quote_lists=False))),
    ]
    print(
        f"# CSV reader, {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}\n"
    )
    print("| file | MiB | rows | problems | rows/s |")
    print("|---|---|---|---|---|")
    for name, data in cases:
        speed, count, problems = rows_per_second(data, limits)
        print(f"| {name} | {len(data) / 2**20:.1f} | {count} | {problems} | {speed:,.0f} |")
    print("\n| rows | line length | MiB | peak Python memory while reading, MiB |")
    print("|---|---|---|---|")
    for count, name_length in ((rows // 4, 24), (rows, 24), (rows, 400), (rows * 4, 24)):
        data = utf8(product_csv(count, name_length=name_length))
        peak = peak_bytes(data, limits)
        line = len(data) // (count + 1)
        print(f"| {count} | ~{line} B | {len(data) / 2**20:.1f} | {peak / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
