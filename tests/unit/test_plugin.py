"""``kubectl imagebatch``'s pure parts: arguments, what submit sends, what is printed.

The commands themselves run against the real local cluster in tests/e2e/test_plugin.py.
"""

from __future__ import annotations

import argparse
import base64
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from imagebatch_cli import download, main, names, render, submit
from imagebatch_cli.commands import shard_pods
from imagebatch_cli.kubectl import Kubectl
from imagebatch_cli.watch import JsonStream
from imagebatch_operator import plan
from imagebatch_operator.csvinput import CsvLimits

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
HEADER = "S. No.,Product Name,Input Image Urls\n"
A, B = "http://img.test/a.jpg", "http://img.test/b.jpg"


# -- arguments -----------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return main.build_parser().parse_args(list(argv))


def test_cluster_flags_go_before_or_after_the_command() -> None:
    after = parse("status", "x", "-n", "team-a", "--context", "prod", "--kubeconfig", "k")
    before = parse("-n", "team-a", "--context", "prod", "--kubeconfig", "k", "status", "x")
    for args in (after, before):
        assert (args.namespace, args.context, args.kubeconfig) == ("team-a", "prod", "k")
    plain = parse("status")
    assert (plain.namespace, plain.context, plain.kubeconfig) == (None, None, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["submit", "p.csv", "--quality", "0"], "quality is 1", id="quality 0"),
        pytest.param(["submit", "p.csv", "--quality", "x"], "not a whole number", id="quality x"),
        pytest.param(["submit", "p.csv", "--format", "gif"], "invalid choice", id="format"),
        pytest.param(["submit", "p.csv", "--timeout", "5m"], "--timeout needs --wait", id="t"),
        pytest.param(["submit", "p.csv", "--wait", "--timeout", "soon"], "not a duration", id="d"),
        pytest.param(["logs", "b", "--follow"], "--follow needs --shard", id="follow"),
        pytest.param(["logs", "b", "--shard", "-1"], "a shard is a number", id="shard"),
        pytest.param(["status", "b", "-A"], "do not go together", id="name and -A"),
        pytest.param(["results"], "required: NAME", id="no name"),
        pytest.param(["frobnicate"], "invalid choice", id="unknown command"),
        pytest.param([], "required: COMMAND", id="no command"),
    ],
)
def test_usage_errors_exit_2_naming_the_problem(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main.run(argv, _console())
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kubectl imagebatch")
    assert message in err


@pytest.mark.parametrize("command", ["submit", "status", "results", "retry", "logs"])
def test_every_command_has_help_with_kubectl_usage_and_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main.run([command, "--help"], _console())
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kubectl imagebatch {command}")
    assert "-n NAMESPACE, --namespace NAMESPACE" in out and "--context" in out
    assert "4    gave up waiting (--timeout)" in out


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert main.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "m", "0s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        main.parse_duration(text)


@pytest.mark.parametrize(
    ("kubectl", "expected"),
    [
        (Kubectl(), ["kubectl", "get", "pods"]),
        (
            Kubectl(kubeconfig="/k", context="prod", namespace="team-a"),
            [
                *("kubectl", "--kubeconfig", "/k", "--context", "prod"),
                *("--namespace", "team-a", "get", "pods"),
            ],
        ),
    ],
)
def test_the_users_flags_are_handed_to_kubectl(kubectl: Kubectl, expected: list[str]) -> None:
    assert kubectl.argv("get", "pods") == expected


# -- submit: the CSV and the objects ---------------------------------------------------


def test_the_csv_is_judged_by_the_operators_own_reader() -> None:
    good = submit.check_csv(f'{HEADER}1,SKU1,"{A},{B}"\n2,SKU2,{A}\n'.encode())
    assert (good.valid, good.rows, good.images) == (True, 2, 2)
    bad = submit.check_csv(f"{HEADER}1,SKU1,{A}\nx,SKU2,ftp://img.test/c.jpg\n1,,{B}\n".encode())
    assert not bad.valid
    assert [submit.problem_line(p) for p in bad.problems] == [
        "row 3, column 'S. No.': 'x' is not a positive whole number",
        "row 3, column 'Input Image Urls': URL 'ftp://img.test/c.jpg' is not http or https",
        "row 4, column 'S. No.': serial number 1 repeats line 2",
        "row 4, column 'Product Name': the product name is empty",
    ]


def test_a_refused_csv_lists_problems_up_to_a_bound_and_says_nothing_was_created() -> None:
    rows = "".join(f"x{i},SKU,{A}\n" for i in range(25))
    checked = submit.check_csv((HEADER + rows).encode())
    report = submit.problems_report("p.csv", checked).splitlines()
    assert report[0] == "p.csv is not valid: 25 problems"
    assert report[1] == "  row 2, column 'S. No.': 'x0' is not a positive whole number"
    assert report[-2:] == ["  ... and 5 more", "Nothing was created."]
    assert len(report) == 1 + submit.SHOWN_PROBLEMS + 2


def test_limits_are_the_operators_defaults_unless_given() -> None:
    text = (HEADER + f'1,SKU,"{A},{B}"\n').encode()
    assert submit.check_csv(text).valid
    checked = submit.check_csv(text, CsvLimits(max_urls_per_row=1))
    assert checked.problems[0].message == "2 URLs, more than the limit of 1 per row"


def test_notices_are_lines_a_user_can_act_on() -> None:
    checked = submit.check_csv(f"{HEADER}1,SKU1,{A},{B}\n".encode())
    assert checked.valid
    assert submit.notice_lines(checked)[0].startswith("note: line 2: ")


@pytest.mark.parametrize(
    ("file", "name"),
    [
        ("products.csv", "products"),
        ("/home/me/Spring Catalog 2024.CSV", "spring-catalog-2024"),
        ("été_2024.csv", "t-2024"),
        ("--x--.csv", "x"),
        ("a" * 80 + ".csv", "a" * 63),
        ("___.csv", ""),
    ],
)
def test_a_default_name_from_the_file(file: str, name: str) -> None:
    assert submit.default_name(file) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("spring-catalog", None),
        ("v1.2", None),
        ("", "a name is needed"),
        ("Spring", "is not a valid name"),
        ("-x", "is not a valid name"),
        ("a_b", "is not a valid name"),
        ("a" * 254, "longer than 253"),
    ],
)
def test_names_the_api_server_would_refuse_are_refused_here(name: str, problem: str | None) -> None:
    found = submit.name_problem(name)
    assert found == problem if problem is None else problem in (found or "")


