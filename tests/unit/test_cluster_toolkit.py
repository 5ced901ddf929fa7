"""The local cluster toolkit's pure parts: replace-line generation, kubelet-style env and
exit codes, the retrying that carries the node agent through an API server outage, and
the container-log endpoint."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from kubernetes.client.rest import ApiException

from tests.cluster import build, node_agent, podenv, retry

KUBERNETES_GO_MOD = """
module k8s.io/kubernetes

go 1.25.0

require (
	github.com/blang/semver/v4 v4.0.0
	k8s.io/api v0.0.0
	k8s.io/client-go v0.0.0
	k8s.io/kube-openapi v0.0.0-20250910181357-589584f1c912
	k8s.io/utils v0.0.0-20251002143259-bc988d571ff4
	k8s.io/kubectl v0.0.0 // indirect
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
	k8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
)
"""


def test_replace_lines_cover_every_staging_module_and_nothing_else() -> None:
    lines = build.replace_lines(KUBERNETES_GO_MOD, "v1.35.4")
    assert lines == [
        "replace k8s.io/api => k8s.io/api v0.35.4",
        "replace k8s.io/client-go => k8s.io/client-go v0.35.4",
        "replace k8s.io/cri-streaming => k8s.io/cri-streaming v0.35.4",
        "replace k8s.io/kubectl => k8s.io/kubectl v0.35.4",
    ]


@pytest.mark.parametrize(
    ("kubernetes", "staging"),
    [("v1.34.4", "v0.34.4"), ("v1.36.1", "v0.36.1"), ("v1.37.0-rc.1", "v0.37.0-rc.1")],
)
def test_staging_version_follows_the_release(kubernetes: str, staging: str) -> None:
    assert build.staging_version(kubernetes) == staging


@pytest.mark.parametrize("bad", ["1.35.4", "v2.0.0", "latest", "v1.35"])
def test_staging_version_rejects_what_is_not_a_release(bad: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes release"):
        build.staging_version(bad)


def test_ldflags_stamp_the_real_version() -> None:
    flags = build.kubernetes_ldflags("v1.35.4")
    assert "-X k8s.io/component-base/version.gitVersion=v1.35.4" in flags
    assert "-X k8s.io/component-base/version.gitMinor=35" in flags


def test_binary_path_is_keyed_by_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("IMAGEBATCH_CACHE", str(tmp_path))
    assert build.binary_path("etcd") == tmp_path / "bin" / f"etcd-{build.ETCD_VERSION}"
    with pytest.raises(KeyError):
        build.binary_path("docker")


INDEX = "batch.kubernetes.io/job-completion-index"
POD: dict[str, Any] = {
    "metadata": {
        "name": "job-1-abcde",
        "namespace": "team-a",
        "uid": "1234",
        "labels": {"batch.kubernetes.io/job-completion-index": "1"},
        "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
    },
    "spec": {"nodeName": "n1", "serviceAccountName": "worker"},
    "status": {"podIP": "127.0.0.1", "hostIP": "127.0.0.1"},
}
CONFIG_MAPS = {"settings": {"LEVEL": "debug", "MODE": "fast"}}
SECRETS = {"creds": {"KEY": "s3cr3t"}}


def resolve(container: dict[str, Any]) -> dict[str, str]:
    return podenv.resolve_env(
        POD,
        container,
        lambda name, key: CONFIG_MAPS.get(name, {}).get(key),
        lambda name, key: SECRETS.get(name, {}).get(key),
        CONFIG_MAPS.get,
        SECRETS.get,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param([{"name": "A", "value": "1"}], {"A": "1"}, id="plain-value"),
        pytest.param(
            [{"name": "A", "value": "x"}, {"name": "B", "value": "$(A)-y"}],
            {"A": "x", "B": "x-y"},
            id="expands-earlier-vars",
        ),
        pytest.param(
            [{"name": "B", "value": "$(NOPE) $$(A)"}],
            {"B": "$(NOPE) $(A)"},
            id="unknown-and-escape",
        ),
        pytest.param(
            [
                {
                    "name": "JOB_COMPLETION_INDEX",
                    "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX}']"}},
                }
            ],
            {"JOB_COMPLETION_INDEX": "1"},
            id="index-from-annotation",
        ),
        pytest.param(
            [
                {
                    "name": "I",
                    "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{INDEX}']"}},
                }
            ],
            {"I": "1"},
            id="index-from-label",
        ),
        pytest.param(
            [
                {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
            {"N": "job-1-abcde", "NS": "team-a", "SA": "worker", "IP": "127.0.0.1"},
            id="downward-api",
        ),
        pytest.param(
            [
                {"name": "K", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}}},
                {
                    "name": "L",
                    "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}},
                },
            ],
            {"K": "s3cr3t", "L": "debug"},
            id="key-refs",
        ),
        pytest.param(
            [
                {
                    "name": "O",
                    "valueFrom": {
                        "secretKeyRef": {"name": "creds", "key": "NONE", "optional": True}
                    },
                }
            ],
            {},
            id="optional-missing-key",
        ),
    ],
)
def test_env_resolves_like_the_kubelet(env: list[dict[str, Any]], expected: dict[str, str]) -> None:
    assert resolve({"name": "c", "env": env}) == expected


def test_env_from_comes_first_and_env_overrides_it() -> None:
    container = {
        "name": "c",
        "envFrom": [
            {"configMapRef": {"name": "settings"}},
            {"secretRef": {"name": "creds"}, "prefix": "S_"},
        ],
        "env": [{"name": "MODE", "value": "slow"}],
    }
    assert resolve(container) == {"LEVEL": "debug", "MODE": "slow", "S_KEY": "s3cr3t"}


@pytest.mark.parametrize(
    ("container", "message"),
    [
        pytest.param(
            {
                "name": "c",
                "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}],
            },
            "secretKeyRef gone/k not found",
            id="missing-secret",
        ),
        pytest.param(
            {"name": "c", "envFrom": [{"configMapRef": {"name": "gone"}}]},
            "configMapRef 'gone' not found",
            id="missing-envfrom",
        ),
        pytest.param(
            {
                "name": "c",
                "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}],
            },
            "unsupported fieldRef.fieldPath 'spec.bogus'",
            id="unknown-field",
        ),
    ],
)
def test_unresolvable_env_names_the_reference(container: dict[str, Any], message: str) -> None:
    with pytest.raises(podenv.EnvError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(container)


def test_command_and_args_expand_env() -> None:
    container = {"name": "c", "command": ["worker", "--shard", "$(I)"], "args": ["$(MISSING)"]}
    assert podenv.command_line(container, {"I": "3"}) == ["worker", "--shard", "3", "$(MISSING)"]


def test_a_container_without_command_is_refused() -> None:
    with pytest.raises(podenv.EnvError, match="has no command"):
        podenv.command_line({"name": "c", "image": "busybox"}, {})


@pytest.mark.parametrize(
    ("volumes", "wanted"),
    [
        ([], False),
        ([{"name": "data", "emptyDir": {}}], False),
        (
            [
                {
                    "name": "kube-api-access-x",
                    "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
                }
            ],
            True,
        ),
    ],
)
def test_token_only_where_admission_projected_one(volumes: list[Any], wanted: bool) -> None:
    assert podenv.wants_service_account_token({"spec": {"volumes": volumes}}) is wanted


@pytest.mark.parametrize(
    ("codes", "phase"),
    [({"a": 0}, "Succeeded"), ({"a": 0, "b": 1}, "Failed"), ({"a": 137}, "Failed")],
)
def test_terminal_phase_needs_every_container_to_exit_zero(
    codes: dict[str, int], phase: str
) -> None:
    assert node_agent.terminal_phase(codes) == phase


def test_the_kstatus_tool_pins_the_library_version_the_build_names() -> None:
    go_mod = (build.REPO_ROOT / "tests" / "kstatus" / "go.mod").read_text()
    assert f"sigs.k8s.io/cli-utils {build.CLI_UTILS_VERSION}\n" in go_mod


def test_a_tool_built_from_this_repository_is_cached_by_version_and_content(
    tmp_path: Any,
) -> None:
    (tmp_path / "main.go").write_text("package main\n")
    first = build.source_digest(tmp_path)
    assert build.source_digest(tmp_path) == first
    (tmp_path / "main.go").write_text("package main // edited\n")
    assert build.source_digest(tmp_path) != first
    kstatus = next(b for b in build.BINARIES if b.name == "kstatus")
    assert kstatus.cache_name.startswith(f"kstatus-{build.CLI_UTILS_VERSION}-")


_LOGS = "/containerLogs/ns/pod-1/worker"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(_LOGS, node_agent.LogRequest("ns", "pod-1", "worker"), id="plain"),
        pytest.param(
            f"{_LOGS}?follow=true&tailLines=10&limitBytes=500&timestamps=true",
            node_agent.LogRequest("ns", "pod-1", "worker", True, 10, 500),
            id="kubectl logs -f --tail=10 --limit-bytes=500",
        ),
        pytest.param(
            f"{_LOGS}?follow=false", node_agent.LogRequest("ns", "pod-1", "worker"), id="no follow"
        ),
    ],
)
def test_log_requests_are_read_as_the_kubelet_reads_them(
    target: str, expected: node_agent.LogRequest
) -> None:
    assert node_agent.parse_log_request(target) == expected


@pytest.mark.parametrize(
    ("target", "status", "message"),
    [
        pytest.param("/containerLogs/ns/pod", 404, "not found", id="no container"),
        pytest.param("/stats/summary", 404, "not found", id="another kubelet path"),
        pytest.param(f"{_LOGS}?tailLines=x", 400, "tailLines must be an integer", id="tail"),
        pytest.param(f"{_LOGS}?limitBytes=-1", 400, "must not be negative", id="negative"),
        pytest.param(f"{_LOGS}?previous=true", 400, "previous container logs", id="previous"),
    ],
)
def test_log_requests_the_agent_cannot_answer_say_why(
    target: str, status: int, message: str
) -> None:
    with pytest.raises(node_agent.BadLogRequest, match=message) as raised:
        node_agent.parse_log_request(target)
    assert raised.value.status == status


@pytest.mark.parametrize(
    ("tail", "limit", "expected"),
    [
        (None, None, b"a\nb\nc\n"),
        (2, None, b"b\nc\n"),
        (0, None, b""),
        (10, None, b"a\nb\nc\n"),
        (None, 3, b"a\nb"),
        (2, 3, b"b\nc"),
    ],
)
def test_tail_lines_then_limit_bytes(tail: int | None, limit: int | None, expected: bytes) -> None:
    assert node_agent.select_log(b"a\nb\nc\n", tail, limit) == expected


@pytest.mark.parametrize(
    ("returncode", "exit_code"),
    [(0, 0), (3, 3), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143)],
    ids=["ok", "error", "sigkill", "sigterm"],
)
def test_a_signalled_container_exits_128_plus_the_signal(returncode: int, exit_code: int) -> None:
    assert node_agent.container_exit_code(returncode) == exit_code


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 0.0), (1, 0.2), (2, 0.4), (3, 0.8), (5, 3.2), (6, 5.0), (50, 5.0)],
)
def test_backoff_doubles_up_to_its_cap(failures: int, seconds: float) -> None:
    assert retry.Backoff(initial=0.2, factor=2.0, cap=5.0).delay(failures) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ApiException(status=503, reason="Service Unavailable"), True),
        (ApiException(status=500, reason="Internal Server Error"), True),
        (ApiException(status=429, reason="Too Many Requests"), True),
        (ApiException(status=0, reason="no answer"), True),
        (ApiException(status=404, reason="Not Found"), False),
        (ApiException(status=409, reason="Conflict"), False),
        (ApiException(status=422, reason="Invalid"), False),
        (ApiException(status=403, reason="Forbidden"), False),
        (
            urllib3.exceptions.MaxRetryError(
                urllib3.HTTPConnectionPool("127.0.0.1"), "/api", ConnectionRefusedError()
            ),
            True,
        ),
        (urllib3.exceptions.ProtocolError("Connection aborted"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (ValueError("a defect"), False),
        (KeyError("metadata"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_failures_without_an_answer_or_5xx_429_are_retried(
    error: BaseException, transient: bool
) -> None:
    assert retry.is_transient(error) is transient


FAST = retry.Backoff(initial=0.001, factor=1.0, cap=0.001)


def flaky(failures: list[BaseException], result: str = "written") -> Callable[[], str]:
    """A call that raises each of ``failures`` in turn, then returns ``result``."""
    pending = list(failures)

    def call() -> str:
        if pending:
            raise pending.pop(0)
        return result

    return call


def test_retry_outlasts_an_outage_of_any_length() -> None:
    down = [ConnectionRefusedError()] * 40 + [ApiException(status=503)] * 10
    seen: list[int] = []
    result = retry.retry(
        flaky(down),
        stop=threading.Event(),
        backoff=FAST,
        on_failure=lambda n, _: seen.append(n),
    )
    assert result == "written"
    assert seen == list(range(1, 51))


def test_retry_raises_an_answer_at_once() -> None:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        raise ApiException(status=404, reason="Not Found")

    with pytest.raises(ApiException) as raised:
        retry.retry(call, stop=threading.Event(), backoff=FAST)
    assert raised.value.status == 404 and len(calls) == 1


def test_retry_ends_when_the_agent_stops() -> None:
    stop = threading.Event()
    stopper = threading.Timer(0.2, stop.set)
    stopper.start()
    started = time.monotonic()
    with pytest.raises(retry.Stopped):
        retry.retry(
            flaky([ConnectionRefusedError()] * 10_000),
            stop=stop,
            backoff=retry.Backoff(initial=0.05, factor=1.0, cap=0.05),
        )
    assert time.monotonic() - started < 2


def test_retry_gives_up_when_overtaken() -> None:
    attempts: list[int] = []
    with pytest.raises(retry.Stopped, match="after 3 failed"):
        retry.retry(
            flaky([ConnectionRefusedError()] * 10),
            stop=threading.Event(),
            give_up=lambda: len(attempts) >= 3,
            backoff=FAST,
            on_failure=lambda n, _: attempts.append(n),
        )
