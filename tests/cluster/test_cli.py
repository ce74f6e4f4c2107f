"""The `llamaops` commands that read the cluster, on a real API server.

The watch tests write status themselves (as the operator and trainer would), so
they check the watch and nothing else; the queue and logs tests run the real
operator with the local control plane's simulated GPU nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from operator_fixtures import REPO, Cluster, crd_namespace, gpu_pods_gone, install_crds, running_operator, wait_until

pytestmark = pytest.mark.cluster
H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="module")
def crds(kubectl) -> None:
    install_crds(kubectl)


def llamaops(kubeconfig: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run([sys.executable, "-m", "llamaops", *args, "--kubeconfig", str(kubeconfig)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def tiny(name: str) -> dict:
    return {
        "apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaFineTune", "metadata": {"name": name},
        "spec": {"model": {"base_model": "pvc://demo/models/tiny-llama"},
                 "dataset": {"pvc": {"claimName": "demo", "path": "chat.jsonl"}},
                 "resources": {"gpusPerNode": 0}, "output": {"pvc": {"claimName": "demo"}}},
    }


def set_status(kubectl, ns: str, name: str, status: dict) -> None:
    kubectl("patch", "-n", ns, "lft", name, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def test_watch_follows_a_run_to_its_adapter(crds, kubectl, kubeconfig: Path, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(tiny("follow")))
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "llamaops", "watch", "follow", "-n", namespace, "--no-live",
                             "--timeout", "120", "--kubeconfig", str(kubeconfig)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = proc.stdout.readline()  # the initial list: the watch is about to start
        assert first.strip() == f"{namespace}/follow Pending", first + proc.stderr.read() if proc.poll() else first
        queued = {"type": "Queued", "status": "True", "reason": "Queued", "lastTransitionTime": now(),
                  "message": "position 2: waiting for 1 node with 8 free NVIDIA-H100-80GB-HBM3s"}
        set_status(kubectl, namespace, "follow", {"phase": "Queued", "queuePosition": 2, "conditions": [queued]})
        time.sleep(0.5)
        set_status(kubectl, namespace, "follow", {"phase": "Running", "queuePosition": None, "progress": {
            "step": 5, "totalSteps": 20, "display": "5/20", "epoch": 0.25, "loss": 2.5, "tokensPerSecond": 1234.5,
            "etaSeconds": 30, "updatedAt": now()}})
        time.sleep(0.5)
        set_status(kubectl, namespace, "follow", {"progress": {"step": 20, "loss": 0.5, "etaSeconds": 0}})
        time.sleep(0.5)
        set_status(kubectl, namespace, "follow", {"phase": "Succeeded", "adapter": {
            "uri": f"pvc://demo/{namespace}/follow/adapter", "baseModel": "pvc://demo/models/tiny-llama", "r": 16}})
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    lines = [first.strip(), *out.splitlines()]
    assert lines[1] == (f"{namespace}/follow Queued position 2: waiting for 1 node with 8 free "
                        "NVIDIA-H100-80GB-HBM3s")
    assert lines[2].startswith(f"{namespace}/follow Running step 5/20 epoch 0.25 loss 2.5 tok/s 1234 eta 0:")
    assert lines[3].startswith(f"{namespace}/follow Running step 20/20 epoch 0.25 loss 0.5")
    assert lines[-1] == f"{namespace}/follow Succeeded: adapter pvc://demo/{namespace}/follow/adapter"


def test_watch_of_a_failed_run_exits_1_with_the_reason(crds, kubectl, kubeconfig: Path, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(tiny("broken")))
    set_status(kubectl, namespace, "broken", {"phase": "Failed", "conditions": [
        {"type": "Failed", "status": "True", "reason": "TrainerError", "lastTransitionTime": now(),
         "message": "trainer exit code 65 (bad data): spec.dataset: line 3 has no assistant turn"}]})
    for live in ("--no-live", "--live"):
        result = llamaops(kubeconfig, "watch", "broken", "-n", namespace, live)
        assert result.returncode == 1, result.stdout + result.stderr
        assert (f"{namespace}/broken Failed: TrainerError: trainer exit code 65 (bad data): spec.dataset: line 3 "
                "has no assistant turn") in " ".join(result.stdout.split())


def test_watch_of_a_namespace_and_of_a_missing_run(crds, kubectl, kubeconfig: Path, namespace: str) -> None:
    missing = llamaops(kubeconfig, "watch", "nope", "-n", namespace, "--no-live")
    assert missing.returncode == 2 and 'LlamaFineTune "nope" not found' in missing.stdout + missing.stderr
    for name, status in (("ok", {"phase": "Succeeded", "adapter": {"uri": "s3://b/ok", "baseModel": "x", "r": 8}}),
                         ("bad", {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True",
                                                                       "reason": "RestartsExhausted", "message": "m",
                                                                       "lastTransitionTime": now()}]})):
        kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(tiny(name)))
        set_status(kubectl, namespace, name, status)
    result = llamaops(kubeconfig, "watch", "-n", namespace, "--no-live")
    assert result.returncode == 1
    assert f"{namespace}/ok Succeeded: adapter s3://b/ok" in result.stdout
    assert f"{namespace}/bad Failed: RestartsExhausted: m" in result.stdout
    # -A sees them too (other namespaces may hold unfinished runs: bounded by --timeout).
    every = llamaops(kubeconfig, "watch", "-A", "--no-live", "--timeout", "5")
    assert every.returncode in (1, 3) and f"{namespace}/ok Succeeded" in every.stdout


def test_watch_resumes_after_each_server_timeout(crds, kubectl, kubeconfig: Path, namespace: str) -> None:
    """One-second watches: the change made after several of them have ended is still seen, from the last version."""
    from llamaops import kube
    from llamaops.cli.watch import follow, view

    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(tiny("slow")))
    changes: list[str] = []

    def later() -> None:
        time.sleep(3.5)
        set_status(kubectl, namespace, "slow", {"phase": "Running", "progress": {"step": 1, "totalSteps": 2}})
        time.sleep(2.5)
        set_status(kubectl, namespace, "slow", {"phase": "Succeeded"})

    async def main() -> dict:
        async with kube.connect(str(kubeconfig)) as api:
            return await asyncio.wait_for(follow(
                api, namespace, "slow", lambda objs: changes.append(view(objs[f"{namespace}/slow"]).phase),
                lambda objs: all(view(o).done for o in objs.values()), watch_seconds=1), 60)

    writer = threading.Thread(target=later)
    writer.start()
    try:
        objects = asyncio.run(main())
    finally:
        writer.join()
    assert changes == ["Pending", "Running", "Succeeded"]
    assert objects[f"{namespace}/slow"]["status"]["phase"] == "Succeeded"


# --- with the operator: the queue and the training pods ---------------------------------------------------------

@pytest.fixture(scope="module")
def ops(kubectl, kubeconfig: Path, tmp_path_factory) -> Iterator[Cluster]:
    with crd_namespace(kubectl, "cli") as ns:
        gpu_pods_gone(kubectl)
        with running_operator(kubeconfig, tmp_path_factory.mktemp("operator"), ns) as operator:
            cluster = Cluster(kubectl, ns, tmp_path_factory.mktemp("volumes"))
            cluster.volumes("training-data", "adapters")
            try:
                yield cluster
            finally:
                print(f"--- operator log ---\n{operator.tail(80)}")
                kubectl("delete", "lft", "--all", "-n", ns, "--wait=true", "--timeout=60s", check=False)


def test_queue_logs_and_watch_with_the_operator(ops: Cluster, cluster, kubeconfig: Path) -> None:
    c = ops
    c.run("fills", gpus=8, nodes=2)
    c.wait_phase("fills", "Running")
    c.run("first", gpus=8, priority=5)
    c.run("second", gpus=2, priority=0)
    wait_until(lambda: [c.status(n).get("queuePosition") for n in ("first", "second")] == [1, 2], "positions 1, 2")

    result = llamaops(kubeconfig, "queue", "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    mine = [r for r in data["queue"] if r["namespace"] == c.ns]
    assert [(r["position"], r["name"], r["priority"], r["gpus"], r["gpu_product"]) for r in mine] == [
        (1, "first", 5, 8, H100), (2, "second", 0, 2, H100)]
    assert "waiting for 1 node with 8 free" in mine[0]["why"] and mine[0]["waiting_seconds"] >= 0
    h100 = next(u for u in data["capacity"] if u["product"] == H100)
    assert (h100["nodes"], h100["gpus"], h100["used"], h100["free"]) == (2, 16, 16, 0)
    assert data["running"]["gpus"] >= 16

    text = llamaops(kubeconfig, "queue", "-n", c.ns)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"{c.ns}/first" in out and f"{c.ns}/second" in out and "fills" not in out
    assert H100 in out and "GPU capacity" in out and "waiting for" in out

    queued = llamaops(kubeconfig, "watch", "first", "-n", c.ns, "--no-live", "--timeout", "3")
    assert queued.returncode == 3
    assert f"{c.ns}/first Queued position 1: waiting for 1 node with 8 free" in queued.stdout

    # kwok runs no containers, so its pods have no logs: say so per rank, exit 1, no traceback.
    logs = llamaops(kubeconfig, "logs", "fills", "-n", c.ns)
    print(logs.stdout, logs.stderr)
    assert logs.returncode in (0, 1) and "Traceback" not in logs.stderr
    if logs.returncode == 1:
        assert "[rank 0] (no logs from pod fills-train-0-" in logs.stderr
        assert "[rank 1] (no logs from pod fills-train-1-" in logs.stderr
    if cluster.local:  # kwok: -f ends at once too (on a real cluster it would follow the trainer)
        followed = llamaops(kubeconfig, "logs", "fills", "-n", c.ns, "-f", "--tail", "5", timeout=30)
        assert followed.returncode == 1 and "[rank 1] (no logs from pod" in followed.stderr, followed.stderr
        assert "Traceback" not in followed.stderr
    none = llamaops(kubeconfig, "logs", "second", "-n", c.ns)
    assert none.returncode == 1 and "has no training pods (phase Queued)" in none.stderr
    assert llamaops(kubeconfig, "logs", "ghost", "-n", c.ns).returncode == 2

    c.finish_pods("fills")
    done = llamaops(kubeconfig, "watch", "fills", "-n", c.ns, "--no-live", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{c.ns}/fills Succeeded: adapter pvc://adapters/{c.ns}/fills/adapter" in done.stdout
