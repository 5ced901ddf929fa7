"""Start a real local cluster: etcd, kube-apiserver, kube-controller-manager, MinIO, node agent.

Every server listens on 127.0.0.1 on a free port, in a temporary folder of its own.
The control plane runs with the flags a real cluster uses for what ImageBatch needs:
RBAC authorization, the ServiceAccount admission plugin, service-account token signing
(TokenRequest), and the Job, ReplicaSet, Deployment, garbage-collector, namespace,
TTL-after-finished, service-account and root-CA-publisher controllers.

``LocalCluster`` is a context manager: leaving it stops every process (SIGTERM, then
SIGKILL) and removes the folder, whether the block succeeded or raised. Each child also
gets ``PR_SET_PDEATHSIG`` so it dies with the process that started it.

For fault drills, etcd, kube-apiserver, kube-controller-manager and MinIO can each be
stopped and started again (``stop_server``, ``start_server``, ``restart_server``, or
``server_down`` for a block of time) with the same port, data directory, flags and
environment as at first, and the start waits until the server is ready again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import requests
from minio import Minio

from tests.cluster import build, pki
from tests.cluster.proc import die_with_parent

CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "replicaset-controller",
    "deployment-controller",
    "ttl-after-finished-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class StartError(RuntimeError):
    """A server did not become ready; the message carries the tail of its log."""


@dataclass
class MinioServer:
    """Where the local MinIO listens and the root credentials it was started with."""

    endpoint: str  # host:port, no scheme
    access_key: str
    secret_key: str

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self) -> Minio:
        """A MinIO SDK client logged in as root."""
        return Minio(
            self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False
        )


@dataclass(frozen=True)
class ServerCommand:
    """How a server was started, so that it can be started again exactly so."""

    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    timeout: float


# The servers a test may stop and start again (the node agent is not one: stopping it
# ends every pod process without a status, which no real node failure looks like).
RESTARTABLE = ("etcd", "kube-apiserver", "kube-controller-manager", "minio")


@dataclass
class LocalCluster:
    """The whole local stack. Use as ``with LocalCluster() as cluster: ...``."""

    keep: bool = False  # keep the folder (logs, data) after stopping, for debugging
    kubernetes: bool = True  # False: MinIO alone, for tests that need no control plane
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imagebatch-")))
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    commands: dict[str, ServerCommand] = field(default_factory=dict)
    server: str = ""
    kubeconfig: Path = Path()
    minio: MinioServer | None = None
    binaries: dict[str, Path] = field(default_factory=dict)
    startup_seconds: float = 0.0

    # -- processes ------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``name``; a server started again takes its old place in ``processes``."""
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        for i, (existing, _) in enumerate(self.processes):
            if existing == name:
                self.processes[i] = (name, process)
                return
        self.processes.append((name, process))

    def _serve(
        self,
        name: str,
        argv: list[str],
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        """Start a server, remember how, and wait until ``ready``."""
        self.commands[name] = ServerCommand(argv, dict(env or {}), ready, timeout)
        self._spawn(name, argv, env)
        self._wait(name, ready, timeout)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        process = dict(self.processes).get(name)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise StartError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except (requests.RequestException, OSError):
                pass
            time.sleep(0.1)
        raise StartError(f"{name} not ready after {timeout:.0f}s:\n{self.log_tail(name)}")

    # -- servers --------------------------------------------------------------

    def _start_etcd(self) -> str:
        port, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        self._serve(
            "etcd",
            [
                str(self.binaries["etcd"]),
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
            lambda: requests.get(f"{url}/health", timeout=1).ok,
        )
        return url

    def _start_apiserver(self, etcd: str, keys: pki.Pki) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        cert = (str(keys.admin_cert), str(keys.admin_key))

        def ready() -> bool:
            return requests.get(
                f"{self.server}/readyz", cert=cert, verify=str(keys.ca_cert), timeout=2
            ).ok

        self._serve(
            "kube-apiserver",
            [
                str(self.binaries["kube-apiserver"]),
                "--etcd-servers",
                etcd,
                "--cert-dir",
                str(self.workdir / "apiserver"),
                "--tls-cert-file",
                str(keys.serving_cert),
                "--tls-private-key-file",
                str(keys.serving_key),
                "--client-ca-file",
                str(keys.ca_cert),
                "--secure-port",
                str(port),
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--allow-privileged",
                "--authorization-mode",
                "RBAC",
                "--service-account-issuer",
                f"{self.server}/",
                "--service-account-key-file",
                str(keys.sa_public),
                "--service-account-signing-key-file",
                str(keys.sa_private),
                # `kubectl logs` is proxied to the node agent's log endpoint: at the
                # node's InternalIP (its Hostname does not resolve), with a client
                # certificate, checking the agent's serving certificate against the CA.
                "--kubelet-preferred-address-types",
                "InternalIP",
                "--kubelet-client-certificate",
                str(keys.kubelet_client_cert),
                "--kubelet-client-key",
                str(keys.kubelet_client_key),
                "--kubelet-certificate-authority",
                str(keys.ca_cert),
                "--v",
                "1",
            ],
            ready,
            timeout=90,
        )
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.kubeconfig.write_text(pki.admin_kubeconfig(self.server, keys))
        self.kubeconfig.chmod(0o600)

    def _start_controller_manager(self, keys: pki.Pki) -> None:
        self._serve(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                "--kubeconfig",
                str(self.kubeconfig),
                "--leader-elect=false",
                "--secure-port",
                "0",
                "--use-service-account-credentials=false",
                "--root-ca-file",
                str(keys.ca_cert),
                "--controllers",
                ",".join(CONTROLLERS),
                "--v",
                "1",
            ],
            # Ready once the service-account controller has made the default account
            # (on a restart it is there already: the process only has to stay up).
            lambda: self.kubectl_ok("get", "sa", "default"),
        )

    def _start_minio(self) -> None:
        port = free_port()
        self.minio = MinioServer(f"127.0.0.1:{port}", "imagebatch", secrets.token_hex(16))
        url = self.minio.url
        self._serve(
            "minio",
            [
                str(self.binaries["minio"]),
                "server",
                str(self.workdir / "minio"),
                "--address",
                self.minio.endpoint,
                "--console-address",
                f"127.0.0.1:{free_port()}",
                "--quiet",
            ],
            lambda: requests.get(f"{url}/minio/health/ready", timeout=1).ok,
            env={
                "MINIO_ROOT_USER": self.minio.access_key,
                "MINIO_ROOT_PASSWORD": self.minio.secret_key,
                "MINIO_BROWSER": "off",
                "MINIO_UPDATE": "off",
            },
        )

    def _start_node_agent(self, keys: pki.Pki) -> None:
        agent_dir = self.workdir / "node"
        agent_dir.mkdir()
        self._spawn(
            "node-agent",
            [
                sys.executable,
                "-m",
                "tests.cluster.node_agent",
                "--kubeconfig",
                str(self.kubeconfig),
                "--server",
                self.server,
                "--ca",
                str(keys.ca_cert),
                "--workdir",
                str(agent_dir),
                "--serving-cert",
                str(keys.kubelet_serving_cert),
                "--serving-key",
                str(keys.kubelet_serving_key),
            ],
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        self._wait("node-agent", (agent_dir / "node-ready").exists)

    # -- public ---------------------------------------------------------------

    @property
    def pod_logs(self) -> Path:
        """Where the node agent writes each container's output."""
        return self.workdir / "node" / "logs"

    def env(self) -> dict[str, str]:
        """Environment for a client of this cluster: KUBECONFIG and kubectl/helm on PATH."""
        tools = self.workdir / "tools"
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": os.pathsep.join([str(tools), os.environ.get("PATH", "")]),
        }

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        """Run the built kubectl against this cluster; return its stdout."""
        result = subprocess.run(
            [str(self.binaries["kubectl"]), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def kubectl_ok(self, *args: str) -> bool:
        return (
            subprocess.run(
                [str(self.binaries["kubectl"]), "--kubeconfig", str(self.kubeconfig), *args],
                capture_output=True,
                timeout=30,
                check=False,
            ).returncode
            == 0
        )

    # -- faults ---------------------------------------------------------------

    def _process(self, name: str) -> subprocess.Popen[bytes]:
        if name not in self.commands or name not in RESTARTABLE:
            raise KeyError(f"{name!r} is not a server that can be restarted: {RESTARTABLE}")
        return dict(self.processes)[name]

    def is_running(self, name: str) -> bool:
        return self._process(name).poll() is None

    def stop_server(self, name: str, *, kill: bool = False, grace: float = 5.0) -> None:
        """Stop one server (SIGTERM, or SIGKILL when ``kill``) and wait until it is gone.

        After SIGTERM a server gets ``grace`` seconds, then SIGKILL: kube-apiserver stops
        listening at once but its process lingers for half a minute on open watches.
        Its entry stays in ``processes`` (exited), so ``stop()`` still accounts for it.
        """
        process = self._process(name)
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def start_server(self, name: str) -> None:
        """Start a stopped server again, exactly as at first, and wait until it is ready.

        Call it from a thread that outlives the server (the test's own): the child is
        told to die with the thread that started it (``PR_SET_PDEATHSIG``).
        """
        if self.is_running(name):
            raise RuntimeError(f"{name} is still running")
        command = self.commands[name]
        self._spawn(name, command.argv, command.env)
        self._wait(name, command.ready, command.timeout)

    def restart_server(self, name: str, *, kill: bool = False) -> None:
        """Stop a server and start it again on the same port, data and flags."""
        self.stop_server(name, kill=kill)
        self.start_server(name)

    @contextmanager
    def server_down(self, name: str, *, kill: bool = False) -> Iterator[None]:
        """The server is stopped for the block and running again (and ready) after it."""
        self.stop_server(name, kill=kill)
        try:
            yield
        finally:
            self.start_server(name)

    def start(self) -> LocalCluster:
        started = time.monotonic()
        self.binaries = build.ensure_all(None if self.kubernetes else ["minio"])
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self._start_minio()
            if self.kubernetes:
                tools = self.workdir / "tools"
                tools.mkdir(exist_ok=True)
                for tool in ("kubectl", "helm"):
                    (tools / tool).symlink_to(self.binaries[tool])
                keys = pki.make_pki(self.workdir / "pki")
                etcd = self._start_etcd()
                self._start_apiserver(etcd, keys)
                self._start_controller_manager(keys)
                self._start_node_agent(keys)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop every process, newest first; remove the folder unless ``keep``."""
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            # Anything the process left in its group (pod processes) goes too.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes.clear()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
