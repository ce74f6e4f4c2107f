"""Pod status as a kubelet reports it: phase, conditions, container states. Pure functions."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaops_dev.devnode.env import LOCALHOST

# The kubelet's limits on a termination message.
MESSAGE_BYTES = 4096
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    """What the agent knows about one container."""

    name: str
    image: str = ""
    waiting: str | None = "ContainerCreating"  # reason while not started
    waiting_message: str = ""
    pid: int | None = None
    started_at: str | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    finished_at: str | None = None
    restarts: int = 0
    last_terminated: dict[str, Any] | None = None
    probed_started: bool = True  # its startupProbe passed (or it has none)
    probed_ready: bool = True  # its readinessProbe passes (or it has none)

    @property
    def running(self) -> bool:
        return self.pid is not None and self.exit_code is None

    @property
    def ready(self) -> bool:
        return self.running and self.probed_started and self.probed_ready

    @property
    def terminated(self) -> bool:
        return self.exit_code is not None

    def to_status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.terminated:
            term = {"exitCode": self.exit_code, "reason": self.reason or ("Completed" if self.exit_code == 0 else "Error"),
                    "startedAt": self.started_at, "finishedAt": self.finished_at,
                    "containerID": f"devnode://{self.pid}"}
            if self.message:
                term["message"] = self.message
            state = {"terminated": term}
        elif self.running:
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"waiting": {"reason": self.waiting or "ContainerCreating",
                                 **({"message": self.waiting_message} if self.waiting_message else {})}}
        out: dict[str, Any] = {"name": self.name, "image": self.image, "imageID": "", "ready": self.ready,
                               "started": self.running and self.probed_started, "restartCount": self.restarts, "state": state}
        if self.pid is not None:
            out["containerID"] = f"devnode://{self.pid}"
        if self.last_terminated:
            out["lastState"] = {"terminated": self.last_terminated}
        return out


@dataclass
class PodState:
    containers: list[ContainerState]
    init_containers: list[ContainerState] = field(default_factory=list)
    start_time: str | None = None
    initialized: bool = False
    phase_override: str | None = None  # Failed before any container ran (bad spec)
    reason: str = ""
    message: str = ""


def phase(state: PodState, restart_policy: str = "Never") -> str:
    if state.phase_override:
        return state.phase_override
    if any(c.terminated and c.exit_code != 0 for c in state.init_containers) and restart_policy == "Never":
        return "Failed"
    cs = state.containers
    if not state.initialized:
        return "Pending"
    if cs and all(c.terminated for c in cs):
        if all(c.exit_code == 0 for c in cs):
            return "Succeeded"
        return "Failed" if restart_policy == "Never" else "Running"
    return "Running" if any(c.running or c.terminated for c in cs) else "Pending"


def _condition(kind: str, ok: bool, when: str, previous: Mapping[str, Mapping[str, Any]],
               reason: str = "") -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.get(kind) or {}
    since = old.get("lastTransitionTime") if old.get("status") == status else when
    out = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": since or when}
    if reason and not ok:
        out["reason"] = reason
    return out


def pod_status(state: PodState, pod: Mapping[str, Any], host_ip: str = LOCALHOST,
               pod_ip: str = LOCALHOST) -> dict[str, Any]:
    """The status to write, given the pod as the API server has it (its conditions keep their transition times)."""
    when = now()
    restart = (pod.get("spec") or {}).get("restartPolicy") or "Always"
    ph = phase(state, restart)
    previous = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    ready = ph == "Running" and all(c.ready for c in state.containers)
    not_ready = "PodCompleted" if ph in ("Succeeded", "Failed") else "ContainersNotReady"
    conditions = [
        _condition("PodReadyToStartContainers", state.initialized or ph != "Pending", when, previous),
        _condition("Initialized", state.initialized, when, previous, "ContainersNotInitialized"),
        _condition("Ready", ready, when, previous, not_ready),
        _condition("ContainersReady", ready, when, previous, not_ready),
        _condition("PodScheduled", True, when, previous),
    ]
    status: dict[str, Any] = {
        "phase": ph, "conditions": conditions,
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "startTime": state.start_time or when,
        "containerStatuses": [c.to_status() for c in state.containers],
        "qosClass": (pod.get("status") or {}).get("qosClass") or "BestEffort",
    }
    if state.init_containers:
        status["initContainerStatuses"] = [c.to_status() for c in state.init_containers]
    if state.reason:
        status["reason"] = state.reason
    if state.message:
        status["message"] = state.message
    return status


def termination_message(message_file: Path | None, log_file: Path, exit_code: int, policy: str) -> str:
    """The container's terminationMessagePath file, else (FallbackToLogsOnError, failed) the log's tail."""
    text = ""
    if message_file is not None:
        try:
            text = message_file.read_bytes()[:MESSAGE_BYTES].decode(errors="replace")
        except OSError:
            text = ""
    if not text.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
        text = log_tail(log_file, FALLBACK_LINES, FALLBACK_BYTES)
    return text


def log_tail(path: Path, lines: int, max_bytes: int | None = None) -> str:
    """The last `lines` lines of the log's last `max_bytes` bytes ("" without a log); reads only those bytes."""
    try:
        with path.open("rb") as f:
            if max_bytes is not None:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def container_states(containers: Sequence[Mapping[str, Any]]) -> list[ContainerState]:
    return [ContainerState(c["name"], c.get("image", "")) for c in containers]
