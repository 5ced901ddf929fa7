"""The Helm chart, rendered by the real helm binary (no cluster needed).

What a user of the chart relies on: the CRD is the project's own, byte for byte; every
setting the operator reads is set from a value, and the operator reads back what the
values say; the schema rejects typos and wrong types; values.yaml documents each key;
RBAC grants what the operator does and nothing more, in both watch modes; the pod runs
under the restricted Pod Security Standard.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebatch_common.contract import WorkerEnv
from imagebatch_common.storage_settings import StorageSettings
from imagebatch_operator import plan
from imagebatch_operator.settings import Settings
from tests.cluster import build

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "imagebatch"
CRD_NAME = "imagebatches.imagebatch.dev.yaml"
REQUIRED = {"minio": {"endpoint": "minio.storage.svc:9000", "existingSecret": "imagebatch-minio"}}


@pytest.fixture(scope="module")
def helm() -> Path:
    """The pinned helm binary, built once into the cache if it is not there yet."""
    return build.ensure_all(["helm"])["helm"]


def run_helm(
    helm: Path, *args: str, values: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args, "--values", "-"],
        input=yaml.safe_dump(values or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def render(helm: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = run_helm(
        helm,
        "template",
        "ib",
        str(CHART),
        "--namespace",
        "imagebatch-system",
        values=merge(REQUIRED, values or {}),
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_error(helm: Path, values: dict[str, Any]) -> str:
    result = run_helm(helm, "template", "ib", str(CHART), values=values)
    assert result.returncode != 0, "helm template accepted the values"
    return result.stderr


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, [o["kind"] for o in objects]
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    c: dict[str, Any] = pod["containers"][0]
    return c


def plain_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}


# -- one source of truth -----------------------------------------------------------------


def test_chart_crd_is_the_projects_crd_byte_for_byte() -> None:
    chart_copy = (CHART / "crds" / CRD_NAME).read_bytes()
    assert chart_copy == (ROOT / "crds" / CRD_NAME).read_bytes(), (
        f"cp crds/{CRD_NAME} charts/imagebatch/crds/"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_NAME]


def test_chart_version_and_app_version_match_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert project is not None
    assert chart["appVersion"] == project.group(1)


def test_helm_lint_strict_passes(helm: Path) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), values=REQUIRED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# -- the settings the operator reads ----------------------------------------------------


def variables_read_by_the_operator() -> set[str]:
    """Every IMAGEBATCH_* / MINIO_* name in the operator's settings and entry point."""
    sources = [
        (ROOT / "operator" / "imagebatch_operator" / "settings.py").read_text(),
        (ROOT / "operator" / "imagebatch_operator" / "main.py").read_text(),
        inspect.getsource(StorageSettings.from_env),
    ]
    names = {m for text in sources for m in re.findall(r'"((?:IMAGEBATCH|MINIO)_[A-Z_]+)"', text)}
    # The storage reader names its variables through the contract's WorkerEnv. The
    # session token is for temporary credentials, which the operator's own never are.
    names |= {
        WorkerEnv[m].value
        for text in sources
        for m in re.findall(r"Env\.([A-Z_]+)", text)
        if m != "STORAGE_SESSION_TOKEN"
    }
    return names


def test_deployment_sets_every_variable_the_operator_reads_and_no_other(helm: Path) -> None:
    names = [e["name"] for e in container(render(helm))["env"]]
    assert len(names) == len(set(names))
    assert set(names) == variables_read_by_the_operator()


