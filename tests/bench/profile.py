"""Where a worker's CPU goes: stacks charged with CPU time, sorted into the costs we look for.

``record(command, env, out)`` runs a worker under ``cpu_sampler`` (each thread's CPU
clock charged to the Python stack it is in; a thread in C, the codec or a socket call,
charges the frame that called it). ``categorize`` sorts every stack into one of the
costs the worker issue asks about (thread hand-over, log lines, hashing, metadata
dicts, buffer copies, the storage client's signing and request building, the result
manifest, the codec and the Python around it), and ``flamegraph_svg`` draws the
stacks as a flame graph. A stack counts under the first cost it matches, so a socket
wait inside the storage client is the storage client's. ``load`` also reads py-spy's
raw output (samples instead of microseconds).
"""

from __future__ import annotations

import html
import linecache
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str  # as py-spy prints it: relative to sys.path, e.g. imagebatch_worker/runner.py
    line: int
    text: str  # the source line, when it could be found

    @property
    def where(self) -> str:
        return f"{self.function} ({self.file})"


@dataclass
class Profile:
    """Folded stacks (root first) and their weights, ``unit`` seconds each."""

    stacks: Counter[tuple[Frame, ...]] = field(default_factory=Counter)
    unit: float = 1e-6  # the sampler's weights are microseconds of CPU

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    @property
    def seconds(self) -> float:
        return self.samples * self.unit


SAMPLER = Path(__file__).with_name("cpu_sampler.py")


def record(
    worker_script: str, arguments: Sequence[str], env: Mapping[str, str], out: Path
) -> subprocess.CompletedProcess[str]:
    """Run a worker build under the CPU sampler, folded stacks into ``out``.

    The sampler runs in the interpreter next to ``worker_script``, so it profiles the
    build that script belongs to.
    """
    python = Path(worker_script).parent / "python"
    return subprocess.run(
        [str(python), str(SAMPLER), str(out), *arguments],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=1800,
    )


def load(path: Path, source_roots: Sequence[Path], unit: float = 1e-6) -> Profile:
    """Read folded stacks; look source lines up under ``source_roots``."""
    profile = Profile(unit=unit)
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(_frame(part, source_roots) for part in stack.split(";") if part)
        profile.stacks[frames] += int(count)
    return profile


def _frame(text: str, roots: Sequence[Path]) -> Frame:
    match = _FRAME.match(text)
    if match is None:
        return Frame(text, "", 0, "")
    file, line = match["file"], int(match["line"])
    source = ""
    for root in roots:
        candidate = root / file
        if candidate.exists():
            source = linecache.getline(str(candidate), line).strip()
            break
    return Frame(match["function"], file, line, source)


# -- categories ---------------------------------------------------------------------

_COPY_LINE = re.compile(r"bytes\(body\)|\+= chunk|\.join\(chunks\)|os\.pread|BytesIO\(data\)")


def _any(frames: Sequence[Frame], test: Callable[[Frame], bool]) -> bool:
    return any(test(frame) for frame in frames)


def _in(*files: str) -> Callable[[Frame], bool]:
    return lambda frame: any(part in frame.file for part in files)


def _named(*names: str) -> Callable[[Frame], bool]:
    return lambda frame: any(name in frame.function for name in names)