def test_small_utf8_goes_inline() -> None:
    data = (HEADER + f"1,SKU,{A}\n").encode()
    placement = submit.place_csv(data)
    assert placement == submit.Placement(inline=data.decode())
    manifest = submit.batch_manifest("b", placement)
    assert manifest["spec"] == {"source": {"inline": data.decode()}}
    with pytest.raises(ValueError, match="no ConfigMap"):
        submit.configmap_manifest("b", placement)


def test_exactly_32_kib_is_inline_one_byte_more_is_a_configmap() -> None:
    at_cap = b"x" * submit.INLINE_MAX_BYTES
    assert submit.place_csv(at_cap).inline is not None
    over = submit.place_csv(at_cap + b"x")
    assert over.inline is None and over.text == (at_cap + b"x").decode()


def test_a_large_csv_goes_to_a_configmap_labelled_for_the_batch() -> None:
    data = b"S" * (40 * 1024)
    placement = submit.place_csv(data)
    cm = submit.configmap_manifest("spring", placement)
    assert cm["metadata"]["name"] == "spring-csv"
    assert cm["metadata"]["labels"][names.LABEL_BATCH] == "spring"
    assert cm["data"] == {"products.csv": data.decode()}
    spec = submit.batch_manifest("spring", placement, quality=70, format="webp", webhook="h")[
        "spec"
    ]
    assert spec == {
        "source": {"configMapKeyRef": {"name": "spring-csv", "key": "products.csv"}},
        "compression": {"quality": 70, "format": "webp"},
        "webhook": {"url": "h"},
    }


def test_utf16_goes_to_binary_data_byte_for_byte() -> None:
    data = codecs_utf16(HEADER + f"1,SKU,{A}\n")
    assert submit.check_csv(data).valid
    placement = submit.place_csv(data)
    cm = submit.configmap_manifest("b", placement)
    assert base64.b64decode(cm["binaryData"]["products.csv"]) == data


def test_past_a_configmaps_size_the_user_is_told_where_else_to_put_it() -> None:
    with pytest.raises(ValueError, match=r"1\.0 MiB and a ConfigMap holds at most 1 MiB"):
        submit.place_csv(b"x" * submit.CONFIGMAP_MAX_BYTES)


