"""What the plugin prints: pure functions from an ImageBatch (a dict, as kubectl gives it)
to text. Nothing here runs a command or reads the clock; ``now`` is passed in.

The status is read the way kstatus and ``kubectl wait`` read it: a status whose
``observedGeneration`` is behind ``metadata.generation`` describes an older spec, so
the batch is "not observed yet" whatever its phase says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

FINISHED = ("Succeeded", "Failed")
CONDITION_ORDER = (
    "Ready",
    "Validated",
    "Complete",
    "Failed",
    "Reconciling",
    "Stalled",
    "WebhookDelivered",
)


def _status(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    return batch.get("status") or {}


def _counts(batch: Mapping[str, Any], key: str) -> Mapping[str, int]:
    value = _status(batch).get(key)
    return value if isinstance(value, Mapping) else {}


def condition(batch: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for c in _status(batch).get("conditions") or []:
        if c.get("type") == type_:
            return c  # type: ignore[no-any-return]
    return {}


def observed(batch: Mapping[str, Any], generation: int | None = None) -> bool:
    """True when the status describes the spec of ``generation`` (default: the current one)."""
    wanted = generation if generation is not None else batch["metadata"].get("generation")
    return _status(batch).get("observedGeneration") == wanted


def finished(batch: Mapping[str, Any], generation: int | None = None) -> bool:
    """The run of that generation is over: Succeeded or Failed, as observed."""
    return observed(batch, generation) and _status(batch).get("phase") in FINISHED


def phase(batch: Mapping[str, Any]) -> str:
    """The stored phase, as ``kubectl get ib`` shows it ("Pending" before the first status)."""
    return str(_status(batch).get("phase") or "Pending")


# -- small formats -------------------------------------------------------------------


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """kubectl's age format (apimachinery's HumanDuration): 45s, 5m30s, 3h, 2d4h."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rest == 0 else f"{hours // 24 // 365}y{rest}d"
    return f"{hours // 24 // 365}y"


def age(value: str | None, now: datetime) -> str:
    when = parse_time(value)
    return human_duration((now - when).total_seconds()) if when else "<unknown>"


def human_bytes(count: int) -> str:
    """1023 B, 1.5 KiB, 12.3 MiB."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def bar(done: int, total: int, width: int = 24) -> str:
    """``[#########---------------]``; full when there is nothing to do."""
    filled = width if total <= 0 else min(width, done * width // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded as kubectl pads them: three spaces between, no trailing blanks."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("   ".join(cells).rstrip())
    return "\n".join(out)


# -- progress --------------------------------------------------------------------------


def progress_line(batch: Mapping[str, Any], generation: int, width: int = 24) -> str:
    """One line for ``--wait``: where the run of ``generation`` is, with a bar of images."""
    status = _status(batch)
    if not observed(batch, generation):
        return f"Pending      waiting for the operator to pick up generation {generation}"
    current = str(status.get("phase") or "Pending")
    ready = condition(batch, "Ready")
    if current in ("Pending", "Validating"):
        why = str(ready.get("message") or ready.get("reason") or "")
        return f"{current:<12} {why}".rstrip()
    images = _counts(batch, "images")
    shards = _counts(batch, "shards")
    total = int(images.get("total", 0))
    succeeded = int(images.get("succeeded", 0))
    failed = int(images.get("failed", 0))
    done = succeeded + failed
    percent = 100 if total == 0 else done * 100 // total
    shards_done = int(shards.get("succeeded", 0)) + int(shards.get("failed", 0))
    line = (
        f"{current:<12} images {bar(done, total, width)} {done}/{total} {percent:>3}%"
        f"  {failed} failed  shards {shards_done}/{int(shards.get('total', 0))}"
    )
    if shards.get("active"):
        line += f" ({shards['active']} running)"
    if ready.get("reason") == "Suspended":
        line += "  suspended"
    return line


def outcome_line(batch: Mapping[str, Any]) -> str:
    """The last line of ``--wait``: the phase and the Ready condition's message."""
    ready = condition(batch, "Ready")
    message = str(ready.get("message") or "")
    return f"{phase(batch)}: {message}" if message else phase(batch)


# -- one batch ------------------------------------------------------------------------


def _source(spec: Mapping[str, Any]) -> str:
    source = spec.get("source") or {}
    if "inline" in source:
        return f"inline ({len(str(source['inline']).encode())} bytes)"
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return f"ConfigMap {ref.get('name')} key {ref.get('key')}"
    if "s3" in source:
        return f"s3://{source['s3'].get('bucket')}/{source['s3'].get('key')}"
    if "url" in source:
        return str(source["url"]).split("?", 1)[0]
    return "<none>"


def _count_line(counts: Mapping[str, int], names: Sequence[tuple[str, str]]) -> str:
    if not counts:
        return "-"
    parts = [f"{counts.get('total', 0)} total"]
    parts += [f"{counts[key]} {word}" for key, word in names if key in counts]
    return ", ".join(parts)


def webhook_line(batch: Mapping[str, Any]) -> str:
    """The webhook's state from the WebhookDelivered condition and the delivery record."""
    spec_hook = (batch.get("spec") or {}).get("webhook")
    if not spec_hook:
        return "none configured"
    cond = condition(batch, "WebhookDelivered")
    record = _status(batch).get("webhook") or {}
    reason = str(cond.get("reason") or "Pending")
    parts = [reason]
    attempts = record.get("attempts")
    if attempts:
        parts.append(f"{attempts} attempt{'s' if attempts != 1 else ''}")
    if record.get("lastStatusCode"):
        parts.append(f"last answer HTTP {record['lastStatusCode']}")
    elif record.get("lastError"):
        parts.append(f"last error: {record['lastError']}")
    if record.get("deliveredTime"):
        parts.append(f"delivered {record['deliveredTime']}")
    elif record.get("nextAttemptTime"):
        parts.append(f"next attempt {record['nextAttemptTime']}")
    if record.get("id"):
        parts.append(f"webhook-id {record['id']}")
    line = ", ".join(parts)
    message = str(cond.get("message") or "")
    return f"{line} ({message})" if message and reason != "Delivered" else line


def summary(
    batch: Mapping[str, Any],
    now: datetime,
    failed_images: Sequence[Sequence[str]] = (),
    failed_note: str = "",
) -> str:
    """``status NAME``: everything a user asks about one batch, in reading order.

    ``failed_images`` are the first data lines of errors.csv (row, url, stage, reason)
    when the caller could read them; ``failed_note`` says why not, or where they are.
    """
    meta = batch["metadata"]
    status = _status(batch)
    generation = meta.get("generation")
    ready = condition(batch, "Ready")
    lines: list[tuple[str, str]] = [
        ("Name", str(meta.get("name"))),
        ("Namespace", str(meta.get("namespace"))),
    ]
    state = phase(batch)
    if ready.get("reason") and observed(batch):
        state += f" ({ready['reason']})"
    if ready.get("message") and observed(batch):
        state += f": {ready['message']}"
    lines.append(("Phase", state))
    if observed(batch):
        run = f"{status.get('run') or '-'} (generation {generation})"
    else:
        seen = status.get("observedGeneration")
        run = f"generation {generation} not observed yet" + (
            f" (status below is for generation {seen})" if seen else ""
        )
    lines.append(("Run", run))
    spec = batch.get("spec") or {}
    lines.append(("Source", _source(spec)))
    if spec.get("retry"):
        lines.append(("Retry", str(spec["retry"])))
    lines.append(
        (
            "Rows",
            _count_line(_counts(batch, "rows"), [("succeeded", "succeeded"), ("failed", "failed")]),
        )
    )
    lines.append(
        (
            "Images",
            _count_line(
                _counts(batch, "images"),
                [("succeeded", "succeeded"), ("failed", "failed"), ("skipped", "already stored")],
            ),
        )
    )
    lines.append(
        (
            "Shards",
            _count_line(
                _counts(batch, "shards"),
                [("succeeded", "succeeded"), ("failed", "failed"), ("active", "running")],
            ),
        )
    )
    sizes = status.get("bytes") or {}
    if sizes.get("input"):
        size_in, size_out = int(sizes["input"]), int(sizes.get("output", 0))
        line = f"{human_bytes(size_in)} in, {human_bytes(size_out)} out"
        saved = 100 - size_out * 100 // size_in
        lines.append(("Bytes", f"{line} ({saved}% smaller)" if saved > 0 else line))
    started = parse_time(status.get("startTime"))
    completed = parse_time(status.get("completionTime"))
    if started:
        ago = human_duration((now - started).total_seconds())
        lines.append(("Started", f"{status['startTime']} ({ago} ago)"))
    if completed:
        took = f" (took {human_duration((completed - started).total_seconds())})" if started else ""
        lines.append(("Completed", f"{status['completionTime']}{took}"))
    output = status.get("output") or {}
    for key, url_key, label in (("csv", "csvUrl", "Output"), ("errors", "errorsUrl", "Errors")):
        if output.get(key):
            lines.append((label, str(output[key])))
            if output.get(url_key):
                lines.append(("", str(output[url_key])))
    lines.append(("Webhook", webhook_line(batch)))
    width = max(len(label) for label, _ in lines) + 2
    text = [f"{label + ':' if label else '':<{width}}{value}" for label, value in lines]

    conditions = sorted(
        status.get("conditions") or [],
        key=lambda c: CONDITION_ORDER.index(c["type"]) if c.get("type") in CONDITION_ORDER else 99,
    )
    if conditions:
        text.append("Conditions:")
        rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        rows += [
            [
                str(c.get("type", "")),
                str(c.get("status", "")),
                str(c.get("reason", "")),
                age(c.get("lastTransitionTime"), now),
                str(c.get("message", "")),
            ]
            for c in conditions
        ]
        text += ["  " + line for line in table(rows).splitlines()]
    problems = status.get("validationErrors") or []
    if problems:
        text.append(f"CSV problems (first {len(problems)}; errors.csv has them all):")
        for p in problems:
            where = f"row {p.get('row')}"
            if p.get("column"):
                where += f", column {p['column']!r}"
            text.append(f"  {where}: {p.get('message', '')}")
    if failed_images:
        text.append(f"Failed images (errors.csv, first {len(failed_images)}):")
        rows = [["ROW", "URL", "STAGE", "REASON"], *[list(r[:4]) for r in failed_images]]
        text += ["  " + line for line in table(rows).splitlines()]
    if failed_note:
        text.append(failed_note)
    return "\n".join(text)


# -- many batches ---------------------------------------------------------------------


def batches_table(batches: Sequence[Mapping[str, Any]], now: datetime, namespaces: bool) -> str:
    """``status`` without a name: the columns of ``kubectl get ib``, plus the run."""
    header = ["NAME", "PHASE", "IMAGES", "FAILED", "SHARDS", "WEBHOOK", "REASON", "AGE"]
    if namespaces:
        header.insert(0, "NAMESPACE")
    rows = [header]
    for batch in sorted(
        batches, key=lambda b: (b["metadata"].get("namespace", ""), b["metadata"]["name"])
    ):
        status = _status(batch)
        images = _counts(batch, "images")
        row = [
            str(batch["metadata"]["name"]),
            phase(batch),
            str(status.get("imagesSummary") or "-"),
            str(images.get("failed", "-")),
            str(status.get("shardsSummary") or "-"),
            str(condition(batch, "WebhookDelivered").get("reason") or ""),
            str(condition(batch, "Ready").get("reason") or ""),
            age(batch["metadata"].get("creationTimestamp"), now),
        ]
        if namespaces:
            row.insert(0, str(batch["metadata"].get("namespace", "")))
        rows.append(row)
    return table(rows)


def utcnow() -> datetime:
    """The clock, for callers (kept here so the pure functions above never call it)."""
    return datetime.now(UTC)
