"""A container's environment and command line, as a kubelet would resolve them, then localised.

Pure functions: the API lookups (ConfigMaps, Secrets) come in as callables.

Resolution follows core/v1: `envFrom` first, then `env` in order; `$(VAR)`
references to variables defined earlier expand (`$$` escapes, unknown ones stay
verbatim), and command and args expand against the final environment.
Localisation then maps the container's view onto this machine: cluster DNS
names of the pod's namespace become 127.0.0.1, paths under a volumeMount move
under the pod's root directory, and `python` is this interpreter.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

LOCALHOST = "127.0.0.1"
WILDCARD = "0.0.0.0"
CLUSTER_DOMAIN = "cluster.local"

Lookup = Callable[[str, str], Mapping[str, str] | None]  # (namespace, name) -> data, None when missing


class ConfigError(Exception):
    """The container cannot start yet: a referenced ConfigMap, Secret or key is missing (CreateContainerConfigError)."""


_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables expand, `$$` is a literal `$`, anything else stays."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _REF.sub(sub, value)


_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A downward API fieldRef."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    m = _FIELD_INDEX.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP") or LOCALHOST,
        "status.podIPs": status.get("podIP") or LOCALHOST,
        "status.hostIP": status.get("hostIP") or LOCALHOST,
        "status.hostIPs": status.get("hostIP") or LOCALHOST,
    }
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return str(simple[path] or "")


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


def resource_value(container: Mapping[str, Any], ref: Mapping[str, Any], node_cpus: int) -> str:
    """resourceFieldRef: limits/requests of the container (cpu rounded up to whole cores, as the kubelet does)."""
    kind, _, res = str(ref.get("resource", "")).partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(res)
    if value is None:
        value = str(node_cpus) if res == "cpu" else "0"
    if res == "cpu":
        m = _CPU.match(str(value))
        if m:
            cores = float(m.group(1)) / (1000 if m.group(2) else 1)
            divisor = str(ref.get("divisor") or "1")
            dm = _CPU.match(divisor)
            div = float(dm.group(1)) / (1000 if dm.group(2) else 1) if dm else 1.0
            return str(max(1, -(-int(cores * 1000) // int(div * 1000))))
    return str(value)


def _secret_data(data: Mapping[str, str] | None) -> dict[str, str] | None:
    if data is None:
        return None
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}


def resolve(pod: Mapping[str, Any], container: Mapping[str, Any], *, config_maps: Lookup, secrets: Lookup,
            node_cpus: int = 1) -> dict[str, str]:
    """The container's environment, as the pod spec declares it (secrets: `data`, base64 as the API returns it)."""
    ns = (pod.get("metadata") or {}).get("namespace") or "default"
    env: dict[str, str] = {}

    def source(kind: str, name: str, optional: bool) -> Mapping[str, str] | None:
        data = config_maps(ns, name) if kind == "configMap" else _secret_data(secrets(ns, name))
        if data is None and not optional:
            raise ConfigError(f"{kind} {name!r} not found")
        return data

    for item in container.get("envFrom") or []:
        prefix = item.get("prefix") or ""
        for kind in ("configMap", "secret"):
            ref = item.get(f"{kind}Ref")
            if ref is not None:
                data = source(kind, ref.get("name", ""), bool(ref.get("optional")))
                for k, v in (data or {}).items():
                    env[prefix + k] = v
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        vf = var["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = resource_value(container, vf["resourceFieldRef"], node_cpus)
        else:
            kind = "configMap" if "configMapKeyRef" in vf else "secret"
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef") or {}
            optional = bool(ref.get("optional"))
            data = source(kind, ref.get("name", ""), optional)
            if data is not None and ref.get("key") in data:
                env[name] = data[ref["key"]]
            elif not optional:
                raise ConfigError(f"key {ref.get('key')!r} not found in {kind} {ref.get('name')!r}")
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; the image's entrypoint is unknown here, so a command is required."""
    command = list(container.get("command") or [])
    if not command:
        raise ConfigError("the dev node ignores images: the container needs an explicit command")
    return [expand(str(a), env) for a in command + list(container.get("args") or [])]


# --------------------------------------------------------------- localisation


def cluster_host(name: str, namespace: str, services: Iterable[str]) -> bool:
    """Whether a host name is a cluster DNS name that, on this node, means a local pod.

    `<svc>`, `<host>.<svc>` (a pod behind a headless Service: hostname.subdomain),
    each optionally followed by `.<namespace>`, `.svc` and `.cluster.local`.
    """
    parts = name.lower().split(".")
    if parts[-2:] == CLUSTER_DOMAIN.split("."):
        parts = parts[:-2]
    fully = bool(parts) and parts[-1] == "svc"
    if fully:
        parts = parts[:-1]
        if len(parts) < 2:
            return False
        if parts[-1] != namespace:
            return True  # a Service of another namespace: still this cluster, still here
        parts = parts[:-1]
    elif len(parts) >= 2 and parts[-1] == namespace:
        parts = parts[:-1]
    return 1 <= len(parts) <= 2 and parts[-1] in set(services)


_HOSTPORT = re.compile(r"^(?P<host>[A-Za-z0-9][-A-Za-z0-9.]*?)(?P<port>:\d+)?$")


def localise_hosts(value: str, namespace: str, services: Iterable[str], pod_ip: str | None = None) -> str:
    """`NAME`, `NAME:PORT`, `--flag=NAME[:PORT]` with NAME a cluster name -> 127.0.0.1 (an /etc/hosts entry, in
    effect); the wildcard address 0.0.0.0 -> the pod's own IP (in a pod it means the pod's interfaces)."""
    flag, eq, rest = value.partition("=") if value.startswith("-") else ("", "", value)
    m = _HOSTPORT.match(rest)
    if m and m.group("host") == WILDCARD and pod_ip:
        return f"{flag}{eq}{pod_ip}{m.group('port') or ''}"
    # A bare word is a host only with a port (`svc:8000`): an argument that merely equals a Service's name
    # (a model called like its LlamaServe) is not an address.
    if not m or "." not in m.group("host") and not m.group("port"):
        return value
    if not cluster_host(m.group("host"), namespace, services):
        return value
    return f"{flag}{eq}{LOCALHOST}{m.group('port') or ''}"


def translate_path(value: str, mount_paths: Iterable[str], root: str) -> str:
    """A path under one of the container's mount paths, moved under `root` (where they are mirrored)."""
    flag, eq, rest = value.partition("=") if value.startswith("-") and "=" in value else ("", "", value)
    if not rest.startswith("/"):
        return value
    for mp in mount_paths:
        mp = mp.rstrip("/") or "/"
        if rest == mp or rest.startswith(mp + "/"):
            return f"{flag}{eq}{root.rstrip('/')}{rest}"
    return value


def localise(value: str, *, namespace: str, services: Sequence[str], mount_paths: Sequence[str], root: str,
             pod_ip: str | None = None) -> str:
    return translate_path(localise_hosts(value, namespace, services, pod_ip), mount_paths, root)


PYTHON_NAMES = ("python", "python3")


def local_argv(argv: Sequence[str], python: str) -> list[str]:
    """`python ...` runs this interpreter (the image's Python is this venv's)."""
    out = list(argv)
    if out and out[0].rsplit("/", 1)[-1] in PYTHON_NAMES:
        out[0] = python
    return out