def test_the_configmap_is_owned_by_the_created_batch() -> None:
    created = {"metadata": {"name": "b", "uid": "u-1", "namespace": "n", "generation": 1}}
    assert submit.owner_patch(created) == {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": "b", "uid": "u-1"}
            ]
        }
    }


def test_retry_tokens_are_fresh_and_fit_the_crd() -> None:
    tokens = {submit.retry_token(NOW) for _ in range(20)}
    assert len(tokens) > 1
    token = tokens.pop()
    assert token.startswith("20260501T120000Z-") and len(token) <= 64


@pytest.mark.parametrize(
    ("metadata", "tool"),
    [
        ({}, None),
        ({"labels": {"app.kubernetes.io/instance": "x"}}, None),
        ({"annotations": {"argocd.argoproj.io/tracking-id": "app:..."}}, "Argo CD"),
        ({"labels": {"kustomize.toolkit.fluxcd.io/name": "apps"}}, "Flux"),
        ({"managedFields": [{"manager": "kubectl-client-side-apply"}]}, None),
        ({"managedFields": [{"manager": "kustomize-controller"}]}, "Flux"),
        ({"managedFields": [{"manager": "argocd-controller"}]}, "Argo CD"),
    ],
)
def test_a_batch_a_gitops_tool_applies_is_recognised(
    metadata: dict[str, Any], tool: str | None
) -> None:
    assert submit.gitops_manager({"metadata": metadata}) == tool


def test_the_plugins_names_are_the_operators() -> None:
    assert names.LABEL_BATCH == plan.LABEL_BATCH
    assert names.LABEL_RUN == plan.LABEL_RUN
    assert names.WORKER_CONTAINER == plan.WORKER_CONTAINER
    api_version, resource = f"{plan.GROUP}/{plan.VERSION}", f"{plan.PLURAL}.{plan.GROUP}"
    assert api_version == names.API_VERSION
    assert resource == names.RESOURCE
    assert names.KIND == plan.KIND


# -- printing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-5, "<invalid>"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (330, "5m30s"),
        (600, "10m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 1800, "3h30m"),
        (47 * 3600, "47h"),
        (50 * 3600, "2d2h"),
        (9 * 86400, "9d"),
        (3 * 365 * 86400, "3y"),
    ],
)
def test_ages_read_like_kubectls(seconds: int, shown: str) -> None:
    assert render.human_duration(seconds) == shown


