"""A node agent that stands in for the kubelet: real pods, run as local processes.

No container engine runs on these machines, yet the operator's Jobs must be driven by
the real Job controller. The agent closes the gap the kubelet would fill:

- registers a Ready Node and binds every unscheduled pod to it (no scheduler runs);
- runs each container's ``command``/``args`` as a local process (the image is ignored;
  the project's console scripts are on PATH) with the environment resolved as the
  kubelet resolves it (see ``podenv``), and, when admission gave the pod a
  service-account token volume, a kubeconfig built from a TokenRequest for that
  service account, so the process has exactly the RBAC rights a real pod would;
- honours ``restartPolicy`` and writes the pod status (phase, container states with
  exit codes, conditions) so the Job controller counts, retries and completes;
- treats deletion as termination: SIGTERM, SIGKILL after the grace period, a terminal
  status, then ``DELETE`` with grace period 0, as the kubelet does;
- serves the kubelet's container-log endpoint, so ``kubectl logs`` works: the API server
  proxies it to ``https://<InternalIP>:<daemonEndpoints.kubeletEndpoint.Port>/containerLogs/
  {namespace}/{pod}/{container}``. The agent listens on 127.0.0.1 with a serving
  certificate from the cluster's CA and accepts only clients with a certificate from
  that CA (the API server's kubelet-client certificate). ``follow``, ``tailLines`` and
  ``limitBytes`` behave as on a kubelet; ``timestamps``, ``sinceSeconds`` and
  ``sinceTime`` are ignored (the agent keeps no time per line), and ``previous`` is
  refused (a restarted container's output is appended to the same file);
- outlives the API server going away: every write whose loss would wedge a pod (its
  status, the final ``DELETE``) is retried with backoff until the API server answers or
  the agent shuts down (``retry``), and the pod watch lists and watches again.

A container killed by a signal reports exit code 128 + the signal number (137 for
SIGKILL), as container runtimes do.

Run: ``python -m tests.cluster.node_agent --kubeconfig K --server URL --ca CA --workdir D
--serving-cert C --serving-key K``. Container output goes to
``D/logs/<namespace>_<pod>_<container>.log``.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.cluster import pki, podenv
from tests.cluster.proc import die_with_parent
from tests.cluster.retry import Backoff, Stopped, is_transient, retry

log = logging.getLogger("node-agent")

NODE_NAME = "imagebatch-node"
POD_IP = "127.0.0.1"
TERMINAL = ("Succeeded", "Failed")
_SMP = "application/strategic-merge-patch+json"
# A request the API server accepted but never answers must not hold a write forever.
_REQUEST_TIMEOUT = 15
# Seconds to wait before listing pods again after the watch failed (n-th time in a row).
WATCH_BACKOFF = Backoff(initial=0.5, factor=2.0, cap=5.0)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_conditions(ready: bool, stamp: str) -> list[dict[str, str]]:
    """The four conditions a kubelet keeps on a scheduled pod."""
    status = "True" if ready else "False"
    return [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
        {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
        {"type": "ContainersReady", "status": status, "lastTransitionTime": stamp},
        {"type": "Ready", "status": status, "lastTransitionTime": stamp},
    ]


def terminal_phase(exit_codes: Mapping[str, int]) -> str:
    """Succeeded only when every container exited 0, as for ``restartPolicy: Never``."""
    return "Succeeded" if all(code == 0 for code in exit_codes.values()) else "Failed"


@dataclass(frozen=True)
class LogRequest:
    """A ``/containerLogs/{namespace}/{pod}/{container}`` request, as the kubelet reads it."""

    namespace: str
    pod: str
    container: str
    follow: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None


class BadLogRequest(ValueError):
    """Not a log request the agent can answer; the message says why (HTTP 400 or 404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_log_request(target: str) -> LogRequest:
    """The request line's target (path and query) as a ``LogRequest``."""
    parts = urlsplit(target)
    segments = [unquote(s) for s in parts.path.split("/")]
    if len(segments) != 5 or segments[1] != "containerLogs" or not all(segments[2:]):
        raise BadLogRequest(404, f"not found: {parts.path}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}

    def number(name: str) -> int | None:
        if name not in query:
            return None
        try:
            value = int(query[name])
        except ValueError:
            raise BadLogRequest(400, f"{name} must be an integer, not {query[name]!r}") from None
        if value < 0:
            raise BadLogRequest(400, f"{name} must not be negative")
        return value

    if query.get("previous", "false").lower() == "true":
        raise BadLogRequest(
            400, "previous container logs are not kept: restarts append to one file"
        )
    return LogRequest(
        namespace=segments[2],
        pod=segments[3],
        container=segments[4],
        follow=query.get("follow", "false").lower() == "true",
        tail_lines=number("tailLines"),
        limit_bytes=number("limitBytes"),
    )


def select_log(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The part of a log a kubelet returns: the last ``tail_lines`` lines, then at most
    ``limit_bytes`` bytes of those from their start."""
    if tail_lines is not None:
        if tail_lines == 0:
            data = b""
        else:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail_lines:])
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


class LogServer:
    """The container-log endpoint on 127.0.0.1, HTTPS with client certificates."""

    def __init__(self, agent: NodeAgent, cert: Path, key: Path, client_ca: Path):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self.httpd = _TlsServer(("127.0.0.1", 0), _log_handler(agent), context)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()


class _TlsServer(ThreadingHTTPServer):
    """TLS with the handshake in each connection's own thread, under a timeout.

    Wrapping the listening socket would run every handshake in the accept loop: one
    client that connects and says nothing (a port probe from another program on this
    machine) would then stall every later ``kubectl logs``.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ):
        self.context = context
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        connection, address = self.socket.accept()
        wrapped = self.context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("log endpoint: connection from %s failed", client_address, exc_info=True)


def _log_handler(agent: NodeAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: the body ends when the connection closes, which is what a followed
        # log needs (no length is known up front).
        protocol_version = "HTTP/1.0"
        timeout = 30  # seconds for the handshake and any one read or write

        def setup(self) -> None:
            super().setup()
            self.connection.do_handshake()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("log endpoint: " + format, *args)

        def _refuse(self, status: int, message: str) -> None:
            body = (message + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            try:
                request = parse_log_request(self.path)
            except BadLogRequest as error:
                self._refuse(error.status, str(error))
                return
            path = agent.log_path(request.namespace, request.pod, request.container)
            if not path.is_file():
                self._refuse(
                    404,
                    f"no output of container {request.container!r} of pod "
                    f"{request.namespace}/{request.pod} on this node",
                )
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            try:
                self._send(request, path)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client went away (kubectl logs -f interrupted)

        def _send(self, request: LogRequest, path: Path) -> None:
            with path.open("rb") as f:
                data = select_log(f.read(), request.tail_lines, request.limit_bytes)
                self.wfile.write(data)
                self.wfile.flush()
                budget = None if request.limit_bytes is None else request.limit_bytes - len(data)
                if not request.follow:
                    return
                # Follow: send what is appended until the container has exited and
                # everything it wrote is sent.
                while budget is None or budget > 0:
                    running = agent.container_running(
                        request.namespace, request.pod, request.container
                    )
                    more = f.read(65536 if budget is None else min(budget, 65536))
                    if more:
                        self.wfile.write(more)
                        self.wfile.flush()
                        if budget is not None:
                            budget -= len(more)
                    elif not running:
                        return
                    else:
                        time.sleep(0.2)

    return Handler


def container_exit_code(returncode: int) -> int:
    """A process's return code as a container runtime reports it: 128 + N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Container:
    """One running container: a process group of its own, output appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log
        self.restarts = 0
        self.started_at = now()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.started_at = now()
        with self.log_path.open("ab") as out:
            try:
                self.process = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    cwd=self.cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as error:
                out.write(f"cannot start {self.argv[0]!r}: {error}\n".encode())
                self.process = None

    def exit_code(self) -> int | None:
        if self.process is None:
            return 127
        code = self.process.poll()
        return None if code is None else container_exit_code(code)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass


class PodRunner(threading.Thread):
    """Runs one pod from start to a terminal phase, or until it is deleted."""

    def __init__(self, agent: NodeAgent, pod: dict[str, Any]):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.restart_policy: str = pod["spec"].get("restartPolicy", "Always")
        self.terminate = threading.Event()
        self.grace_seconds = 30
        self.containers: list[Container] = []
        self.started_at = now()

    # -- status ---------------------------------------------------------------

    def _patch_status(
        self, status: dict[str, Any], overtaken: Callable[[], bool] | None = None
    ) -> None:
        """Write the pod status, retrying while the API server is unreachable.

        ``overtaken`` ends the retrying early once a newer status will be written anyway.
        """
        body = {"metadata": {"uid": self.uid}, "status": status}
        what = f"status of {self.namespace}/{self.pod_name} ({status.get('phase')})"
        try:
            self.agent.write(
                lambda: self.agent.core.patch_namespaced_pod_status(
                    self.pod_name,
                    self.namespace,
                    body,
                    _content_type=_SMP,
                    _request_timeout=_REQUEST_TIMEOUT,
                ),
                what,
                give_up=overtaken,
            )
        except ApiException as error:
            if error.status not in (404, 409, 422):
                log.warning("%s: %s", what, error.reason)

    def _container_status(self, c: Container, state: dict[str, Any], ready: bool) -> dict[str, Any]:
        image = next(
            (x.get("image", "") for x in self.pod["spec"]["containers"] if x["name"] == c.name), ""
        )
        return {
            "name": c.name,
            "image": image,
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": c.restarts,
            "state": state,
        }

    def _running_status(self) -> None:
        stamp = now()
        self._patch_status(
            {
                "phase": "Running",
                "hostIP": POD_IP,
                "hostIPs": [{"ip": POD_IP}],
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "startTime": self.started_at,
                "conditions": pod_conditions(True, stamp),
                "containerStatuses": [
                    self._container_status(c, {"running": {"startedAt": c.started_at}}, True)
                    for c in self.containers
                ],
            },
            # Once a container exits or the pod is deleted, a newer status follows.
            overtaken=lambda: (
                self.terminate.is_set() or any(c.exit_code() is not None for c in self.containers)
            ),
        )

    def write_terminal_status(self, exit_codes: dict[str, int], message: str = "") -> None:
        stamp = now()
        statuses = []
        for c in self.containers:
            code = exit_codes.get(c.name, 137)
            terminated = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": stamp,
            }
            statuses.append(self._container_status(c, {"terminated": terminated}, False))
        status: dict[str, Any] = {
            "phase": terminal_phase(exit_codes) if exit_codes else "Failed",
            "hostIP": POD_IP,
            "podIP": POD_IP,
            "startTime": self.started_at,
            "conditions": pod_conditions(False, stamp),
            "containerStatuses": statuses,
        }
        if message:
            status["message"] = message
        self._patch_status(status)

    def _waiting_status(self, reason: str, message: str) -> None:
        waiting = {"waiting": {"reason": reason, "message": message}}
        self._patch_status(
            {
                "phase": "Pending",
                "hostIP": POD_IP,
                "startTime": self.started_at,
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c.get("image", ""),
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": waiting,
                    }
                    for c in self.pod["spec"]["containers"]
                ],
            }
        )

    # -- lifecycle ------------------------------------------------------------

    def _prepare(self) -> list[Container] | None:
        """Resolve every container; None while a referenced object is missing."""
        pod = dict(self.pod)
        pod["status"] = {**pod.get("status", {}), "podIP": POD_IP, "hostIP": POD_IP}
        pod_dir = self.agent.workdir / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid[:8]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        base = {
            "PATH": self.agent.path,
            "HOME": str(pod_dir),
            "LANG": "C.UTF-8",
            "HOSTNAME": pod["spec"].get("hostname") or self.pod_name,
            "PYTHONUNBUFFERED": "1",
        }
        if podenv.wants_service_account_token(pod):
            base["KUBECONFIG"] = str(self.agent.token_kubeconfig(pod, pod_dir))
        containers = []
        for spec in pod["spec"]["containers"]:
            try:
                env = podenv.resolve_env(pod, spec, *self.agent.lookups(self.namespace))
                argv = podenv.command_line(spec, env)
            except podenv.EnvError as error:
                self._waiting_status("CreateContainerConfigError", str(error))
                return None
            cwd = Path(spec.get("workingDir") or pod_dir)
            if not cwd.is_dir():
                cwd = pod_dir
            log_file = self.agent.log_path(self.namespace, self.pod_name, spec["name"])
            containers.append(Container(spec["name"], argv, {**base, **env}, cwd, log_file))
        return containers

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a broken pod must not take the agent down
            log.exception("pod %s/%s", self.namespace, self.pod_name)
        finally:
            self.agent.finished(self.uid)

    def _run(self) -> None:
        prepared = None
        while prepared is None:
            try:
                prepared = self._prepare()
            except Exception as error:  # reading ConfigMaps, Secrets, a token
                if not is_transient(error):
                    raise
                log.warning("pod %s/%s waits for the API server: %s", *self._id(), error)
            if prepared is None and self.terminate.wait(2.0):
                self.write_terminal_status({}, "deleted before its containers could start")
                self.agent.delete_pod(self.namespace, self.pod_name, self.uid)
                return
        self.containers = prepared
        for c in self.containers:
            c.start()
        self._running_status()
        log.info(
            "started %s/%s: %s",
            self.namespace,
            self.pod_name,
            [" ".join(c.argv)[:120] for c in self.containers],
        )
        exit_codes: dict[str, int] = {}
        while len(exit_codes) < len(self.containers):
            if self.terminate.is_set():
                self._kill()
                codes = {
                    c.name: (c.exit_code() if c.exit_code() is not None else 137)
                    for c in self.containers
                }
                self.write_terminal_status({k: v for k, v in codes.items() if v is not None})
                self.agent.delete_pod(self.namespace, self.pod_name, self.uid)
                return
            for c in self.containers:
                if c.name in exit_codes:
                    continue
                code = c.exit_code()
                if code is None:
                    continue
                restart = self.restart_policy == "Always" or (
                    self.restart_policy == "OnFailure" and code != 0
                )
                if restart:
                    c.restarts += 1
                    time.sleep(min(0.2 * 2**c.restarts, 5.0))
                    c.start()
                    self._running_status()
                else:
                    exit_codes[c.name] = code
            time.sleep(0.05)
        log.info("pod %s/%s exited %s", self.namespace, self.pod_name, exit_codes)
        self.write_terminal_status(exit_codes)
        if self.terminate.is_set():
            self.agent.delete_pod(self.namespace, self.pod_name, self.uid)

    def _id(self) -> tuple[str, str]:
        return self.namespace, self.pod_name

    def _kill(self) -> None:
        for c in self.containers:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        while time.monotonic() < deadline and any(c.exit_code() is None for c in self.containers):
            time.sleep(0.05)
        for c in self.containers:
            c.signal(signal.SIGKILL)
            if c.process is not None:
                c.process.wait()


class NodeAgent:
    """Watches every pod; binds the unscheduled ones and runs the ones bound here."""

    def __init__(self, kubeconfig: Path, server: str, ca_cert: Path, workdir: Path):
        self.log_port = 0  # the container-log endpoint, once it listens
        self.api = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.server = server
        self.ca_cert = ca_cert
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        tools = str(Path(sys.executable).parent)
        self.path = os.pathsep.join([tools, os.environ.get("PATH", "/usr/bin:/bin")])
        self.runners: dict[str, PodRunner] = {}
        self.done: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # -- lookups for env resolution -----------------------------------------

    def _read(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        try:
            if kind == "secret":
                obj = self.core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
            cm = self.core.read_namespaced_config_map(name, namespace)
            return dict(cm.data or {})
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def lookups(
        self, namespace: str
    ) -> tuple[podenv.Lookup, podenv.Lookup, podenv.LookupAll, podenv.LookupAll]:
        """ConfigMap and Secret lookups for ``podenv.resolve_env`` in one namespace."""

        def config_map_all(name: str) -> dict[str, str] | None:
            return self._read("configmap", namespace, name)

        def secret_all(name: str) -> dict[str, str] | None:
            return self._read("secret", namespace, name)

        def config_map(name: str, key: str) -> str | None:
            return (config_map_all(name) or {}).get(key)

        def secret(name: str, key: str) -> str | None:
            return (secret_all(name) or {}).get(key)

        return config_map, secret, config_map_all, secret_all

    def token_kubeconfig(self, pod: Mapping[str, Any], pod_dir: Path) -> Path:
        """A kubeconfig holding a TokenRequest token for the pod's service account."""
        namespace = pod["metadata"]["namespace"]
        account = pod["spec"].get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            },
        }
        result = self.core.create_namespaced_service_account_token(account, namespace, body)
        path = pod_dir / "serviceaccount.kubeconfig"
        path.write_text(
            pki.token_kubeconfig(self.server, self.ca_cert, result.status.token, namespace)
        )
        path.chmod(0o600)
        return path

    # -- node and pods ----------------------------------------------------------

    def register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": NODE_NAME,
                "labels": {
                    "kubernetes.io/hostname": NODE_NAME,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        try:
            self.core.create_node(node)
        except ApiException as error:
            if error.status != 409:
                raise
        stamp = now()
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"}
        status = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "addresses": [
                    {"type": "InternalIP", "address": POD_IP},
                    {"type": "Hostname", "address": NODE_NAME},
                ],
                # Where the API server sends `kubectl logs` (the kubelet's port).
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "imagebatch node agent is running pods as local processes",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                ],
                "nodeInfo": {
                    "kubeletVersion": "imagebatch-node-agent",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "process://local",
                    "kernelVersion": os.uname().release,
                    "osImage": "local processes",
                    "kubeProxyVersion": "",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        self.core.patch_node_status(NODE_NAME, status, _content_type=_SMP)

    def bind(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
        }
        try:
            # The Binding response does not deserialise (client-python#547).
            self.core.create_namespaced_pod_binding(
                meta["name"],
                meta["namespace"],
                body,
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status not in (404, 409):
                log.warning("bind %s/%s: %s", meta["namespace"], meta["name"], error.reason)

    def write(
        self, call: Callable[[], object], what: str, give_up: Callable[[], bool] | None = None
    ) -> None:
        """Make one API write, retried while the API server is unreachable.

        Failures that are answers (4xx) are raised; the retrying ends silently when the
        agent shuts down or ``give_up()`` holds.
        """

        def failed(failures: int, error: BaseException) -> None:
            if failures == 1 or failures % 10 == 0:
                log.warning("%s: attempt %d failed, retrying: %s", what, failures, error)

        try:
            retry(
                call,
                stop=self.stop,
                give_up=give_up or (lambda: False),
                on_failure=failed,
            )
        except Stopped as stopped:
            log.info("%s: not written: %s", what, stopped)

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        """``DELETE`` with grace period 0, as the kubelet ends a pod it has terminated."""
        try:
            self.write(
                lambda: self.core.delete_namespaced_pod(
                    name,
                    namespace,
                    grace_period_seconds=0,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
                    ),
                    _request_timeout=_REQUEST_TIMEOUT,
                ),
                f"delete {namespace}/{name}",
            )
        except ApiException as error:
            if error.status not in (404, 409):
                log.warning("delete %s/%s: %s", namespace, name, error.reason)

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        """Where a container's output is (one file per container, restarts appended)."""
        return self.logs / f"{namespace}_{pod}_{container}.log"

    def container_running(self, namespace: str, pod: str, container: str) -> bool:
        """True while that container's process of a pod on this node is alive."""
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            if (runner.namespace, runner.pod_name) != (namespace, pod):
                continue
            if not runner.containers:  # still being prepared: output is coming
                return True
            for c in runner.containers:
                if c.name == container and c.exit_code() is None:
                    return True
        return False

    def finished(self, uid: str) -> None:
        with self.lock:
            self.runners.pop(uid, None)
            self.done.add(uid)

    def handle(self, event_type: str, pod: dict[str, Any]) -> None:
        if event_type == "DELETED":
            return
        meta = pod["metadata"]
        spec = pod["spec"]
        uid = meta["uid"]
        node = spec.get("nodeName")
        phase = pod.get("status", {}).get("phase")
        deleting = meta.get("deletionTimestamp") is not None
        if not node:
            if (
                not deleting
                and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
            ):
                self.bind(pod)
            return
        if node != NODE_NAME:
            return
        with self.lock:
            runner = self.runners.get(uid)
            seen = uid in self.done
        if deleting:
            if runner is not None:
                runner.grace_seconds = int(meta.get("deletionGracePeriodSeconds") or 0)
                runner.terminate.set()
            elif phase in TERMINAL or seen:
                self.delete_pod(meta["namespace"], meta["name"], uid)
            else:
                PodRunner(self, pod).write_terminal_status({}, "deleted before it started")
                self.delete_pod(meta["namespace"], meta["name"], uid)
            return
        if runner is not None or seen or phase in TERMINAL:
            return
        runner = PodRunner(self, pod)
        with self.lock:
            self.runners[uid] = runner
        runner.start()

    def watch_pods(self) -> None:
        """List every pod, then watch; on any failure list again, with backoff.

        A fresh list after the API server came back catches up with whatever happened
        while it was away (pods created, bound elsewhere, or marked for deletion).
        """
        failures = 0
        while not self.stop.is_set():
            try:
                response = self.core.list_pod_for_all_namespaces(
                    _preload_content=False, _request_timeout=_REQUEST_TIMEOUT
                )
                listing = json.loads(response.data)
                failures = 0
                for pod in listing["items"]:
                    self.handle("ADDED", pod)
                version = listing["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=version,
                    timeout_seconds=30,
                    # Longer than timeout_seconds: only a silent, dead connection hits it.
                    _request_timeout=60,
                )
                for event in stream:
                    if self.stop.is_set():
                        break
                    self.handle(event["type"], event["raw_object"])
            except Exception as error:  # the API server may be restarting: list again
                if self.stop.is_set():
                    break
                if isinstance(error, ApiException) and error.status == 410:
                    continue  # the watch fell behind etcd's history: list again at once
                failures += 1
                log.warning("pod watch (failure %d): %s", failures, error)
                self.stop.wait(WATCH_BACKOFF.delay(failures))

    def shutdown(self) -> None:
        """Stop every pod process: SIGTERM, a short grace, then SIGKILL."""
        self.stop.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            for c in runner.containers:
                c.signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for runner in runners:
            for c in runner.containers:
                while c.exit_code() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                c.signal(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--serving-cert", type=Path, required=True)
    parser.add_argument("--serving-key", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The agent logs each failed write itself; urllib3's per-connection retries add nothing.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    agent = NodeAgent(args.kubeconfig, args.server, args.ca, args.workdir)
    logs = LogServer(agent, args.serving_cert, args.serving_key, args.ca)
    logs.start()
    agent.log_port = logs.port

    def on_signal(signum: int, frame: object) -> None:
        agent.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.register_node()
    (args.workdir / "node-ready").touch()
    agent.watch_pods()
    return 0


if __name__ == "__main__":
    sys.exit(main())
