"""Chaos soak: the operator on the local control plane while its world misbehaves, with invariants checked.

N runs of mixed shapes (1x1 ... 2x8, some gangs) on simulated 8-GPU nodes. This script plays kubelet (each
training gang ends after a random time: mostly exit 0 with the trainer's report written, sometimes 75 after a
checkpoint, sometimes 1) while a driver, bounded in time, SIGKILLs and restarts the operator, deletes and re-adds
a GPU node, restarts the API server once and deletes a Job by hand. Checked at every sample and at the end:

  - no node ever has more GPUs admitted onto it (status.assignedNodes of admitted runs) than it has,
    nor more GPUs requested by the pods bound to it;
  - every run ends Succeeded exactly once (one Succeeded event) or Failed with a reason;
  - no orphan: every Job, ConfigMap, Role and Service of the namespace is controlled by a run that exists,
    and every Job is its run's current one;
  - no status lost: a Succeeded run keeps its adapter and the progress its trainer reported last.

    .venv/bin/python bench/chaos.py                       # 50 runs, 4 nodes, faults for 240 s
    .venv/bin/python bench/chaos.py --runs 12 --seconds 40   # the short variant (tests/cluster/test_chaos.py)

Prints the faults injected, the runs and their outcomes, and the violations; exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]
import trainer_report  # noqa: E402  (bench/)
from api_cases import example  # noqa: E402
from llamaops.api.constants import FINETUNES, GPU_RESOURCE, GROUP, LABEL_FINETUNE, VERSION  # noqa: E402

SHAPES = [(1, 1)] * 6 + [(2, 1)] * 4 + [(4, 1)] * 4 + [(8, 1)] * 3 + [(8, 2)] * 2 + [(4, 2)] * 1
S3_PREFIX = "s3://chaos-adapters/runs"
CHILD_KINDS = ("jobs", "configmaps", "roles", "services")


@dataclass
class Report:
    faults: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    samples: int = 0
    outcomes: Counter = field(default_factory=Counter)

    def violate(self, what: str) -> None:
        if what not in self.violations:
            self.violations.append(what)


def manifest(name: str, gpus: int, nodes: int, priority: int) -> dict[str, Any]:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"] = {"name": name}
    doc["spec"].pop("hfTokenSecretRef")
    # No volumes: pods of a simulated run schedule on a cluster without storage.
    doc["spec"]["dataset"] = {"huggingFace": {"name": "org/chat-data"}}
    doc["spec"]["output"] = {"s3": {"uri": f"{S3_PREFIX}/{name}/"}}
    doc["spec"]["resources"].update(gpusPerNode=gpus, nodes=nodes)
    doc["spec"]["queue"] = {"priority": priority}
    doc["spec"]["maxRestarts"] = 20  # faults must not exhaust them: every run can still succeed
    return doc


class Cluster:
    """The kubernetes (sync) client's calls this soak makes."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        from kubernetes import client, config

        self.api = config.new_client_from_config(str(kubeconfig))
        self.core, self.batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        self.custom, self.rbac = client.CustomObjectsApi(self.api), client.RbacAuthorizationV1Api(self.api)
        self.ns = namespace

    def runs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, FINETUNES)["items"]

    def json(self, call: Any, *args: Any, **kw: Any) -> Any:
        return json.loads(call(*args, _preload_content=False, **kw).data)


