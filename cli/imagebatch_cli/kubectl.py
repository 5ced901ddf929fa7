"""The plugin's only way to the cluster: the user's own ``kubectl``, run as a process.

Running kubectl rather than a client library is deliberate. A kubectl plugin is expected
to honour ``--kubeconfig``, ``--context`` and ``-n`` exactly as kubectl does, together
with everything a kubeconfig may hold that a library reads differently or not at all
(exec credential plugins such as cloud logins, ``KUBECONFIG`` lists merged in order,
the context's default namespace, proxies). Passing those flags to the kubectl the user
already runs makes that true by construction, and every error message is kubectl's own,
which users know. The cost, a process per call, is small next to the minutes a batch
runs; waiting uses one long-lived ``kubectl get --watch``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from imagebatch_cli.errors import CliError, ExitCode
from imagebatch_cli.names import RESOURCE

# kubectl reports API errors as "Error from server (Reason): ...".
_SERVER_REASON = re.compile(r"Error from server \((\w+)\)")


class KubectlFailed(CliError):
    """kubectl exited non-zero; ``reason`` is the API's reason when it gave one."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(ExitCode.UNAVAILABLE, message)
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.reason == "NotFound"


@dataclass(frozen=True)
class Kubectl:
    """kubectl with the user's global flags; ``namespace`` None means the context's."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    binary: str = "kubectl"
    timeout: float = 120.0

    def argv(self, *args: str, namespaced: bool = True) -> list[str]:
        """The command line for ``args``, global flags first."""
        line = [self.binary]
        if self.kubeconfig:
            line += ["--kubeconfig", self.kubeconfig]
        if self.context:
            line += ["--context", self.context]
        if namespaced and self.namespace:
            line += ["--namespace", self.namespace]
        return [*line, *args]

    def _resolved(self, argv: list[str]) -> list[str]:
        found = shutil.which(argv[0])
        if found is None:
            raise CliError(
                ExitCode.UNAVAILABLE,
                f"{argv[0]} is not on PATH: the plugin runs your kubectl to reach the cluster",
            )
        return [found, *argv[1:]]

    def run(self, *args: str, stdin: str | None = None, namespaced: bool = True) -> str:
        """kubectl's stdout; ``KubectlFailed`` carrying its stderr when it fails."""
        argv = self._resolved(self.argv(*args, namespaced=namespaced))
        try:
            result = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise KubectlFailed(
                f"kubectl {args[0]} did not answer in {self.timeout:.0f}s"
            ) from error
        if result.returncode != 0:
            message = result.stderr.strip() or f"kubectl {args[0]} exited {result.returncode}"
            match = _SERVER_REASON.search(message)
            raise KubectlFailed(message, match.group(1) if match else "")
        return result.stdout

    def json(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self.run(*args, "-o", "json", stdin=stdin))

    def get_batch(self, name: str) -> dict[str, Any]:
        batch: dict[str, Any] = self.json("get", RESOURCE, name)
        return batch

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.json("create", "-f", "-", stdin=json.dumps(manifest))
        return created

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self.json(
            "patch", kind, name, "--type", "merge", "-p", json.dumps(patch)
        )
        return patched

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """A long-running kubectl (a watch) with its stdout as a pipe."""
        return subprocess.Popen(
            self._resolved(self.argv(*args)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def passthrough(self, args: Sequence[str]) -> int:
        """Run kubectl with its output going straight to ours (pod logs)."""
        argv = self._resolved(self.argv(*args))
        return subprocess.run(
            argv, check=False, stdin=subprocess.DEVNULL, env=os.environ
        ).returncode
