"""A pod's volumes as directories on this machine, and its container's mounts mirrored under a root directory."""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from llamaops_dev.devnode.env import ConfigError, field_value, resource_value

DEFAULT_MODE = 0o644
DEFAULT_TOKEN_SECONDS = 3607  # the kubelet's default for the projected token


class VolumeError(Exception):
    """A volume cannot be set up yet (FailedMount); retried."""


class Sources(Protocol):
    def config_map_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None: ...
    def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def claim_host_path(self, namespace: str, claim: str) -> str | None: ...
    def token(self, namespace: str, account: str, pod: Mapping[str, Any], audience: str | None,
              seconds: int) -> tuple[str, dt.datetime]: ...


@dataclass
class TokenFile:
    """A projected ServiceAccount token, refreshed at 80% of its life as the kubelet does."""

    path: Path
    audience: str | None
    seconds: int
    refresh_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class Volumes:
    paths: dict[str, Path] = field(default_factory=dict)  # volume name -> directory
    tokens: list[TokenFile] = field(default_factory=list)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _safe(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise VolumeError(f"volume item path {rel!r} must be relative, without '..'")
    return str(p)


def _keyed(target: Path, data: Mapping[str, bytes], items: list[dict[str, Any]] | None, mode: int,
           what: str) -> None:
    if items:
        for item in items:
            if item["key"] not in data:
                raise VolumeError(f"key {item['key']!r} not found in {what}")
            _write(target / _safe(item["path"]), data[item["key"]], item.get("mode") or mode)
    else:
        for key, value in data.items():
            _write(target / _safe(key), value, mode)


class Materialiser:
    """Writes the volumes of one pod under `volumes_dir`."""

    def __init__(self, sources: Sources, pvc_dir: Path, node_cpus: int = 1) -> None:
        self.sources, self.pvc_dir, self.node_cpus = sources, pvc_dir, node_cpus

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """A hostPath/local PV is used where it is; any other claim gets <pvc-dir>/<namespace>/<claim>."""
        host = self.sources.claim_host_path(namespace, claim)
        path = Path(host) if host else self.pvc_dir / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def materialise(self, pod: Mapping[str, Any], volumes_dir: Path) -> Volumes:
        ns = pod["metadata"].get("namespace") or "default"
        out = Volumes()
        for vol in (pod.get("spec") or {}).get("volumes") or []:
            name = vol["name"]
            target = volumes_dir / name
            if "persistentVolumeClaim" in vol:
                out.paths[name] = self.claim_dir(ns, vol["persistentVolumeClaim"]["claimName"])
                continue
            if "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate", None, "") and not path.exists():
                    path.mkdir(parents=True, exist_ok=True)
                out.paths[name] = path
                continue
            target.mkdir(parents=True, exist_ok=True)
            out.paths[name] = target
            if "emptyDir" in vol:
                continue
            mode = DEFAULT_MODE
            if "configMap" in vol:
                self._config_map(ns, vol["configMap"], target, vol["configMap"].get("defaultMode") or mode)
            elif "secret" in vol:
                self._secret(ns, vol["secret"], target, vol["secret"].get("defaultMode") or mode)
            elif "downwardAPI" in vol:
                self._downward(pod, vol["downwardAPI"].get("items") or [], target,
                               vol["downwardAPI"].get("defaultMode") or mode)
            elif "projected" in vol:
                proj = vol["projected"]
                mode = proj.get("defaultMode") or mode
                for src in proj.get("sources") or []:
                    if "configMap" in src:
                        self._config_map(ns, src["configMap"], target, mode)
                    elif "secret" in src:
                        self._secret(ns, src["secret"], target, mode)
                    elif "downwardAPI" in src:
                        self._downward(pod, src["downwardAPI"].get("items") or [], target, mode)
                    elif "serviceAccountToken" in src:
                        sat = src["serviceAccountToken"]
                        tf = TokenFile(target / _safe(sat["path"]), sat.get("audience") or None,
                                       int(sat.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS))
                        self.refresh_token(pod, tf)
                        out.tokens.append(tf)
                    else:
                        raise VolumeError(f"projected volume {name!r}: unsupported source {sorted(src)}")
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise VolumeError(f"volume {name!r}: the dev node does not support {kinds}")
        return out

    def refresh_token(self, pod: Mapping[str, Any], tf: TokenFile) -> None:
        ns = pod["metadata"].get("namespace") or "default"
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        token, expires = self.sources.token(ns, account, pod, tf.audience, tf.seconds)
        _write(tf.path, token.encode(), 0o600)
        life = expires - dt.datetime.now(dt.UTC)
        tf.refresh_at = dt.datetime.now(dt.UTC) + life * 0.8

    def _config_map(self, ns: str, ref: Mapping[str, Any], target: Path, mode: int) -> None:
        data = self.sources.config_map_bytes(ns, ref["name"])
        if data is None:
            if ref.get("optional"):
                return
            raise VolumeError(f'configmap "{ref["name"]}" not found')
        _keyed(target, data, ref.get("items"), mode, f'configmap "{ref["name"]}"')

    def _secret(self, ns: str, ref: Mapping[str, Any], target: Path, mode: int) -> None:
        name = ref.get("secretName") or ref.get("name") or ""
        data = self.sources.secret(ns, name)
        if data is None:
            if ref.get("optional"):
                return
            raise VolumeError(f'secret "{name}" not found')
        _keyed(target, {k: base64.b64decode(v) for k, v in data.items()}, ref.get("items"), mode,
               f'secret "{name}"')

    def _downward(self, pod: Mapping[str, Any], items: list[dict[str, Any]], target: Path, mode: int) -> None:
        for item in items:
            try:
                if "fieldRef" in item:
                    value = field_value(pod, item["fieldRef"]["fieldPath"])
                else:
                    ref = item.get("resourceFieldRef") or {}
                    containers = {c["name"]: c for c in pod["spec"].get("containers") or []}
                    value = resource_value(containers.get(ref.get("containerName"), {}), ref, self.node_cpus)
            except ConfigError as exc:
                raise VolumeError(str(exc)) from exc
            _write(target / _safe(item["path"]), value.encode(), item.get("mode") or mode)


