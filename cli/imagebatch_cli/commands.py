"""The commands: each gathers what it needs through kubectl (and the object store for
``results``), calls the pure parts (``submit``, ``render``) and prints.

Everything a user reads goes to stdout; progress redraws, notes and per-pod headers go
to stderr, so stdout stays what a script wants (``logs`` stays JSON lines for ``jq``).
Failures end with ``CliError`` and an exit code from ``errors``.
"""

from __future__ import annotations

import csv
import io
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from imagebatch_cli import download, render, submit
from imagebatch_cli.errors import CliError, ExitCode
from imagebatch_cli.kubectl import Kubectl, KubectlFailed
from imagebatch_cli.names import INDEX_LABEL, LABEL_RUN, RESOURCE, WORKER_CONTAINER
from imagebatch_cli.watch import Watcher, ended_error

# How often a terminal's progress line is redrawn while nothing changes (elapsed time).
_REDRAW_SECONDS = 1.0
# Lines of errors.csv shown by `status`.
_FAILED_SHOWN = 5


@dataclass
class Console:
    """Where output goes; ``tty`` decides whether progress redraws one line in place."""

    out: TextIO
    err: TextIO
    tty: bool

    @classmethod
    def system(cls) -> Console:
        return cls(sys.stdout, sys.stderr, sys.stderr.isatty())

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)


def _get(kubectl: Kubectl, name: str) -> dict[str, Any]:
    try:
        return kubectl.get_batch(name)
    except KubectlFailed as error:
        if error.not_found:
            where = f" in namespace {kubectl.namespace}" if kubectl.namespace else ""
            raise CliError(ExitCode.UNAVAILABLE, f"imagebatch {name!r} not found{where}") from error
        raise


# -- wait ------------------------------------------------------------------------------


def wait(
    kubectl: Kubectl, name: str, generation: int, timeout: float | None, console: Console
) -> ExitCode:
    """Show progress until the run of ``generation`` is over; its outcome as the exit code."""
    deadline = None if timeout is None else time.monotonic() + timeout
    started = time.monotonic()
    watcher = Watcher(kubectl, name).start()
    last_line = ""
    drawn = False
    batch: dict[str, Any] | None = None
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if drawn:
                    console.err.write("\n")
                raise CliError(
                    ExitCode.TIMEOUT,
                    f"gave up waiting after {render.human_duration(timeout or 0)}; "
                    f"the batch goes on: kubectl imagebatch status {name}",
                )
            try:
                event = watcher.events.get(
                    timeout=min(_REDRAW_SECONDS, remaining) if remaining else _REDRAW_SECONDS
                )
            except queue.Empty:
                event = None
            if event is not None:
                failed = ended_error(event)
                if failed is not None:
                    raise failed
                if event.type == "ENDED":
                    watcher.restart()
                    continue
                if event.type == "DELETED":
                    raise CliError(ExitCode.UNAVAILABLE, f"imagebatch {name!r} was deleted")
                batch = event.object
            if batch is None:
                continue
            line = render.progress_line(batch, generation)
            elapsed = render.human_duration(time.monotonic() - started)
            if console.tty:
                console.err.write(f"\r{line}  {elapsed}\x1b[K")
                console.err.flush()
                drawn = True
            elif line != last_line:
                console.note(line)
            last_line = line
            if render.finished(batch, generation):
                if drawn:
                    console.err.write("\n")
                console.say(render.outcome_line(batch))
                if render.phase(batch) == "Failed":
                    for problem in (batch.get("status") or {}).get("validationErrors") or []:
                        where = f"row {problem.get('row')}"
                        if problem.get("column"):
                            where += f", column {problem['column']!r}"
                        console.say(f"  {where}: {problem.get('message', '')}")
                    return ExitCode.FAILED
                return ExitCode.OK
    finally:
        watcher.close()


# -- submit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitOptions:
    file: str
    name: str | None
    quality: int | None
    format: str | None
    webhook: str | None
    wait: bool
    timeout: float | None


def _refuse_existing(kubectl: Kubectl, name: str) -> None:
    """Say so before anything is created when the name is taken (create checks again)."""
    try:
        existing = kubectl.get_batch(name)
    except KubectlFailed as error:
        if error.not_found:
            return
        raise
    namespace = existing["metadata"].get("namespace")
    raise CliError(
        ExitCode.UNAVAILABLE,
        f"imagebatch {name!r} already exists in {namespace}: give another --name, or run it "
        f"again with: kubectl imagebatch retry {name}",
    )