class Kubelet(threading.Thread):
    """Ends each training gang a random time after all its pods run, as the trainer would end it."""

    def __init__(self, c: Cluster, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.c, self.rng, self.stop = c, rng, threading.Event()
        self.started: dict[str, float] = {}  # Job uid -> when all its pods were first seen Running
        self.plan: dict[str, tuple[float, int]] = {}  # Job uid -> (duration, exit code)
        self.reported: dict[str, dict[str, Any]] = {}  # run -> the last progress written

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._pass()
            except Exception:  # noqa: BLE001 - the API server may be restarting: the next pass retries
                pass
            time.sleep(0.3)

    def _pass(self) -> None:
        pods = self.c.json(self.c.core.list_namespaced_pod, self.c.ns, label_selector=LABEL_FINETUNE)["items"]
        gangs: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            uid = (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/controller-uid")
            if uid and not pod["metadata"].get("deletionTimestamp"):
                gangs.setdefault(uid, []).append(pod)
        sizes = {j["metadata"]["uid"]: j["spec"].get("parallelism", 1)
                 for j in self.c.json(self.c.batch.list_namespaced_job, self.c.ns)["items"]}
        now = time.monotonic()
        for uid, members in gangs.items():
            run = members[0]["metadata"]["labels"][LABEL_FINETUNE]
            running = [p for p in members if p["status"].get("phase") == "Running"]
            if uid not in sizes or len(running) < sizes[uid]:
                continue  # the whole gang runs, or none of it trains
            first = self.started.setdefault(uid, now)
            duration, code = self.plan.setdefault(uid, (self.rng.uniform(2.0, 10.0), self.rng.choices(
                [0, 75, 1], weights=[85, 10, 5])[0]))
            if now - first < duration:
                continue
            if code == 0:
                self._report(run)
            for pod in running:
                self._finish(pod, code)

    def _report(self, run: str) -> None:
        """What the trainer writes in its report ConfigMap before it exits 0: the last progress, the adapter."""
        self.reported[run] = trainer_report.write(self.c.core, self.c.custom, self.c.ns, run,
                                                  steps=self.rng.randint(50, 500))

    def _finish(self, pod: dict[str, Any], code: int) -> None:
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": ts,
                      "finishedAt": ts, "message": "" if code != 75 else "stopped by a termination signal"}
        status = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{
            "name": "trainer", "image": pod["spec"]["containers"][0]["image"], "imageID": "", "ready": False,
            "restartCount": 0, "state": {"terminated": terminated}}]}
        try:
            self.c.core.patch_namespaced_pod_status(pod["metadata"]["name"], self.c.ns, {"status": status})
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass


