"""Build the real servers the local stack runs, from Go modules, at pinned versions.

No registry ships kube-apiserver, kube-controller-manager, etcd or the MinIO server as a
package, but the Go module proxy serves their sources. Each binary is built once in a
small wrapper module of our own and cached outside the repository under
``$IMAGEBATCH_CACHE/bin/<name>-<version>`` (default ``~/.cache/imagebatch``); a later
run finds it there and builds nothing.

Kubernetes cannot be ``go install``-ed directly: its go.mod points every staging module
(``k8s.io/api``, ``k8s.io/client-go``, ...) at ``./staging/...`` and Go ignores a
dependency's ``replace`` lines. The wrapper module therefore carries one
``replace k8s.io/X => k8s.io/X v0.N.M`` line per staging module, generated from the
pinned release's own go.mod, so a version bump is one edit to ``VERSIONS``.

Test tools of our own (``tests/kstatus``: the kstatus library run on live objects) are
built the same way from their folder in this repository, which is their module: the
cache name carries the pinned library version and a digest of the folder's files, so
an edit builds a new binary and an unchanged tool is never rebuilt.

Run ``python -m tests.cluster.build`` to build everything that is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The one place the versions live. A bump here is the whole upgrade.
KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
# MinIO has no semver tags; this pseudo-version is its last published source snapshot.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
# sigs.k8s.io/cli-utils, whose kstatus package Flux and kapply compute health with
# (also pinned in tests/kstatus/go.mod; a unit test keeps the two equal).
CLI_UTILS_VERSION = "v0.37.2"

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class GoBinary:
    """One binary built from one package of one pinned module.

    With ``source`` (a folder of this repository holding a go.mod), the module is that
    folder, ``version`` is the version of the library it is built for, and ``package``
    is relative to the folder.
    """

    name: str
    module: str
    version: str
    package: str
    tags: str = ""
    source: str = ""

    @property
    def cache_name(self) -> str:
        if self.source:
            return f"{self.name}-{self.version}-{source_digest(REPO_ROOT / self.source)}"
        return f"{self.name}-{self.version}"


def source_digest(folder: Path) -> str:
    """A short digest of a tool's files (names and contents), for its cache name."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


