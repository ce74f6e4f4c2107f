"""The dev node agent (`python -m llamaops_dev.devnode`) as a subprocess of a test, with its pods' files at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetest import wait_until
from llamaops_dev.devcluster.processes import log_tail
from llamaops_dev.devnode import runner
from local_binaries import ollama_binary

REPO = Path(__file__).resolve().parents[2]
NODE = "local-cpu"
# What pods on the dev node need to reach it: its label, and a toleration of its taint.
PLACEMENT = {"nodeSelector": {"llamaops.io/dev-node": "true"},
             "tolerations": [{"key": "llamaops.io/dev-node", "operator": "Exists", "effect": "NoSchedule"}]}


def ollama_dir() -> str | None:
    """The directory of the `ollama` the serving tests put on the agent's PATH; None when there is none."""
    binary = ollama_binary()
    return str(binary.parent) if binary else None


class DevNodeProcess:
    """One dev node agent; `stop()` ends it and removes its Node, so later tests see the cluster as it was."""

    def __init__(self, kubectl, kubeconfig: Path, work_dir: Path, name: str = NODE, cpu: str = "8",
                 memory: str = "16Gi") -> None:
        self.kubectl, self.kubeconfig, self.work_dir, self.name = kubectl, kubeconfig, work_dir, name
        self.cpu, self.memory = cpu, memory
        self.log = work_dir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Pods inherit OMP_NUM_THREADS, HF_HUB_OFFLINE and LLAMAOPS_PROGRESS_INTERVAL (the agent's default
        # --pass-env): status patches every 0.5 s (not 5), as a tiny run trains in seconds and tests look for
        # progress on the way. PYTHONUNBUFFERED is for the agent's own log (the trainer's pods get it from the Job).
        # `ollama` on PATH for Ollama LlamaServes, logging each prompt it renders (OLLAMA_DEBUG=2).
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   LLAMAOPS_PROGRESS_INTERVAL="0.5", OLLAMA_DEBUG="2")
        ollama = ollama_dir()
        if ollama:
            env["PATH"] = os.pathsep.join([ollama, env.get("PATH", "/usr/bin:/bin")])
        env.pop("KUBECONFIG", None)  # pods must not find the admin's credentials
        cmd = [sys.executable, "-m", "llamaops_dev.devnode", f"--kubeconfig={self.kubeconfig}", f"--name={self.name}",
               f"--work-dir={self.work_dir}", f"--cpu={self.cpu}", f"--memory={self.memory}"]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_until(self.ready, f"node {self.name} Ready\n{self.tail()}", timeout=60)

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the dev node agent exited {self.proc.returncode}:\n{self.tail()}")
        out = self.kubectl("get", "node", self.name, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.kubectl("delete", "node", self.name, "--ignore-not-found", "--wait=false", check=False)
        self.kubectl("delete", "lease", "-n", "kube-node-lease", self.name, "--ignore-not-found", check=False)

    def tail(self, lines: int = 60) -> str:
        return log_tail(self.log, lines)

    def pod_dir(self, namespace: str, pod: str) -> Path:
        return runner.pod_dir(self.work_dir, namespace, pod)

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        path = self.pod_dir(namespace, pod) / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def record(self, namespace: str, pod: str, container: str) -> dict[str, Any]:
        """What the agent ran: argv as the pod asked (expanded), the local argv, env names, pid, log."""
        return json.loads((self.pod_dir(namespace, pod) / f"{container}.json").read_text())