@dataclass
class Mount:
    source: Path
    read_only: bool = False


def mount_sources(mounts: list[Mapping[str, Any]], volumes: Mapping[str, Path],
                  extra: Mapping[str, Path] | None = None) -> dict[str, Mount]:
    """mountPath -> what is mounted there (the volume, or its subPath)."""
    out: dict[str, Mount] = {}
    for m in mounts:
        if m["name"] not in volumes:
            raise VolumeError(f"volumeMount {m['name']!r} names no volume of the pod")
        src = volumes[m["name"]]
        sub = m.get("subPath")
        if sub:
            src = src / _safe(sub)
            if not src.exists():
                src.mkdir(parents=True, exist_ok=True)
        out[m["mountPath"]] = Mount(src, bool(m.get("readOnly")))
    out.update({path: Mount(src) for path, src in (extra or {}).items()})
    return out


def by_depth(paths: Iterable[str]) -> list[str]:
    """Parents before children: the order in which nested mounts are made."""
    return sorted(paths, key=lambda p: (p.rstrip("/").count("/"), p))


def mirror_mounts(root: Path, mounts: list[Mapping[str, Any]], volumes: Mapping[str, Path],
                  extra: Mapping[str, Path] | None = None) -> list[str]:
    """Symlinks root/<mountPath> -> the volume (or its subPath); returns the container's mount paths."""
    links = mount_sources(mounts, volumes, extra)
    for mount_path in by_depth(links):
        link = root / mount_path.strip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        link.symlink_to(links[mount_path].source)
    return sorted(links, key=len, reverse=True)


# Run by `unshare --mount` in the container's own mount namespace: bind each source onto its target under
# root/ (parents first, each target created where the parent put it, as a runtime does), then make the
# readOnly ones read-only, then exec the container's command. Arguments: SRC DST ... --ro DST ... -- ARGV.
BIND_SCRIPT = """set -e
while [ "$1" != --ro ]; do
  if [ -d "$1" ]; then mkdir -p "$2"; else mkdir -p "${2%/*}"; [ -e "$2" ] || : > "$2"; fi
  mount --bind "$1" "$2"; shift 2
done
shift
while [ "$1" != -- ]; do mount -o remount,bind,ro "$1"; shift; done
shift
exec "$@"
"""


def bind_argv(root: Path, mounts: list[Mapping[str, Any]], volumes: Mapping[str, Path], argv: list[str],
              extra: Mapping[str, Path] | None = None) -> tuple[list[str], list[str]]:
    """`argv` wrapped so that it runs in a mount namespace of its own where root/<mountPath> are bind mounts:
    real directories, not symlinks (programs that resolve symlinks, e.g. to refuse paths outside a
    directory, see what a container sees). Returns (the wrapped argv, the container's mount paths)."""
    sources = mount_sources(mounts, volumes, extra)
    binds: list[str] = []
    read_only: list[str] = []
    for mount_path in by_depth(sources):
        target = str(root / mount_path.strip("/"))
        binds += [str(sources[mount_path].source), target]
        if sources[mount_path].read_only:
            read_only.append(target)
    wrapped = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", BIND_SCRIPT, "devnode-mounts",
               *binds, "--ro", *read_only, "--", *argv]
    return wrapped, sorted(sources, key=len, reverse=True)


def can_bind_mount() -> bool:
    """Whether this agent may make mount namespaces (root, or CAP_SYS_ADMIN): otherwise mounts are symlinks."""
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
