"""One pod on the dev node: volumes, then its containers as local processes, status reported as it goes."""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
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
from llamaops_dev.devnode.probes import Prober, run_action
from llamaops_dev.devnode.status import ContainerState, PodState, container_states, now, pod_status, termination_message
from llamaops_dev.devnode.volumes import (
    Materialiser,
    VolumeError,
    Volumes,
    bind_argv,
    mirror_mounts,
    mount_sources,
)

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


class PodIPs:
    """A loopback address per pod (Linux routes all of 127.0.0.0/8 to lo): two pods can each bind the same
    port on their own IP, as they would in their own network namespaces."""

    PREFIX = "127.77"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, str] = {}

    def take(self, uid: str) -> str:
        with self._lock:
            if uid not in self._by_uid:
                used = set(self._by_uid.values())
                n = next(i for i in range(1, 254 * 254) if self._ip(i) not in used)
                self._by_uid[uid] = self._ip(n)
            return self._by_uid[uid]

    def release(self, uid: str) -> None:
        with self._lock:
            self._by_uid.pop(uid, None)

    def _ip(self, n: int) -> str:
        return f"{self.PREFIX}.{n // 254}.{n % 254 + 1}"


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
    bind_mounts: bool = False  # mounts are bind mounts in a mount namespace per container (else symlinks)
    pod_ips: PodIPs = field(default_factory=PodIPs)


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
    env: dict[str, str] = field(default_factory=dict)  # what the process got
    cwd: str = ""
    localise: Any = None  # container view -> this machine, for probe and hook commands
    prober: Prober | None = None


class PodWorker(threading.Thread):
    def __init__(self, ctx: NodeContext, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx, self.pod = ctx, pod
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.ip = ctx.pod_ips.take(self.uid)
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

    @property
    def ready(self) -> bool:
        return self.state.initialized and all(c.ready for c in self.state.containers)

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
            self.ctx.pod_ips.release(self.uid)
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
        pod = {**self.pod, "status": {**(self.pod.get("status") or {}), "podIP": self.ip}}
        declared = envmod.resolve(pod, c, config_maps=self.ctx.api.config_map, secrets=self.ctx.api.secret,
                                  node_cpus=self.ctx.node_cpus)
        argv = envmod.command_line(c, declared)
        root = self.dir / "root" / c["name"]
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        r.message_file = self.dir / f"{c['name']}.termination-log"
        r.message_file.write_text("")
        term_path = c.get("terminationMessagePath") or TERMINATION_LOG
        mounts, extra = c.get("volumeMounts") or [], {term_path: r.message_file}
        if self.ctx.bind_mounts:
            mount_paths = sorted(mount_sources(mounts, self.volumes.paths, extra), key=len, reverse=True)
        else:
            mount_paths = mirror_mounts(root, mounts, self.volumes.paths, extra=extra)

        def loc(value: str) -> str:
            return envmod.localise(value, namespace=ns, services=self._services, mount_paths=mount_paths,
                                   root=str(root), pod_ip=self.ip)

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
        spawn = bind_argv(root, mounts, self.volumes.paths, local, extra)[0] if self.ctx.bind_mounts else local
        r.log = self.dir / f"{c['name']}.log"
        r.env, r.cwd, r.localise = full, cwd, loc
        with r.log.open("ab") as out:
            r.proc = subprocess.Popen(spawn, env=full, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        r.prober = Prober(c, host=self.ip, run_exec=lambda cmd, timeout, r=r: self._exec(r, cmd, timeout))
        r.state.probed_started, r.state.probed_ready = r.prober.started, r.prober.ready
        r.state.pid, r.state.started_at, r.state.waiting = r.proc.pid, now(), None
        r.state.exit_code, r.state.finished_at, r.state.message, r.state.reason = None, None, "", ""
        # mounts: where each mountPath's data is on this machine (with bind mounts, root/<mountPath> is
        # the data only inside the container's mount namespace).
        record = {"argv": argv, "localArgv": local, "env": sorted(container_env), "cwd": cwd, "pid": r.proc.pid,
                  "log": str(r.log), "root": str(root), "restartCount": r.state.restarts,
                  "mounts": {path: str(m.source) for path, m in mount_sources(mounts, self.volumes.paths,
                                                                                 extra).items()}}
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
            self._probe(running)
            self._refresh_tokens()
            self._report()
            if all(r.state.terminated for r in running):
                return

    def _probe(self, running: list[Running]) -> None:
        """Run each running container's due probes; one that failed its startup or liveness probe is killed,
        and restarted by the loop above as its restart policy says."""
        for r in running:
            if r.prober is None or not r.state.running:
                continue
            verdict = r.prober.tick()
            r.state.probed_started, r.state.probed_ready = r.prober.started, r.prober.ready
            if verdict:
                log.warning("pod %s/%s: %s: %s; restarting it", self.ns, self.pod_name, r.spec["name"], verdict)
                self.ctx.api.event(self.pod, self.ctx.node, "Warning", "Unhealthy", verdict)
                self._kill(r)

    def _exec(self, r: Running, command: list[str], timeout: float) -> bool:
        """An exec probe or hook: in the container's environment (and mounts, through its mount namespace)."""
        if not command or r.proc is None:
            return False
        argv = envmod.local_argv([r.localise(a) for a in command], self.ctx.python)
        if self.ctx.bind_mounts:
            argv = ["nsenter", "-t", str(r.proc.pid), "-m", "--", *argv]
        try:
            return subprocess.run(argv, env=r.env, cwd=r.cwd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

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
        """SIGTERM each container's main process (its PID 1: a runtime signals nothing else), SIGKILL its whole
        process group after the grace period."""
        live = [r for r in running if r.proc is not None and r.proc.poll() is None]
        if live:
            self.ctx.api.event(self.pod, self.ctx.node, "Normal", "Killing",
                               f"Stopping container(s) {', '.join(r.spec['name'] for r in live)}"
                               f" (grace {self._grace:.0f}s)")
        deadline = time.monotonic() + self._grace
        for r in live:  # preStop hooks first, within the grace period (a kubelet's order)
            hook = (r.spec.get("lifecycle") or {}).get("preStop")
            if hook:
                ok, why = run_action(hook, r.spec, self.ip, max(0.0, deadline - time.monotonic()),
                                     lambda cmd, timeout, r=r: self._exec(r, cmd, timeout))
                if not ok:
                    self.ctx.api.event(self.pod, self.ctx.node, "Warning", "FailedPreStopHook", why)
        for r in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(r.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
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
        status = pod_status(self.state, pod, pod_ip=self.ip)
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