class Sampler(threading.Thread):
    """Checks the capacity invariants every `interval` seconds."""

    def __init__(self, c: Cluster, report: Report, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.c, self.report, self.interval, self.stop = c, report, interval, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
                self.report.samples += 1
            except Exception:  # noqa: BLE001 - the API server may be restarting
                pass
            time.sleep(self.interval)

    def sample(self) -> None:
        nodes = {n["metadata"]["name"]: int((n["status"].get("allocatable") or {}).get(GPU_RESOURCE) or 0)
                 for n in self.c.json(self.c.core.list_node)["items"]}
        admitted: Counter = Counter()
        for run in self.c.runs():
            status = run.get("status") or {}
            if status.get("phase") in ("Admitted", "Running"):
                for node in status.get("assignedNodes") or []:
                    admitted[node] += run["spec"]["resources"]["gpusPerNode"]
        for node, gpus in admitted.items():
            if node in nodes and gpus > nodes[node]:
                self.report.violate(f"{gpus} GPUs admitted onto {node}, which has {nodes[node]}")
        bound: Counter = Counter()
        for pod in self.c.json(self.c.core.list_pod_for_all_namespaces)["items"]:
            if pod["status"].get("phase") in ("Succeeded", "Failed") or not pod["spec"].get("nodeName"):
                continue
            for ctr in pod["spec"]["containers"]:
                bound[pod["spec"]["nodeName"]] += int(((ctr.get("resources") or {}).get("limits") or {}).get(
                    GPU_RESOURCE) or 0)
        for node, gpus in bound.items():
            if node in nodes and gpus > nodes[node]:
                self.report.violate(f"{gpus} GPUs requested by pods on {node}, which has {nodes[node]}")


class Operator:
    def __init__(self, kubeconfig: Path, namespace: str, log: Path) -> None:
        self.env = dict(os.environ, KUBECONFIG=str(kubeconfig), LLAMAOPS_NAMESPACES=namespace,
                        LLAMAOPS_ADMISSION_INTERVAL="1", LLAMAOPS_STUCK_AFTER="20", LLAMAOPS_NODE_LOST_AFTER="5",
                        LLAMAOPS_LIVENESS_PORT=str(19000 + random.randint(0, 900)))
        self.log, self.proc = log, None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "llamaops", "operator"], env=self.env,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def drive(c: Cluster, cluster: Any, operator: Operator, report: Report, seconds: float, rng: random.Random,
          runs: int) -> None:
    """Runs submitted over the first 60% of `seconds`, and faults all along: operator kills; one node lost and
    back, one Job deleted by hand, one API server restart, each at its own moment."""
    t0 = time.monotonic()
    moments = {"node": 0.25 * seconds, "job": 0.4 * seconds, "apiserver": 0.55 * seconds}
    submit_at = sorted(rng.uniform(0, 0.6 * seconds) for _ in range(runs))
    submitted = 0
    lost: tuple[str, dict[str, Any]] | None = None
    next_kill = t0 + rng.uniform(6, 12)
    while (elapsed := time.monotonic() - t0) < seconds or submitted < runs:
        while submitted < runs and elapsed >= submit_at[submitted]:
            gpus, gang = rng.choice(SHAPES)
            try:
                c.custom.create_namespaced_custom_object(GROUP, VERSION, c.ns, FINETUNES, manifest(
                    f"run-{submitted:03d}", gpus, gang, rng.randint(0, 3)))
                submitted += 1
            except Exception:  # noqa: BLE001 - the API server is restarting: the next round submits it
                break
        if time.monotonic() >= next_kill and elapsed < seconds:
            operator.kill()
            report.faults["operator SIGKILL"] += 1
            time.sleep(rng.uniform(0.5, 2.5))
            operator.start()
            next_kill = time.monotonic() + rng.uniform(8, 15)
        if "node" in moments and elapsed >= moments["node"]:
            del moments["node"]
            node = c.json(c.core.read_node, "gpu-node-0")
            c.core.delete_node("gpu-node-0")
            lost = ("gpu-node-0", node)
            report.faults["GPU node deleted"] += 1
        if lost is not None and elapsed >= moments_lost_back(seconds):
            name, node = lost
            meta = {k: node["metadata"][k] for k in ("name", "labels", "annotations")}
            c.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {}, "status": {
                "capacity": node["status"]["capacity"], "allocatable": node["status"]["allocatable"]}})
            report.faults["GPU node re-added"] += 1
            lost = None
        if "apiserver" in moments and elapsed >= moments["apiserver"]:
            del moments["apiserver"]
            cluster.restart("kube-apiserver")
            report.faults["API server restart"] += 1
        if "job" in moments and elapsed >= moments["job"]:
            jobs = [j for j in c.json(c.batch.list_namespaced_job, c.ns)["items"]
                    if not (j.get("status") or {}).get("conditions")]
            if jobs:
                del moments["job"]
                victim = rng.choice(jobs)["metadata"]["name"]
                c.batch.delete_namespaced_job(victim, c.ns, propagation_policy="Background")
                report.faults["Job deleted by hand"] += 1
        time.sleep(0.25)


def moments_lost_back(seconds: float) -> float:
    """When the lost node comes back: 12 s after it went (its runs must have moved by then)."""
    return 0.25 * seconds + 12