def run_submit(kubectl: Kubectl, options: SubmitOptions, console: Console) -> ExitCode:
    path = Path(options.file)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CliError(ExitCode.USAGE, f"cannot read {options.file}: {error.strerror}") from error
    name = options.name or submit.default_name(options.file)
    problem = submit.name_problem(name)
    if problem:
        raise CliError(ExitCode.USAGE, problem)
    checked = submit.check_csv(data)
    for line in submit.notice_lines(checked):
        console.note(line)
    if not checked.valid:
        console.say(submit.problems_report(options.file, checked))
        return ExitCode.FAILED
    try:
        placement = submit.place_csv(data)
    except ValueError as error:
        raise CliError(ExitCode.USAGE, f"{options.file}: {error}") from error
    manifest = submit.batch_manifest(
        name, placement, quality=options.quality, format=options.format, webhook=options.webhook
    )
    _refuse_existing(kubectl, name)
    configmap = None
    if placement.inline is None:
        configmap = kubectl.create(submit.configmap_manifest(name, placement))
    try:
        batch = kubectl.create(manifest)
    except KubectlFailed:
        if configmap is not None:  # no batch, so no CSV left behind for it
            try:
                kubectl.run("delete", "configmap", configmap["metadata"]["name"], "--wait=false")
            except KubectlFailed:
                pass
        raise
    where = "inline"
    if configmap is not None:
        cm_name = configmap["metadata"]["name"]
        where = f"ConfigMap {cm_name}"
        try:
            kubectl.patch("configmap", cm_name, submit.owner_patch(batch))
        except KubectlFailed as error:
            console.note(
                f"warning: ConfigMap {cm_name} is not owned by the batch ({error.message}); "
                "delete it yourself after the batch"
            )
    meta = batch["metadata"]
    console.say(
        f"imagebatch.imagebatch.dev/{meta['name']} created in {meta['namespace']}: "
        f"{checked.rows} rows, {checked.images} distinct images (CSV {where})"
    )
    if not options.wait:
        return ExitCode.OK
    return wait(kubectl, name, int(meta.get("generation", 1)), options.timeout, console)


# -- status ----------------------------------------------------------------------------


def _failed_images(batch: dict[str, Any]) -> tuple[list[list[str]], str]:
    """The first lines of errors.csv when they can be read, else a note saying where."""
    status = batch.get("status") or {}
    failed = int((status.get("images") or {}).get("failed") or 0)
    output = status.get("output") or {}
    if not failed or not (output.get("errorsUrl") or output.get("errors")):
        return [], ""
    name = batch["metadata"]["name"]
    hint = f"{failed} images failed: kubectl imagebatch results {name} downloads errors.csv"
    try:
        credentials = download.credentials_from_env(download.environment())
    except ValueError:
        credentials = None
    chunks: Any
    if output.get("errorsUrl"):
        chunks = download.http_chunks(str(output["errorsUrl"]), timeout=10)
    elif credentials is not None and output.get("errors"):
        chunks = download.s3_chunks(credentials, download.parse_s3_url(str(output["errors"])))
    else:
        return [], hint
    head = b""
    try:
        for chunk in chunks:
            head += chunk
            if head.count(b"\n") > _FAILED_SHOWN + 1 or len(head) > 256 * 1024:
                break
    except download.DownloadFailed:
        return [], hint
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    lines = head.decode("utf-8", "replace").splitlines()[: _FAILED_SHOWN + 1]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))[1:]
    note = hint if failed > len(rows) else ""
    return rows, note


def run_status(
    kubectl: Kubectl, name: str | None, all_namespaces: bool, console: Console
) -> ExitCode:
    now = render.utcnow()
    if name is None:
        args = ["get", RESOURCE] + (["--all-namespaces"] if all_namespaces else [])
        listing = kubectl.json(*args)
        items = listing.get("items") or []
        if not items:
            where = "any namespace" if all_namespaces else "this namespace"
            console.say(f"No ImageBatches found in {where}.")
            return ExitCode.OK
        console.say(render.batches_table(items, now, namespaces=all_namespaces))
        return ExitCode.OK
    batch = _get(kubectl, name)
    rows, note = _failed_images(batch)
    console.say(render.summary(batch, now, rows, note))
    if render.finished(batch) and render.phase(batch) == "Failed":
        return ExitCode.FAILED
    return ExitCode.OK


# -- results ---------------------------------------------------------------------------


