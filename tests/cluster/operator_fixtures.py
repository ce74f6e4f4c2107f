"""Running the operator against the cluster under test, and playing kubelet for its training pods.

kwok leaves LlamaOps training pods Running (see devcluster/kwok_stages.py);
`finish_pods` writes the terminal status a kubelet would, so a test decides
whether a run succeeds, fails with a trainer exit code, or crashes.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from api_cases import example
from kubetest import wait_until

REPO = Path(__file__).resolve().parents[2]
CRDS = ("llamafinetunes.llamaops.io", "llamaserves.llamaops.io")


# Below Linux's default ephemeral range (32768-60999): a port the kernel hands to outgoing connections can be
# taken between this check and the operator's bind (operators start in parallel here, and every one connects).
_PORTS = itertools.count(20000 + os.getpid() % 8000)


def free_port() -> int:
    """A port free now, outside the ephemeral range, never handed out twice by this process."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable")


def install_crds(kubectl, source: Path = REPO / "crds") -> None:
    """Install (or update) both CRDs from `source` and wait until the API server serves both."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(source))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{crd}" for crd in CRDS))


@contextmanager
def crd_namespace(kubectl, prefix: str) -> Iterator[str]:
    """The CRDs installed, and a new namespace for one test module (deleted after it, with its test PVs)."""
    install_crds(kubectl)
    name = f"{prefix}-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false")
        kubectl("delete", "pv", "-l", f"llamaops.dev/test-ns={name}", "--wait=false", check=False)


@contextmanager
def running_operator(kubeconfig: Path, log_dir: Path, namespace: str, **env: str) -> Iterator[OperatorProcess]:
    """An operator managing one namespace, with a fast admission loop."""
    proc = OperatorProcess(kubeconfig, log_dir / "operator.log",
                           {"LLAMAOPS_NAMESPACES": namespace, "LLAMAOPS_ADMISSION_INTERVAL": "1", **env})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


class OperatorProcess:
    """`llamaops operator` as a subprocess, restartable, with its log kept for failures."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str]) -> None:
        self.kubeconfig, self.log, self.env = kubeconfig, log, env
        self.proc: subprocess.Popen | None = None
        self.port = free_port()

    def start(self) -> None:
        """Start it and wait until its liveness endpoint answers."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), LLAMAOPS_LIVENESS_PORT=str(self.port), **self.env)
        out = self.log.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "llamaops", "operator"], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_until(self.alive, f"the operator's liveness endpoint\n{self.tail()}", timeout=60)

    def alive(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, kill: bool = True) -> None:
        self.stop(kill=kill)
        self.start()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


class Cluster:
    """kubectl helpers for one test namespace."""

    def __init__(self, kubectl, namespace: str, tmp: Path) -> None:
        self.kubectl, self.ns, self.tmp = kubectl, namespace, tmp

    def apply(self, doc: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", self.ns, "-f", "-", input=yaml.safe_dump(doc))

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> Any:
        args = ["get", "-n", self.ns, kind, "-o", "json"]
        if name:
            args.insert(4, name)
        if selector:
            args += ["-l", selector]
        proc = self.kubectl(*args, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get("lft", name) or {}).get("status") or {}

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(lambda: self.status(name) if self.status(name).get("phase") == phase else None,
                        f"{name} to be {phase} (status: {self.status(name)})", timeout)

    def reset(self, kinds: str, children: str, timeout: float = 60) -> None:
        """After a test: delete every object of `kinds`, wait for the collector to remove their `children`,
        then force the remaining pods away (kwok's pods have no kubelet to finish them)."""
        self.kubectl("delete", kinds, "--all", "-n", self.ns, "--wait=true", "--timeout=60s")
        wait_until(lambda: not (self.get(children) or {}).get("items"), f"{children} to be collected",
                   timeout=timeout)
        self.kubectl("delete", "pods", "--all", "-n", self.ns, "--grace-period=0", "--force", check=False)
        wait_until(lambda: not (self.get("pods") or {}).get("items"), "pods to go", timeout=60)

    def volumes(self, *claims: str) -> None:
        """Claims bound to hostPath volumes, so training pods can be scheduled."""
        for claim in claims:
            pv = f"{self.ns}-{claim}"[:63]
            self.kubectl("apply", "-f", "-", input=yaml.safe_dump({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": pv, "labels": {"llamaops.dev/test-ns": self.ns}},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                         "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                         "hostPath": {"path": str(self.tmp / claim)},
                         "claimRef": {"namespace": self.ns, "name": claim}}}))
            self.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                                 "resources": {"requests": {"storage": "1Gi"}}}})
        for claim in claims:
            wait_until(lambda c=claim: (self.get("pvc", c) or {}).get("status", {}).get("phase") == "Bound",
                     f"claim {claim} bound")

    def run(self, name: str, base: str = "llama-3.1-8b-lora.yaml", *, gpus: int = 1, nodes: int = 1,
            priority: int = 0, **spec: Any) -> dict[str, Any]:
        doc = example(base)
        doc["metadata"] = {"name": name, "labels": {"app.kubernetes.io/instance": "team-fine-tunes"}}
        doc["spec"]["resources"].update(gpusPerNode=gpus, nodes=nodes)
        doc["spec"]["queue"] = {"priority": priority}
        doc["spec"].pop("hfTokenSecretRef", None)
        for key, value in spec.items():
            doc["spec"][key] = value
        self.apply(doc)
        return doc

    def pods(self, name: str) -> list[dict[str, Any]]:
        return (self.get("pods", selector=f"llamaops.io/finetune={name}") or {}).get("items", [])

    def job(self, name: str) -> dict[str, Any] | None:
        return self.get("job", f"{name}-train")

    def finish_pods(self, name: str, exit_code: int = 0, message: str = "", count: int = 1) -> None:
        """Write a terminal status on the run's pods (once `count` of them run), as the kubelet would when the
        trainer exits."""
        pods = wait_until(lambda: (lambda running: running if len(running) >= count else None)(
            [p for p in self.pods(name) if p["status"].get("phase") == "Running"]), f"{count} running pod(s) of {name}")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for pod in pods:
            image = pod["spec"]["containers"][0]["image"]
            terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                          "message": message, "startedAt": now, "finishedAt": now}
            status = {"phase": "Succeeded" if exit_code == 0 else "Failed",
                      "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
                      "containerStatuses": [{"name": "trainer", "image": image, "imageID": "", "ready": False,
                                             "restartCount": 0, "state": {"terminated": terminated}}]}
            self.kubectl("patch", "-n", self.ns, "pod", pod["metadata"]["name"], "--subresource=status",
                         "--type=merge", "-p", json.dumps({"status": status}))

    def events(self, name: str) -> list[dict[str, Any]]:
        items = (self.get("events") or {}).get("items", [])
        return [e for e in items if e["involvedObject"].get("name") == name]


def gpu_pods_gone(kubectl) -> Iterator[None]:
    """Wait until no pod anywhere holds GPUs (earlier tests' namespaces are deleted in the background)."""
    def none_left() -> bool:
        pods = json.loads(kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
        return not [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed") and any(
            (c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu") for c in p["spec"]["containers"])]
    wait_until(none_left, "GPU pods of earlier tests to go away", timeout=120, interval=1)


def claim_volumes(kubectl, namespace: str, tmp_path_factory) -> Path:
    """The claims the example runs use (training-data, adapters), bound to directories of a new temp dir."""
    root = tmp_path_factory.mktemp("volumes")
    Cluster(kubectl, namespace, root).volumes("training-data", "adapters")
    return root


@contextmanager
def cluster_for_test(operator: OperatorProcess, cluster: Cluster, request, kinds: str = "lft", children: str = "jobs",
                 timeout: float = 60) -> Iterator[Cluster]:
    """A test's cluster helpers; after it, the operator's log when it failed, and `kinds` deleted (and their
    `children` collected) for the next test."""
    yield cluster
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"--- operator log ---\n{operator.tail(150)}")
    cluster.reset(kinds, children, timeout=timeout)
