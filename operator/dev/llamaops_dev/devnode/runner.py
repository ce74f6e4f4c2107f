"""One pod on the dev node: volumes, then its containers as local processes, status reported as it goes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llamaops.api.contract import (
    ENV_PVC_ROOT,
    ENV_SERVICEACCOUNT_DIR,
    ENV_TERMINATION_LOG,
    PVC_ROOT,
    SERVICEACCOUNT_DIR,
    TERMINATION_LOG,
)

from llamaops_dev.devnode import env as envmod
from llamaops_dev.devnode.status import ContainerState, PodState, container_states, now, pod_status, termination_message
from llamaops_dev.devnode.volumes import Materialiser, VolumeError, Volumes, mirror_mounts

log = logging.getLogger(__name__)
POLL_S = 0.2
RETRY_S = 2.0
BACKOFF_MAX_S = 30.0
DEFAULT_GRACE_S = 30


class PodApi(Protocol):
    def config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def services(self, namespace: str) -> list[str]: ...
    def patch_pod_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any] | None: ...
    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None: ...
    def event(self, pod: Mapping[str, Any], node: str, kind: str, reason: str, message: str) -> None: ...


@dataclass
class NodeContext:
    """What every pod of the node shares."""

    api: PodApi
    node: str
    work_dir: Path
    materialiser: Materialiser
    base_env: dict[str, str]  # PATH, locale, KUBERNETES_SERVICE_HOST/PORT, pass-through variables
    python: str
    node_cpus: int = 1
    on_done: Any = None  # callable(uid) when a worker ends


def pod_dir(work_dir: Path, namespace: str, name: str) -> Path:
    """Where a pod's files live: <work>/pods/<namespace>/<pod>/ (its logs: <container>.log)."""
    return work_dir / "pods" / namespace / name