@pytest.mark.parametrize(
    ("count", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_byte_counts(count: int, shown: str) -> None:
    assert render.human_bytes(count) == shown


@pytest.mark.parametrize(
    ("done", "total", "shown"),
    [
        (0, 10, "[----------]"),
        (5, 10, "[#####-----]"),
        (10, 10, "[##########]"),
        (0, 0, "[##########]"),
    ],
)
def test_bars(done: int, total: int, shown: str) -> None:
    assert render.bar(done, total, 10) == shown


def batch(
    generation: int = 1,
    observed: int | None = 1,
    phase: str = "Running",
    ready: tuple[str, str, str] = ("False", "Running", "3/8 images done, 1 failed"),
    **status: Any,
) -> dict[str, Any]:
    conditions = [
        {
            "type": "Ready",
            "status": ready[0],
            "reason": ready[1],
            "message": ready[2],
            "lastTransitionTime": "2026-05-01T11:59:00Z",
        }
    ]
    full: dict[str, Any] = {"phase": phase, "conditions": conditions, **status}
    if observed is not None:
        full["observedGeneration"] = observed
    return {
        "metadata": {
            "name": "spring",
            "namespace": "shop",
            "generation": generation,
            "creationTimestamp": "2026-05-01T11:58:00Z",
        },
        "spec": {"source": {"inline": "x"}},
        "status": full,
    }


RUNNING: dict[str, Any] = {
    "images": {"total": 8, "succeeded": 3, "failed": 1, "skipped": 0},
    "shards": {"total": 2, "succeeded": 0, "failed": 0, "active": 2},
}


@pytest.mark.parametrize(
    ("obj", "generation", "line"),
    [
        pytest.param(
            batch(observed=None, phase=""),
            1,
            "Pending      waiting for the operator to pick up generation 1",
            id="no status yet",
        ),
        pytest.param(
            batch(generation=2, observed=1, phase="Failed"),
            2,
            "Pending      waiting for the operator to pick up generation 2",
            id="a retry not observed yet shows no stale Failed",
        ),
        pytest.param(
            batch(phase="Validating", ready=("False", "Validating", "reading and validating")),
            1,
            "Validating   reading and validating",
            id="validating",
        ),
        pytest.param(
            batch(phase="Pending", ready=("False", "Queued", "waiting for a slot")),
            1,
            "Pending      waiting for a slot",
            id="queued",
        ),
        pytest.param(
            batch(**RUNNING),
            1,
            "Running      images [############------------] 4/8  50%  1 failed  shards 0/2"
            " (2 running)",
            id="running",
        ),
        pytest.param(
            batch(
                phase="Succeeded",
                ready=("True", "Succeeded", "8/8"),
                images={"total": 8, "succeeded": 8, "failed": 0},
                shards={"total": 2, "succeeded": 2, "failed": 0, "active": 0},
            ),
            1,
            "Succeeded    images [########################] 8/8 100%  0 failed  shards 2/2",
            id="done",
        ),
    ],
)
def test_progress_lines(obj: dict[str, Any], generation: int, line: str) -> None:
    assert render.progress_line(obj, generation) == line


@pytest.mark.parametrize(
    ("obj", "generation", "finished"),
    [
        (batch(phase="Succeeded"), 1, True),
        (batch(phase="Failed"), 1, True),
        (batch(phase="Running"), 1, False),
        (batch(generation=2, observed=1, phase="Failed"), 2, False),
        (batch(observed=None, phase="Failed"), 1, False),
    ],
)
def test_a_run_is_finished_only_once_its_generation_is_observed(
    obj: dict[str, Any], generation: int, finished: bool
) -> None:
    assert render.finished(obj, generation) is finished


FAILED = batch(
    phase="Failed",
    ready=("False", "TooManyFailedImages", "2 of 6 images failed (33.3%), above the limit of 10%"),
    run="g1-0f1e2d3c",
    rows={"total": 4, "succeeded": 2, "failed": 2},
    images={"total": 6, "succeeded": 4, "failed": 2, "skipped": 0},
    shards={"total": 1, "succeeded": 1, "failed": 0, "active": 0},
    bytes={"input": 4096, "output": 1024},
    startTime="2026-05-01T11:58:10Z",
    completionTime="2026-05-01T11:58:40Z",
    output={
        "csv": "s3://imagebatch/shop/spring/output.csv",
        "csvUrl": "http://files.test/imagebatch/shop/spring/output.csv",
        "errors": "s3://imagebatch/shop/spring/errors.csv",
    },
)


def test_the_summary_of_one_batch_reads_top_to_bottom() -> None:
    text = render.summary(
        FAILED,
        NOW,
        [["3", A, "fetch", "http-status: HTTP 503"]],
        "2 images failed: kubectl imagebatch results spring downloads errors.csv",
    )
    lines = text.splitlines()
    assert lines[:4] == [
        "Name:      spring",
        "Namespace: shop",
        "Phase:     Failed (TooManyFailedImages): 2 of 6 images failed (33.3%), above the "
        "limit of 10%",
        "Run:       g1-0f1e2d3c (generation 1)",
    ]
    for expected in (
        "Rows:      4 total, 2 succeeded, 2 failed",
        "Images:    6 total, 4 succeeded, 2 failed, 0 already stored",
        "Shards:    1 total, 1 succeeded, 0 failed, 0 running",
        "Bytes:     4.0 KiB in, 1.0 KiB out (75% smaller)",
        "Started:   2026-05-01T11:58:10Z (110s ago)",
        "Completed: 2026-05-01T11:58:40Z (took 30s)",
        "Output:    s3://imagebatch/shop/spring/output.csv",
        "           http://files.test/imagebatch/shop/spring/output.csv",
        "Errors:    s3://imagebatch/shop/spring/errors.csv",
        "Webhook:   none configured",
        "Conditions:",
        "Failed images (errors.csv, first 1):",
        "2 images failed: kubectl imagebatch results spring downloads errors.csv",
    ):
        assert expected in lines
    table_at = lines.index("Conditions:")
    assert lines[table_at + 1].split() == ["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]
    assert lines[table_at + 2].split()[:4] == ["Ready", "False", "TooManyFailedImages", "60s"]
    assert lines[-2].split() == ["3", A, "fetch", "http-status:", "HTTP", "503"]


def test_a_spec_change_not_yet_observed_says_so() -> None:
    text = render.summary(batch(generation=3, observed=2, phase="Succeeded"), NOW)
    assert "Run:       generation 3 not observed yet (status below is for generation 2)" in text
    assert "Phase:     Succeeded\n" in text + "\n"


def test_an_invalid_csv_lists_its_problems() -> None:
    invalid = batch(
        phase="Failed",
        ready=("False", "InvalidCSV", "2 problem(s) in the CSV; first at row 2, ..."),
        validationErrors=[
            {"row": 2, "column": "S. No.", "message": "'x' is not a positive whole number"},
            {"row": 3, "column": "", "message": "a quote is never closed"},
        ],
    )
    lines = render.summary(invalid, NOW).splitlines()
    at = lines.index("CSV problems (first 2; errors.csv has them all):")
    assert lines[at + 1 : at + 3] == [
        "  row 2, column 'S. No.': 'x' is not a positive whole number",
        "  row 3: a quote is never closed",
    ]


@pytest.mark.parametrize(
    ("hook", "condition", "record", "line"),
    [
        (None, None, None, "none configured"),
        ({"url": "h"}, None, None, "Pending"),
        (
            {"url": "h"},
            ("True", "Delivered", "delivered"),
            {"id": "msg_1", "attempts": 1, "lastStatusCode": 200, "deliveredTime": "T"},
            "Delivered, 1 attempt, last answer HTTP 200, delivered T, webhook-id msg_1",
        ),
        (
            {"url": "h"},
            ("Unknown", "Retrying", "attempt 2 failed: HTTP 503"),
            {"attempts": 2, "lastStatusCode": 503, "nextAttemptTime": "T2"},
            "Retrying, 2 attempts, last answer HTTP 503, next attempt T2 "
            "(attempt 2 failed: HTTP 503)",
        ),
        (
            {"url": "h"},
            ("False", "DeliveryFailed", "gave up"),
            {"attempts": 8, "lastError": "connection refused"},
            "DeliveryFailed, 8 attempts, last error: connection refused (gave up)",
        ),
    ],
)
def test_webhook_state(
    hook: dict[str, str] | None,
    condition: tuple[str, str, str] | None,
    record: dict[str, Any] | None,
    line: str,
) -> None:
    obj = batch()
    if hook:
        obj["spec"]["webhook"] = hook
    if condition:
        obj["status"]["conditions"].append(
            {
                "type": "WebhookDelivered",
                "status": condition[0],
                "reason": condition[1],
                "message": condition[2],
            }
        )
    if record:
        obj["status"]["webhook"] = record
    assert render.webhook_line(obj) == line


def test_the_table_has_kubectl_get_ibs_columns() -> None:
    other = batch(phase="Succeeded", ready=("True", "Succeeded", ""))
    other["metadata"]["name"] = "autumn"
    other["status"].update(imagesSummary="6/6", shardsSummary="1/1", images={"failed": 0})
    running = batch(imagesSummary="3/8", shardsSummary="0/2", **RUNNING)
    assert render.batches_table([running, other], NOW, namespaces=False).splitlines() == [
        "NAME     PHASE       IMAGES   FAILED   SHARDS   WEBHOOK   REASON      AGE",
        "autumn   Succeeded   6/6      0        1/1                Succeeded   2m",
        "spring   Running     3/8      1        0/2                Running     2m",
    ]
    wide = render.batches_table([running], NOW, namespaces=True).splitlines()
    assert wide[0].startswith("NAMESPACE   NAME")
    assert wide[1].startswith("shop        spring")


# -- waiting, logs, results ------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
def test_a_watch_stream_is_cut_into_objects_however_it_arrives(piece: int) -> None:
    events = [{"type": "ADDED", "object": {"n": i, "s": "{}\n}"}} for i in range(5)]
    text = "".join(_indented(e) for e in events)
    stream = JsonStream()
    got: list[Any] = []
    for start in range(0, len(text), piece):
        got += stream.feed(text[start : start + piece])
    assert got == events


def _pod(name: str, index: str | None, created: str) -> dict[str, Any]:
    labels = {} if index is None else {names.INDEX_LABEL: index}
    return {"metadata": {"name": name, "labels": labels, "creationTimestamp": created}}


def test_pods_are_shown_by_shard_then_attempt() -> None:
    pods = [
        _pod("b-1-x", "1", "2026-05-01T12:00:00Z"),
        _pod("b-0-retry", "0", "2026-05-01T12:00:09Z"),
        _pod("b-0-first", "0", "2026-05-01T12:00:01Z"),
        _pod("b-10-x", "10", "2026-05-01T12:00:00Z"),
        _pod("b-2-x", "2", "2026-05-01T12:00:00Z"),
    ]
    assert [p["metadata"]["name"] for p in shard_pods(pods, None)] == [
        "b-0-first",
        "b-0-retry",
        "b-1-x",
        "b-2-x",
        "b-10-x",
    ]
    assert [p["metadata"]["name"] for p in shard_pods(pods, 0)] == ["b-0-first", "b-0-retry"]
    assert shard_pods(pods, 3) == []


@pytest.mark.parametrize(
    ("url", "bucket", "key"),
    [
        ("s3://imagebatch/shop/spring/output.csv", "imagebatch", "shop/spring/output.csv"),
        ("s3://b/k", "b", "k"),
    ],
)
def test_s3_urls(url: str, bucket: str, key: str) -> None:
    assert download.parse_s3_url(url) == download.S3Url(bucket, key)


@pytest.mark.parametrize("url", ["http://b/k", "s3://b", "s3:///k", "s3://b/"])
def test_what_is_not_an_s3_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an s3://"):
        download.parse_s3_url(url)


KEYS = {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}


@pytest.mark.parametrize(
    ("env", "endpoint", "secure", "region", "token"),
    [
        pytest.param(KEYS, "s3.amazonaws.com", True, None, None, id="AWS S3"),
        pytest.param(
            {**KEYS, "AWS_ENDPOINT_URL": "http://minio.test:9000", "AWS_REGION": "eu-1"},
            "minio.test:9000",
            False,
            "eu-1",
            None,
            id="MinIO over http",
        ),
        pytest.param(
            {
                **KEYS,
                "AWS_ENDPOINT_URL": "http://general.test",
                "AWS_ENDPOINT_URL_S3": "https://s3.test/",
                "AWS_DEFAULT_REGION": "r",
                "AWS_SESSION_TOKEN": "T",
            },
            "s3.test",
            True,
            "r",
            "T",
            id="the S3-specific endpoint wins; temporary credentials",
        ),
    ],
)
def test_the_users_own_credentials_from_the_environment(
    env: dict[str, str], endpoint: str, secure: bool, region: str | None, token: str | None
) -> None:
    settings = download.credentials_from_env(env)
    assert settings is not None
    assert (settings.endpoint, settings.secure, settings.region) == (endpoint, secure, region)
    assert (settings.access_key, settings.secret_key, settings.session_token) == ("AK", "SK", token)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"AWS_ACCESS_KEY_ID": "AK"},
        # The operator's own variables are never read.
        {"MINIO_ACCESS_KEY": "root", "MINIO_SECRET_KEY": "s", "MINIO_ENDPOINT": "m:9000"},
    ],
)
def test_no_credentials_means_none(env: dict[str, str]) -> None:
    assert download.credentials_from_env(env) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [("minio.test:9000", "must be a URL"), ("http://minio.test/bucket", "no path")],
)
def test_a_bad_endpoint_is_named(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        download.credentials_from_env({**KEYS, "AWS_ENDPOINT_URL": value})


def test_without_a_public_url_or_credentials_the_user_is_told_what_to_set(
    tmp_path: Any,
) -> None:
    with pytest.raises(download.DownloadFailed, match="set AWS_ACCESS_KEY_ID"):
        download.fetch(None, "s3://b/k", tmp_path / "output.csv", None)
    assert list(tmp_path.iterdir()) == []


# -- helpers ---------------------------------------------------------------------------


def _indented(event: dict[str, Any]) -> str:
    import json

    return json.dumps(event, indent=4) + "\n"


def codecs_utf16(text: str) -> bytes:
    import codecs

    return codecs.BOM_UTF16_LE + text.replace("\n", "\r\n").encode("utf-16-le")


def _console() -> Any:
    from imagebatch_cli.commands import Console

    return Console(io.StringIO(), io.StringIO(), tty=False)


def test_time_helpers_are_kept_out_of_the_pure_functions() -> None:
    assert render.parse_time("2026-05-01T12:00:00Z") == NOW
    assert render.parse_time("yesterday") is None
    assert render.age("2026-05-01T11:00:00Z", NOW + timedelta(seconds=0)) == "60m"
