"""The dev node agent: registers the Node, keeps its Lease, and runs the pods bound to it."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaops.api.contract import ENV_PROGRESS_INTERVAL

from llamaops_dev.devnode.env import LOCALHOST
from llamaops_dev.devnode.kube import Api
from llamaops_dev.devnode.node import LEASE_SECONDS, NodeConfig, lease_manifest, node_manifest, node_status
from llamaops_dev.devnode.runner import NodeContext, PodWorker
from llamaops_dev.devnode.services import LocalPod, ServiceProxy
from llamaops_dev.devnode.status import ContainerState, PodState, now, pod_status
from llamaops_dev.devnode.volumes import Materialiser, can_bind_mount

log = logging.getLogger(__name__)
STATUS_EVERY_S = 20.0
TERMINAL = ("Succeeded", "Failed")
# The host environment a pod's processes see (besides what the pod declares): enough to run this venv.
BASE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")
# Handy on a shared CPU: threads per process, offline Hugging Face; Ollama's log level (2: each prompt).
DEFAULT_PASS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                    ENV_PROGRESS_INTERVAL, "OLLAMA_DEBUG")


@dataclass
class AgentConfig:
    node: NodeConfig
    work_dir: Path
    pvc_dir: Path | None = None  # claims not bound to a hostPath PV; default <work>/pvc
    python: str = sys.executable
    pass_env: tuple[str, ...] = DEFAULT_PASS_ENV
    shutdown_grace_s: float = 10.0


def base_env(api_host: str, api_port: int, config: AgentConfig, environ: Mapping[str, str] = os.environ
             ) -> dict[str, str]:
    env = {k: environ[k] for k in (*BASE_ENV, *config.pass_env) if k in environ}
    venv_bin = str(Path(config.python).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                               if p != venv_bin)])
    env["KUBERNETES_SERVICE_HOST"] = api_host
    env["KUBERNETES_SERVICE_PORT"] = str(api_port)
    env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(api_port)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # every pod here has a podIP on lo (runner.PodIPs)
    return env


class Agent:
    def __init__(self, api: Api, config: AgentConfig) -> None:
        self.api, self.config = api, config
        self.name = config.node.name
        work = config.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        cpus = int(float(config.node.capacity()["cpu"]))
        self.ctx = NodeContext(api=api, node=self.name, work_dir=work,
                               materialiser=Materialiser(api, (config.pvc_dir or work / "pvc").resolve(), cpus),
                               base_env=base_env(api.host, api.port, config), python=config.python,
                               node_cpus=cpus, on_done=self._done, bind_mounts=can_bind_mount())
        self.proxy = ServiceProxy(api, self.local_pods)
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._node_uid: str | None = None

    # ------------------------------------------------------------- node

    def register(self) -> None:
        node = self.api.upsert_node(node_manifest(self.config.node))
        self._node_uid = node["metadata"].get("uid")
        self.api.renew_lease(lease_manifest(self.config.node, self._node_uid))
        log.info("node %s registered (capacity %s); work dir %s", self.name, self.config.node.capacity(),
                 self.ctx.work_dir)

    def heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(LEASE_SECONDS / 4):
            try:
                self.api.renew_lease(lease_manifest(self.config.node, self._node_uid))
                if time.monotonic() - last_status >= STATUS_EVERY_S:
                    self.api.patch_node_status(self.name, node_status(self.config.node))
                    last_status = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the next beat retries
                log.warning("heartbeat failed: %s", exc)

    # ------------------------------------------------------------- pods

    def local_pods(self) -> list[LocalPod]:
        """The pods running here, for the Service proxy: Ready unless stopping (a terminating pod gets no new
        connections, as kube-proxy drops terminating endpoints)."""
        with self._lock:
            workers = list(self.workers.values())
        return [LocalPod(w.pod, w.ip, w.ready and not w.stopping) for w in workers]

    def _done(self, uid: str) -> None:
        with self._lock:
            self.workers.pop(uid, None)
            self.finished.add(uid)

    def reconcile(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        with self._lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker is not None:
                    worker.stop(0, delete=False)
                return
            if worker is not None:
                worker.update(pod)
                if meta.get("deletionTimestamp"):
                    worker.stop(meta.get("deletionGracePeriodSeconds"), delete=True)
                return
            phase = (pod.get("status") or {}).get("phase")
            if meta.get("deletionTimestamp"):
                # Nothing runs for it (anymore): the containers are gone, finish the deletion.
                self.api.delete_pod_now(ns, name, uid)
                return
            if phase in TERMINAL or uid in self.finished or self.stopping.is_set():
                return
            if _ran_elsewhere(pod):
                self._lost(pod)
                self.finished.add(uid)
                return
            worker = PodWorker(self.ctx, pod)
            self.workers[uid] = worker
        log.info("pod %s/%s bound here: starting", ns, name)
        worker.start()

    def _lost(self, pod: dict[str, Any]) -> None:
        """A pod an earlier agent was running: its processes are gone with it."""
        meta = pod["metadata"]
        log.warning("pod %s/%s was started by an earlier agent: marking it Failed", meta["namespace"], meta["name"])
        containers = []
        for c in pod["spec"]["containers"]:
            s = ContainerState(c["name"], c.get("image", ""))
            s.exit_code, s.reason, s.finished_at = 137, "ContainerStatusUnknown", now()
            s.message = "the dev node agent restarted; the container's process was lost"
            containers.append(s)
        state = PodState(containers=containers, initialized=True, phase_override="Failed",
                         reason="NodeAgentRestarted", message="the dev node agent restarted")
        self.api.patch_pod_status(meta["namespace"], meta["name"], pod_status(state, pod))

    def watch(self) -> None:
        """List, then watch from there; on any error or timeout, list again (reconcile is idempotent)."""
        while not self.stopping.is_set():
            try:
                items, rv = self.api.list_pods(self.name)
                live = {p["metadata"]["uid"] for p in items}
                with self._lock:
                    gone = [w for uid, w in self.workers.items() if uid not in live]
                for w in gone:
                    w.stop(0, delete=False)
                for pod in items:
                    self.reconcile("ADDED", pod)
                for kind, pod in self.api.watch_pods(self.name, rv, timeout_s=30):
                    if self.stopping.is_set():
                        return
                    if kind == "ERROR":
                        break
                    self.reconcile(kind, pod)
            except Exception as exc:  # noqa: BLE001 - the API server may be restarting
                if self.stopping.is_set():
                    return
                log.warning("watching pods failed (%s); retrying", exc)
                self.stopping.wait(1.0)

    # --------------------------------------------------------- lifecycle

    def run(self) -> None:
        """Register, then run the node's pods until `stopping` is set; the caller then calls shutdown()."""
        self.register()
        beat = threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True)
        beat.start()
        self.proxy.start()
        log.info("volume mounts: %s", "bind mounts in a mount namespace per container" if self.ctx.bind_mounts
                 else "symlinks (no mount namespaces here: run the agent as root for bind mounts)")
        log.info("node %s ready: pods run as processes of %s (KUBERNETES_SERVICE_HOST=%s:%s)", self.name,
                 self.config.python, self.ctx.base_env["KUBERNETES_SERVICE_HOST"],
                 self.ctx.base_env["KUBERNETES_SERVICE_PORT"])
        self.watch()

    def shutdown(self) -> None:
        """Stop every pod's processes (they would outlive the agent otherwise); the Node stays registered."""
        self.stopping.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.stop(self.config.shutdown_grace_s, delete=False)
        for w in workers:
            w.join(self.config.shutdown_grace_s + 15)
        self.proxy.stop()
        try:
            self.api.patch_node_status(self.name, node_status(self.config.node, ready=False))
        except Exception:  # noqa: BLE001 - the API server may be gone already
            pass


def _ran_elsewhere(pod: Mapping[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any(str(s.get("containerID", "")).startswith("devnode://") for s in statuses)


__all__ = ["LOCALHOST", "Agent", "AgentConfig"]
