"""What ``submit`` sends: the CSV checked by the operator's own reader, then the objects.

Pure: bytes and options in, verdicts and manifests out. The CSV is read by
``imagebatch_operator.csvinput.CsvReader`` with the operator's default limits, so a
file refused here would be refused by the operator with the same row, column and
message, and nothing is created for it. An operator configured with other limits may
still refuse what passes here (or accept more); it validates again either way.

Where the CSV goes:

- at most ``INLINE_MAX_BYTES`` (the CRD's cap on ``spec.source.inline``) of UTF-8: in
  the ImageBatch itself, one object;
- otherwise a ConfigMap next to the batch (``data`` for UTF-8, ``binaryData`` for
  UTF-16), up to the API server's 1 MiB per ConfigMap. The ConfigMap is created first
  (the batch must not wait for a missing source) and then given an owner reference to
  the ImageBatch: the CSV lives exactly as long as the batch that reads it, including
  every ``retry`` (a new run reads the CSV again), and goes with it when the batch is
  deleted, with nothing left behind. It also carries the batch's label, so
  ``kubectl get cm -l imagebatch.dev/batch=NAME`` finds it should the owner reference
  be missing (the patch failed).
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

from imagebatch_cli.names import API_VERSION, KIND, LABEL_BATCH
from imagebatch_operator.csvinput import CsvLimits, CsvProblem, CsvReader

MANAGED_BY = "kubectl-imagebatch"

# The CRD's maxLength of spec.source.inline (characters; counted here in bytes, which
# is never fewer).
INLINE_MAX_BYTES = 32 * 1024
# The API server refuses a ConfigMap whose keys and values exceed 1 MiB together.
CONFIGMAP_MAX_BYTES = 1024 * 1024
CONFIGMAP_KEY = "products.csv"
# Shown problems; the rest are counted.
SHOWN_PROBLEMS = 20

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Checked:
    """The operator's verdict on a CSV, read locally."""

    rows: int
    images: int  # distinct URLs
    problems: tuple[CsvProblem, ...]
    notices: tuple[CsvProblem, ...]
    summary: str  # e.g. "separator ';'"; "" when nothing is noteworthy

    @property
    def valid(self) -> bool:
        return not self.problems


def check_csv(data: bytes, limits: CsvLimits | None = None) -> Checked:
    """Read the whole CSV as the operator will."""
    reader = CsvReader([data], limits or CsvLimits())
    rows = 0
    urls: set[str] = set()
    for row in reader.rows():
        rows += 1
        urls.update(row.urls)
    return Checked(rows, len(urls), tuple(reader.problems), tuple(reader.notices), reader.summary())


def problem_line(problem: CsvProblem) -> str:
    """One problem as the operator's status and errors.csv put it: row, column, message."""
    where = f"row {problem.row}" if problem.row else "the file"
    if problem.column:
        where += f", column {problem.column!r}"
    return f"{where}: {problem.message}"


def problems_report(file: str, checked: Checked) -> str:
    """What a user reads when the CSV is refused: every problem up to a bound, then a count."""
    count = len(checked.problems)
    lines = [f"{file} is not valid: {count} problem{'s' if count != 1 else ''}"]
    lines += [f"  {problem_line(p)}" for p in checked.problems[:SHOWN_PROBLEMS]]
    if count > SHOWN_PROBLEMS:
        lines.append(f"  ... and {count - SHOWN_PROBLEMS} more")
    lines.append("Nothing was created.")
    return "\n".join(lines)


def notice_lines(checked: Checked) -> list[str]:
    """Warnings that do not refuse the file (a semicolon separator, unquoted URL lists)."""
    return [
        f"note: line {n.row}: {n.message}" if n.row else f"note: {n.message}"
        for n in checked.notices
    ]