def run_results(
    kubectl: Kubectl, name: str, directory: str | None, via: str, console: Console
) -> ExitCode:
    batch = _get(kubectl, name)
    status = batch.get("status") or {}
    output = status.get("output") or {}
    if not output:
        raise CliError(
            ExitCode.UNAVAILABLE,
            f"imagebatch {name!r} has no results yet (phase {render.phase(batch)})",
        )
    try:
        credentials = download.credentials_from_env(download.environment())
    except ValueError as error:
        raise CliError(ExitCode.USAGE, str(error)) from error
    target = Path(directory or name)
    target.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for key, url_key, filename in (
        ("csv", "csvUrl", "output.csv"),
        ("errors", "errorsUrl", "errors.csv"),
    ):
        if not output.get(key) and not output.get(url_key):
            if key == "csv":
                console.note(f"no output.csv: the batch is {render.outcome_line(batch)}")
            continue
        try:
            got = download.fetch(
                output.get(url_key), output.get(key), target / filename, credentials, via
            )
        except download.Missing as error:
            console.note(f"no {filename}: {error}")
            continue
        except download.DownloadFailed as error:
            raise CliError(ExitCode.UNAVAILABLE, f"{filename}: {error}") from error
        fetched += 1
        console.say(f"{got.path}  {got.size} bytes  from {got.via}")
    return ExitCode.OK if fetched else ExitCode.UNAVAILABLE


# -- retry -----------------------------------------------------------------------------


def run_retry(
    kubectl: Kubectl,
    name: str,
    wait_for: bool,
    timeout: float | None,
    force: bool,
    console: Console,
) -> ExitCode:
    batch = _get(kubectl, name)
    status = batch.get("status") or {}
    failed = int((status.get("images") or {}).get("failed") or 0)
    if not force:
        if not render.finished(batch):
            raise CliError(
                ExitCode.USAGE,
                f"imagebatch {name!r} is {render.phase(batch)}: a retry replaces the run in "
                "progress; wait for it to finish, or pass --force",
            )
        manager = submit.gitops_manager(batch)
        if manager:
            raise CliError(
                ExitCode.USAGE,
                f"imagebatch {name!r} is applied by {manager}, which would set spec.retry "
                "back (another run): change spec.retry in git instead, or pass --force",
            )
        if render.phase(batch) == "Succeeded" and failed == 0:
            run = status.get("run")
            console.say(f"imagebatch {name!r}: no image failed in run {run}; nothing to retry")
            return ExitCode.OK
    token = submit.retry_token()
    patched = kubectl.patch(RESOURCE, name, {"spec": {"retry": token}})
    generation = int(patched["metadata"].get("generation", 0))
    what = (
        f"{failed} failed image{'s' if failed != 1 else ''}"
        if failed
        else "the images without an output"
    )
    console.say(
        f"imagebatch.imagebatch.dev/{name} retry {token} (generation {generation}): "
        f"a new run for {what}"
    )
    if not wait_for:
        return ExitCode.OK
    return wait(kubectl, name, generation, timeout, console)


# -- logs ------------------------------------------------------------------------------


def shard_pods(pods: list[dict[str, Any]], shard: int | None) -> list[dict[str, Any]]:
    """The pods to show, by shard then age (a retried shard's earlier attempts first)."""

    def index(pod: dict[str, Any]) -> int:
        labels = pod["metadata"].get("labels") or {}
        annotations = pod["metadata"].get("annotations") or {}
        value = labels.get(INDEX_LABEL, annotations.get(INDEX_LABEL, "-1"))
        return int(value) if str(value).isdigit() else -1

    chosen = [p for p in pods if shard is None or index(p) == shard]
    return sorted(chosen, key=lambda p: (index(p), p["metadata"].get("creationTimestamp", "")))


def run_logs(
    kubectl: Kubectl, name: str, shard: int | None, follow: bool, console: Console
) -> ExitCode:
    batch = _get(kubectl, name)
    status = batch.get("status") or {}
    run = status.get("run")
    shards = int((status.get("shards") or {}).get("total") or 0)
    if not run:
        raise CliError(ExitCode.UNAVAILABLE, f"imagebatch {name!r} has no run yet")
    if shard is not None and not 0 <= shard < max(shards, 1):
        raise CliError(
            ExitCode.USAGE,
            f"run {run} has {shards} shard{'s' if shards != 1 else ''}"
            + (f" (0 to {shards - 1})" if shards else ""),
        )
    listing = kubectl.json("get", "pods", "-l", f"{LABEL_RUN}={run}")
    pods = shard_pods(listing.get("items") or [], shard)
    if not pods:
        why = (
            "no shard ran (every image was already stored, or the CSV was invalid)"
            if shards == 0
            else "its pods are gone or not started yet"
        )
        raise CliError(ExitCode.UNAVAILABLE, f"no shard pods for run {run}: {why}")
    if follow:
        pods = pods[-1:]  # the shard's latest attempt
    worst = ExitCode.OK
    for pod in pods:
        meta = pod["metadata"]
        index = (meta.get("labels") or {}).get(INDEX_LABEL, "?")
        phase = (pod.get("status") or {}).get("phase", "")
        console.note(f"==> shard {index}: pod {meta['name']} ({phase}) <==")
        args = ["logs", meta["name"], "-c", WORKER_CONTAINER] + (["--follow"] if follow else [])
        if kubectl.passthrough(args) != 0:
            worst = ExitCode.UNAVAILABLE
    return worst
