"""Container probes and preStop hooks as a kubelet runs them.

A container with a startupProbe is not started (and gets no readiness or
liveness probe) until that probe succeeds; one that fails it failureThreshold
times in a row is restarted, and so is one whose livenessProbe fails that often.
Readiness starts False and follows its probe; without one a started container
is ready. Probe kinds: exec (through a callable: the runner knows the
container's environment and mounts), httpGet (2xx and 3xx succeed) and tcpSocket,
against the pod's IP unless the probe names a host.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Exec = Callable[[list[str], float], bool]  # (command, timeout seconds) -> exited 0 in time


def port_number(port: int | str, container: Mapping[str, Any]) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"the container has no port named {port!r}")


def run_action(action: Mapping[str, Any], container: Mapping[str, Any], host: str, timeout: float,
               run_exec: Exec) -> tuple[bool, str]:
    """One probe (or handler) action: (succeeded, why not)."""
    try:
        if "exec" in action:
            command = [str(a) for a in action["exec"].get("command") or []]
            return (True, "") if run_exec(command, timeout) else (False, f"exec {command} failed")
        if "httpGet" in action:
            get = action["httpGet"]
            port = port_number(get.get("port", 80), container)
            conn_type = http.client.HTTPSConnection if get.get("scheme") == "HTTPS" else http.client.HTTPConnection
            conn = conn_type(get.get("host") or host, port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                conn.request("GET", get.get("path") or "/", headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            return (True, "") if 200 <= status < 400 else (False, f"HTTP probe failed with statuscode: {status}")
        if "tcpSocket" in action:
            tcp = action["tcpSocket"]
            with socket.create_connection((tcp.get("host") or host, port_number(tcp["port"], container)),
                                          timeout=timeout):
                return True, ""
        if "sleep" in action:
            time.sleep(max(0.0, min(float(action["sleep"].get("seconds", 0)), timeout)))
            return True, ""
        return False, f"the dev node does not run {sorted(action)} probes"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class Probe:
    spec: Mapping[str, Any]
    next_at: float
    failures: int = 0
    successes: int = 0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds") or 10)

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds") or 1)

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold") or 3)

    @property
    def success_threshold(self) -> int:
        return int(self.spec.get("successThreshold") or 1)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + self.period
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.failures, self.successes = self.failures + 1, 0


@dataclass
class Prober:
    """The probes of one running container; `tick` runs those that are due."""

    container: Mapping[str, Any]
    host: str
    run_exec: Exec
    started_at: float = field(default_factory=time.monotonic)
    started: bool = False
    ready: bool = False
    message: str = ""
    _probes: dict[str, Probe] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = self.container.get(kind)
            if spec:
                self._probes[kind] = Probe(spec, self.started_at + float(spec.get("initialDelaySeconds") or 0))
        self.started = "startupProbe" not in self._probes
        self.ready = self.started and "readinessProbe" not in self._probes

    def _run(self, probe: Probe, now: float) -> bool:
        ok, why = run_action(probe.spec, self.container, self.host, probe.timeout, self.run_exec)
        probe.record(ok, now)
        if not ok:
            self.message = why
        return ok

    def tick(self, now: float | None = None) -> str | None:
        """Run the due probes; returns why the container must be restarted, else None."""
        now = time.monotonic() if now is None else now
        if not self.started:
            startup = self._probes["startupProbe"]
            if startup.due(now):
                if self._run(startup, now):
                    self.started = True
                    self.ready = "readinessProbe" not in self._probes
                elif startup.failures >= startup.failure_threshold:
                    return f"Startup probe failed {startup.failures} times: {self.message}"
            return None
        readiness = self._probes.get("readinessProbe")
        if readiness is not None and readiness.due(now):
            ok = self._run(readiness, now)
            if ok and readiness.successes >= readiness.success_threshold:
                self.ready = True
            elif not ok and readiness.failures >= readiness.failure_threshold:
                self.ready = False
        liveness = self._probes.get("livenessProbe")
        if liveness is not None and liveness.due(now) and not self._run(liveness, now) \
                and liveness.failures >= liveness.failure_threshold:
            return f"Liveness probe failed {liveness.failures} times: {self.message}"
        return None
