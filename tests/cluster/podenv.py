"""Resolve a container's environment, command and args the way the kubelet does.

Pure functions over plain pod dicts (the API's camelCase JSON), so they are unit-tested
without a server. ConfigMaps and Secrets are looked up through callables the caller
passes in; a missing non-optional reference raises ``EnvError`` naming it, which is
what the kubelet reports as ``CreateContainerConfigError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# name, key -> value; None when the object or the key does not exist.
Lookup = Callable[[str, str], "str | None"]
# name -> whole data map; None when the object does not exist.
LookupAll = Callable[[str], "Mapping[str, str] | None"]

_FIELD_PATH = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class EnvError(Exception):
    """A reference in the pod's environment cannot be resolved."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: unknown references stay as written, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath``."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = _FIELD_PATH.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise EnvError(f"unsupported fieldRef.fieldPath {path!r}")


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    config_map: Lookup,
    secret: Lookup,
    config_map_all: LookupAll,
    secret_all: LookupAll,
) -> dict[str, str]:
    """The container's environment: ``envFrom`` first, then ``env`` in order, like the kubelet."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, lookup in (("configMapRef", config_map_all), ("secretRef", secret_all)):
            ref = source.get(kind)
            if ref is None:
                continue
            data = lookup(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f"envFrom {kind} {ref['name']!r} not found")
            for key, value in data.items():
                env[prefix + key] = value
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
            continue
        for kind, key_lookup in (("configMapKeyRef", config_map), ("secretKeyRef", secret)):
            ref = source.get(kind)
            if ref is None:
                continue
            found = key_lookup(ref["name"], ref["key"])
            if found is not None:
                env[name] = found
            elif not ref.get("optional"):
                raise EnvError(f"env {name}: {kind} {ref['name']}/{ref['key']} not found")
            break
        else:
            raise EnvError(f"env {name}: unsupported valueFrom {sorted(source)}")
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """``command`` + ``args`` with ``$(VAR)`` expanded; the image entrypoint is not known here."""
    argv = [expand(a, env) for a in (container.get("command") or [])]
    argv += [expand(a, env) for a in (container.get("args") or [])]
    if not argv:
        raise EnvError(f"container {container.get('name')!r} has no command: images are not run")
    return argv


def wants_service_account_token(pod: Mapping[str, Any]) -> bool:
    """True when admission gave the pod a projected service-account token volume."""
    for volume in pod.get("spec", {}).get("volumes") or []:
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "serviceAccountToken" in source:
                return True
    return False
