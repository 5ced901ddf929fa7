"""The Argo CD health check (examples/argocd/health.lua), run in Lua 5.1.

Argo CD runs health checks in gopher-lua, a Lua 5.1, with the base, string, table and
math libraries; the script gets the resource as the global ``obj`` and returns a table
with ``status`` and ``message``. ``argocd_health`` does the same through lupa's Lua 5.1,
without the os/io/package libraries, so a script that needs them fails here too.

The objects are real: ImageBatches captured from the install end-to-end test
(tests/e2e/test_install.py writes them when IMAGEBATCH_UPDATE_TESTDATA=1, and checks the
same script against the live objects on every run).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lupa.lua51  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "examples" / "argocd"
HEALTH = ARGOCD / "health.lua"
TESTDATA = ARGOCD / "testdata"
ARGOCD_KEY = "resource.customizations.health.imagebatch.dev_ImageBatch"


def argocd_health(obj: Mapping[str, Any], script: str | None = None) -> dict[str, str]:
    """Run the health check on ``obj`` as Argo CD does; return its status and message."""
    runtime = lupa.lua51.LuaRuntime(register_eval=False, register_builtins=False)
    lua_globals = runtime.globals()
    for name in ("os", "io", "debug", "package", "require", "dofile", "loadfile", "load"):
        lua_globals[name] = None
    lua_globals.obj = runtime.table_from(json.loads(json.dumps(obj)), recursive=True)
    result = runtime.execute(HEALTH.read_text() if script is None else script)
    return {"status": str(result["status"]), "message": str(result["message"] or "")}


def captured(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((TESTDATA / f"{name}.json").read_text())
    return loaded


def test_the_argocd_cm_snippet_carries_the_script_unchanged() -> None:
    config = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    assert config["kind"] == "ConfigMap" and config["metadata"]["name"] == "argocd-cm"
    assert config["data"][ARGOCD_KEY] == HEALTH.read_text()


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        pytest.param("succeeded", "Healthy", "Succeeded: ", id="succeeded"),
        pytest.param("failed-invalid-csv", "Degraded", "Failed: ", id="invalid-csv"),
        pytest.param("running-suspended", "Progressing", "Running: ", id="running"),
    ],
)
def test_real_objects(name: str, status: str, message: str) -> None:
    health = argocd_health(captured(name))
    assert health["status"] == status
    assert health["message"].startswith(message)


def test_captured_objects_are_what_their_names_say() -> None:
    """Guards the test data itself: the phase and conditions the operator wrote."""

    def conditions(obj: dict[str, Any]) -> dict[str, str]:
        return {c["type"]: c["status"] for c in obj["status"]["conditions"]}

    succeeded = captured("succeeded")
    assert succeeded["status"]["phase"] == "Succeeded"
    assert conditions(succeeded)["Ready"] == "True"
    failed = captured("failed-invalid-csv")
    assert failed["status"]["phase"] == "Failed"
    assert conditions(failed)["Stalled"] == "True" and conditions(failed)["Ready"] == "False"
    running = captured("running-suspended")
    assert running["status"]["phase"] == "Running"
    assert conditions(running)["Ready"] == "False" and conditions(running)["Stalled"] == "False"


def test_no_status_yet_is_progressing() -> None:
    obj = captured("succeeded")
    del obj["status"]
    assert argocd_health(obj) == {
        "status": "Progressing",
        "message": "Waiting for the operator to report a status",
    }


def test_a_status_for_an_older_spec_is_progressing_even_if_ready() -> None:
    obj = copy.deepcopy(captured("succeeded"))
    obj["metadata"]["generation"] = obj["status"]["observedGeneration"] + 1
    health = argocd_health(obj)
    assert health["status"] == "Progressing"
    assert (
        health["message"]
        == f"Waiting for the operator to observe generation {obj['metadata']['generation']}"
    )


def test_a_status_without_conditions_is_progressing() -> None:
    obj = captured("running-suspended")
    obj["status"] = {"observedGeneration": obj["metadata"]["generation"], "phase": "Pending"}
    assert argocd_health(obj)["status"] == "Progressing"


def test_the_runner_really_sandboxes_like_argocd() -> None:
    """A script that reaches for os fails here as it would in Argo CD."""
    with pytest.raises(lupa.lua51.LuaError):
        argocd_health(captured("succeeded"), "return {status = os.getenv('HOME')}")