def default_name(file: str) -> str:
    """A batch name from the file name: ``Spring Catalog 2024.csv`` -> ``spring-catalog-2024``.

    At most 63 characters, so the name is also the value of the batch's pod label.
    """
    stem = PurePath(file).name
    if stem.lower().endswith(".csv"):
        stem = stem[:-4]
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return name[:63].rstrip("-")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an ImageBatch; None when it can."""
    if not name:
        return "a name is needed: give --name"
    if len(name) > 253:
        return f"{name[:40]!r}... is longer than 253 characters"
    if not _NAME.match(name):
        return (
            f"{name!r} is not a valid name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


@dataclass(frozen=True)
class Placement:
    """Where the CSV goes: inline, or a ConfigMap with ``data`` or ``binaryData``."""

    inline: str | None = None
    text: str | None = None  # ConfigMap data
    binary: bytes | None = None  # ConfigMap binaryData (not UTF-8)


def place_csv(data: bytes) -> Placement:
    """Inline when small and UTF-8, else a ConfigMap. Raises ValueError past a ConfigMap's size."""
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # UTF-16 (the reader accepted it): the bytes go as they are
    if text is not None and len(data) <= INLINE_MAX_BYTES:
        return Placement(inline=text)
    if len(data) + len(CONFIGMAP_KEY) > CONFIGMAP_MAX_BYTES:
        raise ValueError(
            f"the CSV is {len(data) / (1024 * 1024):.1f} MiB and a ConfigMap holds at most "
            "1 MiB: put it where the operator can read it (an http(s) URL or the object "
            "store) and apply an ImageBatch with spec.source.url or spec.source.s3"
        )
    if text is not None:
        return Placement(text=text)
    return Placement(binary=data)


def configmap_name(batch: str) -> str:
    """The CSV's ConfigMap: the batch's name with ``-csv`` (shortened to fit 253)."""
    return f"{batch[:249]}-csv"


def configmap_manifest(batch: str, placement: Placement) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(batch),
            "labels": {
                LABEL_BATCH: batch[:63],
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
    }
    if placement.text is not None:
        body["data"] = {CONFIGMAP_KEY: placement.text}
    elif placement.binary is not None:
        body["binaryData"] = {CONFIGMAP_KEY: base64.b64encode(placement.binary).decode()}
    else:
        raise ValueError("an inline CSV needs no ConfigMap")
    return body


def batch_manifest(
    name: str,
    placement: Placement,
    *,
    quality: int | None = None,
    format: str | None = None,
    webhook: str | None = None,
) -> dict[str, Any]:
    """The ImageBatch; unset options are left to the CRD's defaults."""
    if placement.inline is not None:
        source: dict[str, Any] = {"inline": placement.inline}
    else:
        source = {"configMapKeyRef": {"name": configmap_name(name), "key": CONFIGMAP_KEY}}
    spec: dict[str, Any] = {"source": source}
    compression = {k: v for k, v in (("quality", quality), ("format", format)) if v is not None}
    if compression:
        spec["compression"] = compression
    if webhook:
        spec["webhook"] = {"url": webhook}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
        "spec": spec,
    }


def owner_patch(batch: dict[str, Any]) -> dict[str, Any]:
    """Merge patch giving the CSV's ConfigMap the created ImageBatch as its owner."""
    meta = batch["metadata"]
    return {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"]}
            ]
        }
    }


def retry_token(now: datetime | None = None) -> str:
    """A fresh ``spec.retry`` value: when it was asked for, readable in a git diff."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(2)}"


# Labels and annotations by which a GitOps controller marks what it applied.
_GITOPS_MARKS = (
    ("annotations", "argocd.argoproj.io/tracking-id", "Argo CD"),
    ("labels", "kustomize.toolkit.fluxcd.io/name", "Flux"),
    ("labels", "helm.toolkit.fluxcd.io/name", "Flux"),
)
_GITOPS_MANAGERS = {
    "argocd-controller": "Argo CD",
    "argocd-application-controller": "Argo CD",
    "kustomize-controller": "Flux",
    "helm-controller": "Flux",
}


def gitops_manager(batch: dict[str, Any]) -> str | None:
    """The GitOps tool that applies this batch, if its marks or field managers say so."""
    meta = batch.get("metadata") or {}
    for where, key, tool in _GITOPS_MARKS:
        if key in (meta.get(where) or {}):
            return tool
    for entry in meta.get("managedFields") or []:
        manager = _GITOPS_MANAGERS.get(str(entry.get("manager", "")))
        if manager is not None:
            return manager
    return None