# First match wins; each rule looks at the whole stack, leaf last.
CATEGORIES: list[tuple[str, Callable[[Sequence[Frame]], bool]]] = [
    (
        "start-up: interpreter, imports, settings, manifest",
        lambda s: (
            len(s) == 1
            or _any(s, _named("_find_and_load", "_load_manifest", "from_env", "_first_attempt"))
        ),
    ),
    (
        "result manifest and summary",
        lambda s: (
            _any(s, _named("ShardResult.to_json", "ShardRunner._summary", "asdict"))
            and not _any(s, _named("JsonLog.emit"))
        ),
    ),
    ("JSON log line per image", lambda s: _any(s, _named("JsonLog.emit", "_log_image"))),
    (
        "hashing: payload SHA-256 and signature HMACs",
        lambda s: (
            _any(s, _named("sha256_hash", "md5sum_hash", "_payload_sha256", "HMAC"))
            or _any(s, _in("hmac.py", "hashlib.py"))
            or _any(s[-1:], lambda f: "sha256" in f.text or "md5" in f.text or "hmac" in f.text)
        ),
    ),
    (
        "buffer copies: body, encoded bytes, upload",
        lambda s: (
            _any(s[-1:], lambda f: bool(_COPY_LINE.search(f.text)))
            or _any(s, _named("read_part_data"))
        ),
    ),
    (
        "metadata dicts: output metadata, S3 headers",
        lambda s: (
            _any(s, _named("_metadata", "genheaders", "normalize_headers"))
            or _any(s, _in("minio/helpers.py"))
        ),
    ),
    (
        "threads handing work over (queues, futures, wake-ups)",
        lambda s: _any(s[-3:], _in("threading.py", "queue.py", "concurrent/futures")),
    ),
    (
        "storage client: signing, request, response, its socket",
        lambda s: (
            _any(s, _in("imagebatch_common/storage.py", "minio/", "urllib3/"))
            and not _any(s, _in("imagebatch_common/fetch.py"))
        ),
    ),
    (
        "download: URL guard, HTTP client, body, its socket",
        lambda s: _any(s, _in("imagebatch_common/fetch.py", "urlguard.py", "requests/")),
    ),
    (
        "codec: decode, convert, encode (C, in Pillow)",
        lambda s: (
            _any(s[-1:], _in("PIL/"))
            and _any(s[-1:], _named("load", "_encode_tile", "_save", "convert", "paste", "resize"))
        ),
    ),
    (
        "compress(): Python around the codec",
        lambda s: _any(s, _in("imagebatch_worker/compress.py", "PIL/")),
    ),
    ("pipeline and result records", lambda s: _any(s, _in("imagebatch_worker/runner.py"))),
]
OTHER = "other (interpreter, GC, unattributed)"


def categorize(profile: Profile) -> dict[str, int]:
    """Samples per category, in the order of ``CATEGORIES`` (then ``OTHER``)."""
    counts = dict.fromkeys([name for name, _ in CATEGORIES] + [OTHER], 0)
    for frames, samples in profile.stacks.items():
        for name, test in CATEGORIES:
            if test(frames):
                counts[name] += samples
                break
        else:
            counts[OTHER] += samples
    return counts


# -- flame graph ----------------------------------------------------------------------

_WIDTH = 1200
_ROW = 16


@dataclass
class _Node:
    name: str
    samples: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def flamegraph_svg(profile: Profile, title: str) -> str:
    """A flame graph (root at the bottom) of ``profile`` as a standalone SVG document."""
    root = _Node("all")
    for frames, samples in profile.stacks.items():
        node = root
        node.samples += samples
        for frame in frames:
            node = node.children.setdefault(frame.where, _Node(frame.where))
            node.samples += samples
    depth = _depth(root)
    height = (depth + 3) * _ROW
    total = max(root.samples, 1)
    rects: list[str] = []

    def draw(node: _Node, x: float, level: int) -> None:
        width = node.samples / total * _WIDTH
        if width < 0.5:
            return
        y = height - (level + 2) * _ROW
        share = node.samples / total
        hue = 20 + (hash(node.name) % 40)
        label = html.escape(node.name)
        rects.append(
            f"<g><title>{label} ({node.samples} samples, {share:.1%})</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{_ROW - 1}" '
            f'fill="hsl({hue},80%,60%)"/>'
            + (
                f'<text x="{x + 3:.1f}" y="{y + 12}">{html.escape(node.name[: int(width / 7)])}'
                "</text>"
                if width > 40
                else ""
            )
            + "</g>"
        )
        child_x = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, child_x, level + 1)
            child_x += child.samples / total * _WIDTH

    draw(root, 0.0, 0)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        'font-family="monospace" font-size="11">'
        f'<text x="4" y="14" font-size="13">{html.escape(title)}</text>'
        + "".join(rects)
        + "</svg>\n"
    )


def _depth(node: _Node) -> int:
    return 1 + max((_depth(child) for child in node.children.values()), default=0)