def exit_code(returncode: int) -> int:
    """A signal death as a container runtime reports it: 128 + signal."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Running:
    spec: dict[str, Any]
    state: ContainerState
    proc: subprocess.Popen | None = None
    log: Path = Path()
    message_file: Path | None = None
    backoff: float = 1.0


class PodWorker(threading.Thread):
    def __init__(self, ctx: NodeContext, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx, self.pod = ctx, pod
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = pod_dir(ctx.work_dir, self.ns, self.pod_name)
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy") or "Always"
        self.state = PodState(containers=container_states(spec.get("containers") or []),
                              init_containers=container_states(spec.get("initContainers") or []))
        self._stop_requested = threading.Event()
        self._grace: float = DEFAULT_GRACE_S
        self.deleting = False
        self._last_status: str | None = None
        self._conditions = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
        self.volumes = Volumes()
        self._services: list[str] = []
        self._running: list[Running] = []

    # ------------------------------------------------------------ controls

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod

    def stop(self, grace_s: float | None, delete: bool) -> None:
        """Terminate the containers (SIGTERM, SIGKILL after the grace period); with delete, then remove the pod."""
        if delete:
            self.deleting = True
        if not self._stop_requested.is_set():
            self._grace = DEFAULT_GRACE_S if grace_s is None else grace_s
            self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    # ---------------------------------------------------------------- run

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - the pod fails, the node goes on
            log.exception("pod %s/%s", self.ns, self.pod_name)
            self.state.phase_override, self.state.reason, self.state.message = "Failed", "DevNodeError", str(exc)
            self._report(force=True)
        finally:
            for r in self._running:
                self._kill(r)
            if self.deleting:
                try:
                    self.ctx.api.delete_pod_now(self.ns, self.pod_name, self.uid)
                except Exception:  # noqa: BLE001
                    log.exception("deleting pod %s/%s", self.ns, self.pod_name)
            if self.ctx.on_done:
                self.ctx.on_done(self.uid)

    def _run(self) -> None:
        self.state.start_time = now()
        self._prepare_dir()
        self._report()
        if not self._retry("FailedMount", self._mount):
            return
        init = [Running(c, s) for c, s in zip(self.pod["spec"].get("initContainers") or [],
                                               self.state.init_containers, strict=True)]
        for r in init:
            self._running = [r]
            if not self._run_to_end(r):
                return
        self.state.initialized = True
        self._running = [Running(c, s) for c, s in zip(self.pod["spec"]["containers"], self.state.containers,
                                                        strict=True)]
        for r in self._running:
            if not self._retry("CreateContainerConfigError", lambda r=r: self._start(r), r.state):
                return
        self._report()
        self._supervise(self._running)

    def _prepare_dir(self) -> None:
        marker = self.dir / "uid"
        if self.dir.exists() and (not marker.exists() or marker.read_text().strip() != self.uid):
            shutil.rmtree(self.dir, ignore_errors=True)  # an earlier pod of the same name
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        marker.write_text(self.uid + "\n")

    def _mount(self) -> None:
        self.volumes = self.ctx.materialiser.materialise(self.pod, self.dir / "volumes")
        self._services = self.ctx.api.services(self.ns)

    def _retry(self, reason: str, action: Any, container: ContainerState | None = None) -> bool:
        """Run `action` until it works (the kubelet retries mounts and config forever), or the pod is stopped."""
        announced = ""
        while not self.stopping:
            try:
                action()
                if container is not None:
                    container.waiting_message = ""
                return True
            except (VolumeError, envmod.ConfigError) as exc:
                message = str(exc)
                if message != announced:
                    announced = message
                    log.warning("pod %s/%s: %s: %s", self.ns, self.pod_name, reason, message)
                    self.ctx.api.event(self.pod, self.ctx.node, "Warning", reason, message)
                    targets = [container] if container else self.state.containers
                    for c in targets:
                        c.waiting, c.waiting_message = ("ContainerCreating" if reason == "FailedMount" else reason,
                                                        message)
                    self._report()
            self._stop_requested.wait(RETRY_S)
        return False

    def _run_to_end(self, r: Running) -> bool:
        """An init container: run it until it exits 0 (restarting it unless restartPolicy is Never)."""
        while True:
            if not self._retry("CreateContainerConfigError", lambda: self._start(r), r.state):
                return False
            self._report()
            while r.proc is not None and r.proc.poll() is None:
                if self._stop_requested.wait(POLL_S):
                    self._terminate([r])
                    return False
            self._finish(r)
            self._report()
            if r.state.exit_code == 0:
                return True
            if self.restart_policy == "Never":
                return False
            self._backoff(r)
            if self.stopping:
                return False

    # ------------------------------------------------------------- process

    def _start(self, r: Running) -> None:
        c, ns = r.spec, self.ns
        declared = envmod.resolve(self.pod, c, config_maps=self.ctx.api.config_map, secrets=self.ctx.api.secret,
                                  node_cpus=self.ctx.node_cpus)
        argv = envmod.command_line(c, declared)
        root = self.dir / "root" / c["name"]
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        r.message_file = self.dir / f"{c['name']}.termination-log"
        r.message_file.write_text("")
        term_path = c.get("terminationMessagePath") or TERMINATION_LOG
        mount_paths = mirror_mounts(root, c.get("volumeMounts") or [], self.volumes.paths,
                                    extra={term_path: r.message_file})

        def loc(value: str) -> str:
            return envmod.localise(value, namespace=ns, services=self._services, mount_paths=mount_paths,
                                   root=str(root))

        container_env = {k: loc(v) for k, v in declared.items()}
        local = envmod.local_argv([loc(a) for a in argv], self.ctx.python)
        full = dict(self.ctx.base_env)
        full["HOME"] = str(self.dir / "home")
        full["TMPDIR"] = str(root / "tmp") if "/tmp" in mount_paths else str(self.dir / "tmp")
        full["HOSTNAME"] = self.pod["spec"].get("hostname") or self.pod_name
        # The contract's built-in absolute paths, where this container mounts them (see llamaops_dev.devnode).
        if SERVICEACCOUNT_DIR in mount_paths:
            full[ENV_SERVICEACCOUNT_DIR] = str(root) + SERVICEACCOUNT_DIR
        if any(p == PVC_ROOT or p.startswith(PVC_ROOT + "/") for p in mount_paths):
            full[ENV_PVC_ROOT] = str(root) + PVC_ROOT
        full[ENV_TERMINATION_LOG] = str(r.message_file)
        full.update(container_env)
        exe = local[0] if "/" in local[0] else shutil.which(local[0], path=full.get("PATH"))
        if exe is None:
            raise envmod.ConfigError(f'executable "{local[0]}" not found in $PATH')
        local[0] = exe
        cwd = loc(c["workingDir"]) if c.get("workingDir") else str(self.dir)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        r.log = self.dir / f"{c['name']}.log"
        with r.log.open("ab") as out:
            r.proc = subprocess.Popen(local, env=full, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        r.state.pid, r.state.started_at, r.state.waiting = r.proc.pid, now(), None
        r.state.exit_code, r.state.finished_at, r.state.message, r.state.reason = None, None, "", ""
        record = {"argv": argv, "localArgv": local, "env": sorted(container_env), "cwd": cwd, "pid": r.proc.pid,
                  "log": str(r.log), "root": str(root), "restartCount": r.state.restarts}
        (self.dir / f"{c['name']}.json").write_text(json.dumps(record, indent=2) + "\n")
        log.info("pod %s/%s: started %s as pid %d (log %s)", ns, self.pod_name, c["name"], r.proc.pid, r.log)
        self.ctx.api.event(self.pod, self.ctx.node, "Normal", "Started",
                           f"Started container {c['name']} as pid {r.proc.pid} on {self.ctx.node} (log: {r.log})")

    def _finish(self, r: Running) -> None:
        assert r.proc is not None
        code = exit_code(r.proc.returncode)
        r.state.exit_code, r.state.finished_at = code, now()
        r.state.reason = "Completed" if code == 0 else "Error"
        r.state.message = termination_message(r.message_file, r.log, code,
                                              r.spec.get("terminationMessagePolicy") or "File")
        log.info("pod %s/%s: %s exited %d", self.ns, self.pod_name, r.spec["name"], code)

    def _backoff(self, r: Running) -> None:
        r.state.last_terminated = r.state.to_status()["state"]["terminated"]
        r.state.restarts += 1
        r.state.pid, r.state.exit_code, r.state.waiting = None, None, "CrashLoopBackOff"
        r.state.waiting_message = f"back-off {r.backoff:.0f}s restarting failed container"
        self._report()
        self._stop_requested.wait(r.backoff)
        r.backoff = min(r.backoff * 2, BACKOFF_MAX_S)

    def _supervise(self, running: list[Running]) -> None:
        while True:
            if self._stop_requested.wait(POLL_S):
                self._terminate(running)
                self._report(force=True)
                return
            for r in running:
                if r.proc is not None and r.state.running and r.proc.poll() is not None:
                    self._finish(r)
                    again = self.restart_policy == "Always" or (self.restart_policy == "OnFailure"
                                                               and r.state.exit_code != 0)
                    if again:
                        self._report()
                        self._backoff(r)
                        if self.stopping or not self._retry("CreateContainerConfigError",
                                                            lambda r=r: self._start(r), r.state):
                            continue
            self._refresh_tokens()
            self._report()
            if all(r.state.terminated for r in running):
                return

    def _refresh_tokens(self) -> None:
        t = dt.datetime.now(dt.UTC)
        for tf in self.volumes.tokens:
            if t >= tf.refresh_at:
                try:
                    self.ctx.materialiser.refresh_token(self.pod, tf)
                except Exception as exc:  # noqa: BLE001 - retried on the next poll
                    log.warning("pod %s/%s: refreshing its token failed: %s", self.ns, self.pod_name, exc)
                    tf.refresh_at = t + dt.timedelta(seconds=10)

    def _terminate(self, running: list[Running]) -> None:
        """SIGTERM each container's process group, SIGKILL what is left after the grace period."""
        live = [r for r in running if r.proc is not None and r.proc.poll() is None]
        if live:
            self.ctx.api.event(self.pod, self.ctx.node, "Normal", "Killing",
                               f"Stopping container(s) {', '.join(r.spec['name'] for r in live)}"
                               f" (grace {self._grace:.0f}s)")
        for r in live:
            self._signal(r, signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        while any(r.proc.poll() is None for r in live) and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.1)
        for r in live:
            self._kill(r)
        for r in running:
            if r.proc is not None and r.state.running:
                self._finish(r)
            elif not r.state.terminated:  # never started: report it terminated, as the kubelet does
                r.state.exit_code, r.state.reason, r.state.finished_at = 137, "ContainerStatusUnknown", now()

    def _signal(self, r: Running, sig: signal.Signals) -> None:
        if r.proc is None:
            return
        try:
            os.killpg(r.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill(self, r: Running) -> None:
        """SIGKILL the container's process group (leftovers too, if its main process has exited already)."""
        if r.proc is None:
            return
        self._signal(r, signal.SIGKILL)
        try:
            r.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("pod %s/%s: pid %d survived SIGKILL", self.ns, self.pod_name, r.proc.pid)

    # -------------------------------------------------------------- status

    def _report(self, force: bool = False) -> None:
        pod = dict(self.pod)
        pod["status"] = {**(self.pod.get("status") or {}), "conditions": list(self._conditions.values())}
        status = pod_status(self.state, pod)
        key = json.dumps(status, sort_keys=True)
        if key == self._last_status and not force:
            return
        try:
            updated = self.ctx.api.patch_pod_status(self.ns, self.pod_name, status)
        except Exception as exc:  # noqa: BLE001 - retried on the next change
            log.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, exc)
            return
        self._last_status = key
        self._conditions = {c["type"]: c for c in status["conditions"]}
        if updated is not None:
            self.pod = updated