BINARIES: tuple[GoBinary, ...] = (
    GoBinary("etcd", "go.etcd.io/etcd/server/v3", ETCD_VERSION, "go.etcd.io/etcd/server/v3"),
    GoBinary(
        "kube-apiserver",
        "k8s.io/kubernetes",
        KUBERNETES_VERSION,
        "k8s.io/kubernetes/cmd/kube-apiserver",
    ),
    GoBinary(
        "kube-controller-manager",
        "k8s.io/kubernetes",
        KUBERNETES_VERSION,
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    GoBinary("kubectl", "k8s.io/kubernetes", KUBERNETES_VERSION, "k8s.io/kubernetes/cmd/kubectl"),
    GoBinary("minio", "github.com/minio/minio", MINIO_VERSION, "github.com/minio/minio", "kqueue"),
    GoBinary("helm", "helm.sh/helm/v3", HELM_VERSION, "helm.sh/helm/v3/cmd/helm"),
    GoBinary("kstatus", "sigs.k8s.io/cli-utils", CLI_UTILS_VERSION, ".", source="tests/kstatus"),
)

_STAGING_REPLACE = re.compile(r"^\s*(?:replace\s+)?(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", re.M)
_STAGING_REQUIRE = re.compile(r"^\s*(?:require\s+)?(k8s\.io/[\w.-]+)\s+v0\.0\.0(?=\s|$)", re.M)


def cache_root() -> Path:
    """Where binaries and build modules are kept between runs."""
    env = os.environ.get("IMAGEBATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "imagebatch"


def binary_path(name: str) -> Path:
    """The cached path of a binary by its short name (it may not exist yet)."""
    for binary in BINARIES:
        if binary.name == name:
            return cache_root() / "bin" / binary.cache_name
    raise KeyError(f"unknown binary {name!r}; known: {[b.name for b in BINARIES]}")


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """Names of the staging modules that k8s.io/kubernetes's go.mod points at ./staging."""
    found = set(_STAGING_REPLACE.findall(kubernetes_go_mod))
    found.update(_STAGING_REQUIRE.findall(kubernetes_go_mod))
    return sorted(found)


def staging_version(kubernetes_version: str) -> str:
    """Kubernetes v1.N.M ships its staging modules as v0.N.M."""
    match = re.fullmatch(r"v1\.(\d+)\.(\d+)(-[\w.]+)?", kubernetes_version)
    if not match:
        raise ValueError(f"not a Kubernetes release version: {kubernetes_version!r}")
    return f"v0.{match.group(1)}.{match.group(2)}{match.group(3) or ''}"


def replace_lines(kubernetes_go_mod: str, kubernetes_version: str) -> list[str]:
    """One ``replace`` line per staging module, pinned to the matching v0.N.M release."""
    version = staging_version(kubernetes_version)
    return [f"replace {m} => {m} {version}" for m in staging_modules(kubernetes_go_mod)]


def kubernetes_ldflags(kubernetes_version: str) -> str:
    """Version stamps, so ``kubectl version`` reports the real release, not v0.0.0-master."""
    major, minor = kubernetes_version.lstrip("v").split(".")[:2]
    stamps = {
        "gitVersion": kubernetes_version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
    }
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{key}={value}" for key, value in stamps.items()]
    return " ".join(flags)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _go(args: list[str], cwd: Path) -> str:
    result = subprocess.run(
        ["go", *args], cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"go {' '.join(args)} failed in {cwd}:\n{result.stderr[-4000:]}")
    return result.stdout


def _wrapper_module(module: str, version: str) -> Path:
    """A module of our own that requires ``module@version`` (with replace lines for k8s)."""
    slug = module.replace("/", "_").replace(".", "_")
    work = cache_root() / "build" / f"{slug}-{version}"
    if (work / "go.sum").exists():
        return work
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"module imagebatch.local/build/{slug}", "", "go 1.25", ""]
    if module == "k8s.io/kubernetes":
        info = json.loads(_go(["mod", "download", "-json", f"{module}@{version}"], work.parent))
        go_mod = Path(info["GoMod"]).read_text()
        lines += replace_lines(go_mod, version)
    (work / "go.mod").write_text("\n".join(lines) + "\n")
    return work


def build(binary: GoBinary) -> Path:
    """Build one binary into the cache unless it is already there; return its path.

    A lock file serialises builds between processes (two test runs, or ``make`` and a
    fixture), so each binary is built once and never half-written.
    """
    target = cache_root() / "bin" / binary.cache_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (cache_root() / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        return _build(binary, target)


def _build(binary: GoBinary, target: Path) -> Path:
    print(f"[build] {binary.name} {binary.version} from {binary.module} ...", flush=True)
    started = time.monotonic()
    if binary.source:
        # Our own module: its go.mod and go.sum pin every dependency already.
        work = REPO_ROOT / binary.source
    else:
        work = _wrapper_module(binary.module, binary.version)
        _go(["get", f"{binary.package}@{binary.version}"], work)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    args = ["build", "-trimpath", "-o", str(partial)]
    if binary.tags:
        args += ["-tags", binary.tags]
    if binary.module == "k8s.io/kubernetes":
        args += ["-ldflags", kubernetes_ldflags(binary.version)]
    else:
        args += ["-ldflags", "-s -w"]
    _go([*args, binary.package], work)
    partial.rename(target)
    elapsed = time.monotonic() - started
    print(f"[build] {binary.name} done in {elapsed:.0f}s -> {target}", flush=True)
    return target


def ensure_all(names: list[str] | None = None) -> dict[str, Path]:
    """Build whatever is missing; return every binary's path by short name."""
    if shutil.which("go") is None:
        raise RuntimeError("the Go toolchain is needed to build the local cluster's servers")
    chosen = [b for b in BINARIES if names is None or b.name in names]
    return {b.name: build(b) for b in chosen}


def main(argv: list[str]) -> int:
    paths = ensure_all(argv or None)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