def test_the_operator_reads_back_what_the_values_say(helm: Path) -> None:
    values = {
        "minio": {"secure": True, "region": "eu-west-1"},
        "bucket": "catalog",
        "publicUrl": "https://cdn.example.com/catalog/",
        "presignSeconds": 3600,
        "allowNets": ["10.20.0.0/16", "192.168.7.0/24"],
        "image": {"repository": "registry.example.com/imagebatch", "tag": "1.2.3"},
        "worker": {
            "command": ["imagebatch-worker", "--verbose"],
            "resources": {
                "requests": {"cpu": 1, "memory": "300Mi"},
                "limits": {"cpu": 1.5, "memory": "2Gi"},
            },
        },
        "limits": {
            "maxCsvBytes": 123456789,
            "maxRows": 2_000_000,
            "maxUrlsPerRow": 7,
            "maxImageBytes": 99_000_000,
            "maxImagePixels": 120_000_000,
        },
        "webhook": {"schedule": [0, 30, 600], "timeoutSeconds": 4.5},
        "concurrency": {"workers": 3, "heavyWorkers": 1},
        "resyncSeconds": 120,
        "extraBuckets": ["archive", "staging"],
        "workerCredentials": {
            "mode": "static",
            "stsEndpoint": "https://sts.example.com",
            "roleArn": "arn:aws:iam::1:role/w",
            "seconds": 7200,
            "renewSeconds": 600,
        },
        "webhookAllowNets": ["10.30.0.0/16"],
        "denyEndpoints": ["vault.vault.svc:8200"],
        "minStatusWriteSeconds": 4,
    }
    env = {**plain_env(render(helm, values)), "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "s"}
    settings = Settings.from_env(env)
    assert settings.storage.endpoint == "minio.storage.svc:9000"
    assert settings.storage.secure is True and settings.storage.region == "eu-west-1"
    assert settings.bucket == "catalog"
    assert settings.public_url == "https://cdn.example.com/catalog"
    assert settings.presign_seconds == 3600
    assert settings.allow_nets == "10.20.0.0/16,192.168.7.0/24"
    assert settings.worker_image == "registry.example.com/imagebatch:1.2.3"
    assert settings.worker_command == ("imagebatch-worker", "--verbose")
    assert (settings.worker_cpu_request, settings.worker_cpu_limit) == ("1", "1.5")
    assert (settings.worker_memory_request, settings.worker_memory_limit) == ("300Mi", "2Gi")
    assert settings.csv_limits.max_bytes == 123456789  # no 1.23456789e+08
    assert settings.csv_limits.max_rows == 2_000_000
    assert settings.csv_limits.max_urls_per_row == 7
    assert settings.max_image_bytes == 99_000_000
    assert settings.max_image_pixels == 120_000_000
    assert settings.webhook_schedule == (0.0, 30.0, 600.0)
    assert settings.webhook_timeout_seconds == 4.5
    assert (settings.workers, settings.heavy_workers) == (3, 1)
    assert settings.resync_seconds == 120
    assert settings.allowed_buckets == ("catalog", "archive", "staging")
    assert settings.worker_credentials == "static"
    assert (settings.sts_endpoint, settings.sts_role_arn) == (
        "https://sts.example.com",
        "arn:aws:iam::1:role/w",
    )
    assert (settings.credential_seconds, settings.credential_renew_seconds) == (7200, 600)
    assert settings.webhook_allow_nets == "10.30.0.0/16"
    assert settings.deny_endpoints == "vault.vault.svc:8200"
    assert settings.min_write_seconds == 4


def test_defaults_give_the_operators_own_defaults(helm: Path) -> None:
    env = {**plain_env(render(helm)), "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "s"}
    from_chart = Settings.from_env(env)
    built_in = Settings(storage=StorageSettings("minio.storage.svc:9000", "a", "s"))
    assert from_chart.csv_limits == built_in.csv_limits
    for name in (
        "bucket",
        "public_url",
        "presign_seconds",
        "worker_command",
        "worker_cpu_request",
        "worker_cpu_limit",
        "worker_memory_request",
        "worker_memory_limit",
        "allow_nets",
        "max_image_bytes",
        "max_image_pixels",
        "max_images",
        "max_shards",
        "max_parallelism",
        "max_running_per_namespace",
        "extra_buckets",
        "worker_credentials",
        "sts_endpoint",
        "sts_role_arn",
        "credential_seconds",
        "credential_renew_seconds",
        "webhook_allow_nets",
        "deny_endpoints",
        "webhook_schedule",
        "webhook_timeout_seconds",
        "workers",
        "heavy_workers",
        "resync_seconds",
        "min_write_seconds",
    ):
        assert getattr(from_chart, name) == getattr(built_in, name), name
    assert from_chart.worker_image == "imagebatch:0.1.0"  # the same image as the operator
    assert container(render(helm))["image"] == "imagebatch:0.1.0"


def test_credentials_come_from_the_existing_secret_with_configurable_keys(helm: Path) -> None:
    values = {"minio": {"accessKeyKey": "rootUser", "secretKeyKey": "rootPassword"}}
    env = {e["name"]: e for e in container(render(helm, values))["env"]}
    assert env["MINIO_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "imagebatch-minio", "key": "rootUser"}
    }
    assert env["MINIO_SECRET_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "imagebatch-minio", "key": "rootPassword"}
    }
    defaults = {e["name"]: e for e in container(render(helm))["env"]}
    assert defaults["MINIO_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "accessKey"
    assert defaults["MINIO_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "secretKey"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(
            {"minio": {"existingSecret": "s"}}, "minio.endpoint is required", id="no-endpoint"
        ),
        pytest.param(
            {"minio": {"endpoint": "m:9000"}}, "minio.existingSecret is required", id="no-secret"
        ),
        pytest.param(
            {**REQUIRED, "serviceAccount": {"create": False}},
            "serviceAccount.name is required",
            id="no-account-name",
        ),
    ],
)
def test_missing_required_values_say_what_to_set(
    helm: Path, values: dict[str, Any], message: str
) -> None:
    assert message in render_error(helm, values)


# -- the schema -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"replicas": 2}, "additional properties 'replicas' not allowed", id="top"),
        pytest.param(
            {"minio": {"endpiont": "x:1"}},
            "additional properties 'endpiont' not allowed",
            id="typo",
        ),
        pytest.param(
            {"worker": {"resources": {"limits": {"gpu": 1}}}},
            "additional properties 'gpu' not allowed",
            id="nested",
        ),
        pytest.param({"resyncSeconds": "fast"}, "want number", id="string-for-number"),
        pytest.param({"limits": {"maxRows": 1.5}}, "want integer", id="float-for-integer"),
        pytest.param({"allowNets": "10.0.0.0/8"}, "want array", id="string-for-list"),
        pytest.param({"allowNets": ["everything"]}, "does not match pattern", id="not-a-cidr"),
        pytest.param({"watchNamespaces": ["Team_A"]}, "does not match pattern", id="bad-ns"),
        pytest.param({"liveness": {"port": 0}}, "minimum", id="port-0"),
        pytest.param({"minio": {"endpoint": "http://m:9000"}}, "pattern", id="scheme"),
        pytest.param({"image": {"pullPolicy": "Sometimes"}}, "value must be one of", id="enum"),
        pytest.param({"verbose": "yes"}, "want boolean", id="bool"),
        pytest.param({"worker": {"command": []}}, "minItems", id="no-command"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(
    helm: Path, values: dict[str, Any], message: str
) -> None:
    assert message in render_error(helm, merge(REQUIRED, values))


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def object_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if node.get("type") == "object":
        yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from object_nodes(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from object_nodes(node["items"], f"{path}[]")


def test_every_object_in_the_schema_is_closed() -> None:
    for path, node in object_nodes(schema()):
        if path == ".global":  # Helm's own, shared with parent charts
            continue
        closed = node.get("additionalProperties")
        # Either a fixed set of keys, or a map whose values have a type (labels, ...).
        assert closed is False or (isinstance(closed, dict) and "type" in closed), path


def leaves(
    values: dict[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_schema_defaults_are_the_values_yaml_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    root = schema()
    for path, value in leaves(values):
        node = root
        for key in path:
            assert key in node.get("properties", {}), f"{'.'.join(path)} is not in the schema"
            node = node["properties"][key]
        assert node.get("default") == value, ".".join(path)

    # And nothing in the schema that values.yaml does not show (global aside).
    def keys(node: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
        for key, child in (node.get("properties") or {}).items():
            if "properties" in child:
                yield from keys(child, (*path, key))
            else:
                yield (*path, key)

    shown = {p for p, _ in leaves(values)}
    assert {k for k in keys(root) if k != ("global",)} == shown


def comment_blocks() -> dict[tuple[str, ...], list[str]]:
    """values.yaml keys (as paths) with the comment lines right above each."""
    blocks: dict[tuple[str, ...], list[str]] = {}
    stack: list[tuple[int, str]] = []
    comments: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            comments = []
            continue
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("# ").rstrip())
            continue
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        assert match, line
        indent = len(match.group(1))
        stack = [(i, k) for i, k in stack if i < indent]
        stack.append((indent, match.group(2)))
        blocks[tuple(k for _, k in stack)] = comments
        comments = []
    return blocks


def test_every_values_key_is_documented_with_an_example() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    blocks = comment_blocks()
    leaf_paths = {p for p, _ in leaves(values)}
    for path, comments in blocks.items():
        name = ".".join(path)
        if path in leaf_paths:
            assert any(c.startswith("Example: ") for c in comments), f"{name}: no example"
            described = [c for c in comments if not c.startswith("Example: ")]
            # Leaves of a requests/limits block are named by their key (cpu, memory).
            if path[-1] not in ("cpu", "memory"):
                assert described, f"{name}: no description"
        elif path[-1] not in ("requests", "limits", "image") or len(path) == 1:
            assert comments, f"{name}: no description"


# -- the operator pod --------------------------------------------------------------------


def test_one_replica_replaced_with_recreate() -> None:
    # Rendered below; the reason is written next to it for the reader of the chart.
    text = (CHART / "templates" / "deployment.yaml").read_text()
    assert "Recreate" in text and "no peering" in text


def test_deployment_shape(helm: Path) -> None:
    deployment = one(render(helm), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "ib-imagebatch"
    c = container(render(helm))
    assert c["command"] == ["imagebatch-operator"]
    assert "args" not in c
    assert c["ports"] == [
        {"name": "health", "containerPort": 8080, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = plain_env(render(helm))
    assert env["IMAGEBATCH_LIVENESS_ENDPOINT"] == "http://0.0.0.0:8080/healthz"
    assert c["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }


def test_liveness_port_and_address_are_values(helm: Path) -> None:
    objects = render(helm, {"liveness": {"port": 18555, "bindAddress": "127.0.0.1"}})
    assert container(objects)["ports"][0]["containerPort"] == 18555
    assert plain_env(objects)["IMAGEBATCH_LIVENESS_ENDPOINT"] == "http://127.0.0.1:18555/healthz"


def test_verbose_adds_the_flag(helm: Path) -> None:
    assert container(render(helm, {"verbose": True}))["args"] == ["--verbose"]


def test_pod_meets_the_restricted_pod_security_standard(helm: Path) -> None:
    pod = one(render(helm), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": plan.WORKER_UID,
        "runAsGroup": plan.WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c = pod["containers"][0]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    assert "hostNetwork" not in pod and "hostPID" not in pod
    assert all("hostPort" not in p for p in c["ports"])


def test_pod_extras_pass_through(helm: Path) -> None:
    values = {
        "podAnnotations": {"a.example.com/x": "1"},
        "podLabels": {"team": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "high",
        "imagePullSecrets": [{"name": "regcred"}],
    }
    deployment = one(render(helm, values), "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {"a.example.com/x": "1"}
    assert template["metadata"]["labels"]["team"] == "platform"
    # Extra labels never leak into the selector (it is immutable on upgrade).
    assert "team" not in deployment["spec"]["selector"]["matchLabels"]
    assert template["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert template["spec"]["tolerations"][0]["key"] == "dedicated"
    assert template["spec"]["priorityClassName"] == "high"
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def services(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services by what they front: the part of the name after the release's name."""
    return {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in objects if o["kind"] == "Service"}


def test_health_service_is_optional_and_targets_the_health_port(helm: Path) -> None:
    assert "health" not in services(render(helm))
    service = services(render(helm, {"healthService": {"enabled": True, "port": 80}}))["health"]
    assert service["spec"]["ports"] == [
        {"name": "health", "port": 80, "targetPort": "health", "protocol": "TCP"}
    ]
    labels = one(render(helm), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_metrics_have_a_port_a_service_and_an_optional_service_monitor(helm: Path) -> None:
    objects = render(helm)
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert ports["metrics"] == 8081
    assert plain_env(objects)["IMAGEBATCH_METRICS_PORT"] == "8081"
    service = services(objects)["metrics"]
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8081, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    monitored = render(
        helm, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    )
    monitor = one(monitored, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        services(monitored)["metrics"]["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    off = render(helm, {"metrics": {"enabled": False}})
    assert plain_env(off)["IMAGEBATCH_METRICS_PORT"] == "0"
    assert "metrics" not in services(off)
    assert "metrics" not in {p["name"] for p in container(off)["ports"]}


def test_the_dashboard_charts_only_metrics_the_operator_exports() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from imagebatch_operator.metrics import Metrics

    exported = set()
    metrics = Metrics()
    metrics.watch_batches(lambda: {})
    metrics.watch_queue(lambda: 0, lambda: 0, lambda: 0)
    from prometheus_client import generate_latest

    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        exported |= {sample.name for sample in family.samples} | {family.name}
        if family.type == "counter":  # a counter with no series yet still has its name
            exported.add(f"{family.name}_total")
    dashboard = json.loads((CHART / "dashboards" / "imagebatch.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bimagebatch_[a-z_]+", target["expr"])
    }
    assert used and used <= exported, used - exported
    assert {"imagebatch_batches", "imagebatch_images_total"} <= used


# -- RBAC -------------------------------------------------------------------------------

NAMESPACED_RULES = [
    {
        "apiGroups": ["imagebatch.dev"],
        "resources": ["imagebatches"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {
        "apiGroups": ["imagebatch.dev"],
        "resources": ["imagebatches/status"],
        "verbs": ["get", "patch"],
    },
    {
        "apiGroups": ["imagebatch.dev"],
        "resources": ["imagebatches/finalizers"],
        "verbs": ["update"],
    },
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
CRD_WATCH = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACE_WATCH = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}


OPERATOR_ONLY = {"rbac": {"userRoles": False}}  # the operator's own rules, without the users'


def test_watching_every_namespace_binds_one_cluster_role(helm: Path) -> None:
    objects = render(helm, OPERATOR_ONLY)
    role = one(objects, "ClusterRole")
    assert role["rules"] == [*NAMESPACED_RULES, CRD_WATCH]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ib-imagebatch", "namespace": "imagebatch-system"}
    ]
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding")]


def test_watching_some_namespaces_binds_a_role_in_each(helm: Path) -> None:
    objects = render(helm, {**OPERATOR_ONLY, "watchNamespaces": ["team-a", "team-b"]})
    roles = [o for o in objects if o["kind"] == "Role"]
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    assert all(r["rules"] == NAMESPACED_RULES for r in roles)
    # Cluster-wide only what kopf reads there: CRDs and namespace names, no Secrets.
    assert one(objects, "ClusterRole")["rules"] == [CRD_WATCH, NAMESPACE_WATCH]
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "ib-imagebatch"
    assert plain_env(objects)["IMAGEBATCH_WATCH_NAMESPACES"] == "team-a,team-b"


def test_no_wildcards_and_pods_only_watched(helm: Path) -> None:
    for values in ({}, {"watchNamespaces": ["a"]}):
        for o in render(helm, values):
            for rule in o.get("rules", []):
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                if "pods" in rule["resources"]:  # the Job controller makes them; it only reads
                    assert rule["verbs"] == ["list", "watch"]


def test_rbac_and_service_account_can_be_left_to_the_administrator(helm: Path) -> None:
    objects = render(
        helm, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}}
    )
    # What is left: the Deployment, the metrics Service and the users' aggregated roles.
    assert sorted(o["kind"] for o in objects) == [
        "ClusterRole",
        "ClusterRole",
        "Deployment",
        "Service",
    ]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_names_follow_release_and_overrides(helm: Path) -> None:
    objects = render(helm, {"fullnameOverride": "batches"})
    assert {o["metadata"]["name"] for o in objects} == {
        "batches",
        "batches-metrics",
        "batches-edit",
        "batches-view",
    }
    for o in objects:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "imagebatch"
        assert labels["app.kubernetes.io/instance"] == "ib"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_users_get_roles_aggregated_into_the_built_in_ones(helm: Path) -> None:
    roles = {
        o["metadata"]["name"].rsplit("-", 1)[-1]: o
        for o in render(helm)
        if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith(("-edit", "-view"))
    }
    edit, view = roles["edit"], roles["view"]
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "create" in edit["rules"][0]["verbs"] and "delete" in edit["rules"][0]["verbs"]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert view["rules"][0]["verbs"] == ["get", "list", "watch"]
    off = render(helm, {"rbac": {"userRoles": False}})
    assert not [o for o in off if o["metadata"]["name"].endswith(("-edit", "-view"))]