def check_end(c: Cluster, kubelet: Kubelet, report: Report) -> None:
    runs = {r["metadata"]["name"]: r for r in c.runs()}
    events = c.json(c.core.list_namespaced_event, c.ns)["items"]
    succeeded = Counter(e["involvedObject"]["name"] for e in events if e["reason"] == "Succeeded"
                        and e["involvedObject"].get("kind") == "LlamaFineTune")
    for name, run in runs.items():
        status = run.get("status") or {}
        phase = status.get("phase")
        if phase == "Succeeded":
            report.outcomes["Succeeded"] += 1
            if succeeded[name] != 1:
                report.violate(f"{name} succeeded {succeeded[name]} times")
            if not (status.get("adapter") or {}).get("uri", "").startswith(f"{S3_PREFIX}/{name}/"):
                report.violate(f"{name} Succeeded without its adapter: {status.get('adapter')}")
            if name in kubelet.reported and status.get("progress") != kubelet.reported[name]:
                report.violate(f"{name}: progress {status.get('progress')}, its trainer reported "
                               f"{kubelet.reported[name]} last")
        elif phase == "Failed":
            failed = next((x for x in status.get("conditions") or [] if x["type"] == "Failed"), {})
            report.outcomes[f"Failed ({failed.get('reason') or 'no reason'})"] += 1
            if not failed.get("reason"):
                report.violate(f"{name} Failed without a reason")
        else:
            report.outcomes[f"not finished ({phase})"] += 1
            report.violate(f"{name} is still {phase}")
    uids = {r["metadata"]["uid"]: r for r in runs.values()}
    for kind in CHILD_KINDS:
        call = {"jobs": c.batch.list_namespaced_job, "configmaps": c.core.list_namespaced_config_map,
                "roles": c.rbac.list_namespaced_role, "services": c.core.list_namespaced_service}[kind]
        for obj in c.json(call, c.ns)["items"]:
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
            if obj["metadata"]["name"] == "kube-root-ca.crt":
                continue
            owner = uids.get(refs[0]["uid"]) if refs else None
            if owner is None:
                report.violate(f"orphan {kind[:-1]} {obj['metadata']['name']}")
            elif kind == "jobs" and obj["metadata"]["name"] != (owner.get("status") or {}).get("jobName"):
                report.violate(f"Job {obj['metadata']['name']} is not its run's current one")


def soak(runs: int, seconds: float, nodes: int, seed: int, work: Path) -> Report:
    from llamaops_dev.devcluster import ClusterConfig, DevCluster, Ports
    from llamaops_dev.devcluster.config import NodePools

    cluster = DevCluster(work / "home")
    cfg = ClusterConfig(ports=Ports().shifted(int(os.environ.get("CHAOS_PORT_OFFSET", "700"))),
                        nodes=NodePools(gpu_nodes=nodes, cpu_nodes=0))
    kubeconfig = cluster.up(cfg, timeout=240)
    report = Report()
    rng = random.Random(seed)
    operator = None
    try:
        from llamaops_dev.devcluster import binaries

        kubectl = [str(binaries.resolve() / "kubectl"), f"--kubeconfig={kubeconfig}"]
        subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, capture_output=True)
        subprocess.run([*kubectl, "wait", "--for=condition=Established", "crd/llamafinetunes.llamaops.io"],
                       check=True, capture_output=True)
        ns = "chaos"
        c = Cluster(kubeconfig, ns)
        c.core.create_namespace({"metadata": {"name": ns}})
        operator = Operator(kubeconfig, ns, work / "operator.log")
        operator.start()
        kubelet, sampler = Kubelet(c, rng), Sampler(c, report)
        kubelet.start()
        sampler.start()
        drive(c, cluster, operator, report, seconds, rng, runs)
        deadline = time.monotonic() + max(180.0, 4 * runs)
        while time.monotonic() < deadline:
            phases = [(r.get("status") or {}).get("phase") for r in c.runs()]
            if all(p in ("Succeeded", "Failed") for p in phases):
                break
            time.sleep(1)
        sampler.stop.set()
        kubelet.stop.set()
        time.sleep(2)  # the last writes land
        check_end(c, kubelet, report)
    finally:
        if operator is not None:
            operator.stop()
        cluster.down()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=240, help="how long faults are injected")
    parser.add_argument("--nodes", type=int, default=4, help="simulated 8-GPU nodes")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llamaops-chaos-"))
    t0 = time.monotonic()
    report = soak(args.runs, args.seconds, args.nodes, args.seed, work)
    print(f"chaos soak: {args.runs} runs on {args.nodes} x 8 GPUs, faults for {args.seconds:.0f} s, "
          f"{time.monotonic() - t0:.0f} s in all; operator log {work / 'operator.log'}")
    print("faults injected: " + ", ".join(f"{k} x{v}" for k, v in report.faults.items()))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())))
    print(f"invariant samples: {report.samples}; violations: {len(report.violations)}")
    for v in report.violations:
        print(f"  VIOLATION {v}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
