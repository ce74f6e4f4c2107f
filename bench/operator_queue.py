"""Operator benchmarks on the local control plane (or $KUBECONFIG with --external).

  latency: apply a LlamaFineTune -> its Job exists; median and p90 over N runs on an idle cluster.
  scale:   N runs submitted at once onto simulated 8-GPU nodes; this script plays kubelet and ends
           each training pod a little after it starts. Prints admissions per second while capacity
           frees, wall time to drain, the operator's peak memory and its API requests per run.
           --kueue repeats the same workload through Kueue on the same cluster, side by side.

    .venv/bin/python bench/operator_queue.py latency --runs 20
    .venv/bin/python bench/operator_queue.py scale --runs 500 --nodes 20 [--kueue]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]
import trainer_report  # noqa: E402  (bench/)
from api_cases import example  # noqa: E402
from llamaops.api.constants import FINETUNES as PLURAL  # noqa: E402
from llamaops.api.constants import GROUP, LABEL_FINETUNE, VERSION  # noqa: E402


def start_cluster(nodes: int, kueue: bool, home: Path) -> Path:
    from llamaops_dev.devcluster import ClusterConfig, DevCluster, Ports
    from llamaops_dev.devcluster.config import NodePools

    cfg = ClusterConfig(ports=Ports().shifted(int(os.environ.get("BENCH_PORT_OFFSET", "900"))),
                        nodes=NodePools(gpu_nodes=nodes, cpu_nodes=0), kueue=kueue)
    return DevCluster(home).up(cfg, timeout=240)


def start_operator(kubeconfig: Path, log: Path, mode: str, namespace: str) -> subprocess.Popen:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), LLAMAOPS_QUEUE_MODE=mode, LLAMAOPS_NAMESPACES=namespace,
               LLAMAOPS_LIVENESS_PORT=str(18000 + random.randint(0, 999)), LLAMAOPS_KUEUE_QUEUE="bench")
    return subprocess.Popen([sys.executable, "-m", "llamaops", "operator"], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def stop_operator(proc: subprocess.Popen, log: Path) -> tuple[int | None, float | None]:
    """(API requests, peak RSS in MB) of the operator."""
    peak = None
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        pass
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    found = re.findall(r"llamaops api requests: (\d+)", log.read_text())
    return (int(found[-1]) if found else None), peak


def setup(api: client.ApiClient, kubectl_apply, namespace: str) -> None:
    kubectl_apply(str(REPO / "crds"))
    client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})


def manifest(name: str, gpus: int, nodes: int = 1, priority: int = 0) -> dict:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"] = {"name": name}
    doc["spec"].pop("hfTokenSecretRef")
    # No volumes: pods of a benchmark run must schedule on a cluster without storage.
    doc["spec"]["dataset"] = {"huggingFace": {"name": "org/chat-data"}}
    doc["spec"]["output"] = {"s3": {"uri": "s3://bench-adapters/runs/"}}
    doc["spec"]["resources"].update(gpusPerNode=gpus, nodes=nodes)
    doc["spec"]["queue"] = {"priority": priority}
    return doc


def wait(check, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def latency(api: client.ApiClient, ns: str, runs: int) -> None:
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    times = []
    for i in range(runs):
        name = f"lat-{i}"
        t0 = time.perf_counter()
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest(name, 1))
        w = watch.Watch()
        for event in w.stream(batch.list_namespaced_job, ns, field_selector=f"metadata.name={name}-train",
                              timeout_seconds=30):
            if event["type"] == "ADDED":
                times.append(time.perf_counter() - t0)
                w.stop()
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        wait(lambda n=name: not batch.list_namespaced_job(ns, label_selector=f"{LABEL_FINETUNE}={n}").items,
             60, "the Job to be collected")
    times.sort()
    print(f"apply -> Job exists, {runs} runs: median {statistics.median(times) * 1000:.0f} ms, "
          f"p90 {times[int(0.9 * (len(times) - 1))] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms (target < 1000 ms)")


class Kubelet(threading.Thread):
    """Ends each running training pod `duration` seconds after it started running."""

    def __init__(self, api: client.ApiClient, ns: str, duration: float) -> None:
        super().__init__(daemon=True)
        self.core, self.ns, self.duration, self.stop = client.CoreV1Api(api), ns, duration, threading.Event()
        self.custom = client.CustomObjectsApi(api)
        self.seen: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            pods = self.core.list_namespaced_pod(self.ns, label_selector=LABEL_FINETUNE).items
            for pod in pods:
                if pod.status.phase != "Running":
                    continue
                first = self.seen.setdefault(pod.metadata.name, now)
                if now - first < self.duration:
                    continue
                if pod.metadata.labels.get("batch.kubernetes.io/job-completion-index", "0") == "0":
                    try:  # rank 0's last act: the report (progress, the adapter uploaded to S3)
                        trainer_report.write(self.core, self.custom, self.ns, pod.metadata.labels[LABEL_FINETUNE])
                    except client.ApiException:
                        continue
                image = pod.spec.containers[0].image
                ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                body = {"status": {"phase": "Succeeded", "containerStatuses": [{
                    "name": "trainer", "image": image, "imageID": "", "ready": False, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": ts,
                                             "finishedAt": ts}}}]}}
                try:
                    self.core.patch_namespaced_pod_status(pod.metadata.name, self.ns, body)
                except client.ApiException:
                    pass
            time.sleep(0.2)


def scale(api: client.ApiClient, ns: str, runs: int, duration: float, seed: int = 7) -> dict[str, float]:
    custom = client.CustomObjectsApi(api)
    rng = random.Random(seed)
    shapes = [(1, 1)] * 40 + [(2, 1)] * 25 + [(4, 1)] * 20 + [(8, 1)] * 10 + [(8, 2)] * 5
    admitted: dict[str, float] = {}
    done: dict[str, float] = {}
    stop = threading.Event()

    def watcher() -> None:
        w = watch.Watch()
        while not stop.is_set():
            for event in w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, timeout_seconds=5):
                obj = event["object"]
                phase = (obj.get("status") or {}).get("phase")
                name = obj["metadata"]["name"]
                if phase in ("Admitted", "Running", "Succeeded"):
                    admitted.setdefault(name, time.monotonic())
                if phase == "Succeeded":
                    done.setdefault(name, time.monotonic())
                if stop.is_set():
                    w.stop()
    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    kubelet = Kubelet(api, ns, duration)
    kubelet.start()
    t0 = time.monotonic()
    for i in range(runs):
        gpus, nodes = rng.choice(shapes)
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                               manifest(f"run-{i:04d}", gpus, nodes, rng.randint(0, 3)))
    submitted = time.monotonic() - t0
    last = (0, time.monotonic())
    while len(done) < runs:  # give up when nothing finishes for a minute
        if len(done) != last[0]:
            last = (len(done), time.monotonic())
        elif time.monotonic() - last[1] > 60:
            raise SystemExit(f"stalled: {len(done)}/{runs} finished, {len(admitted)} admitted")
        time.sleep(0.2)
    wall = time.monotonic() - t0
    stop.set()
    kubelet.stop.set()
    stamps = sorted(admitted.values())
    first, last = stamps[0], stamps[-1]
    rate = (len(stamps) - 1) / (last - first) if last > first else float("inf")
    return {"runs": runs, "submit_s": submitted, "wall_s": wall, "admissions_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["latency", "scale"])
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--duration", type=float, default=1.0, help="simulated training time per run (s)")
    parser.add_argument("--kueue", action="store_true", help="also run the workload through Kueue")
    args = parser.parse_args()
    runs = args.runs or (20 if args.what == "latency" else 500)

    work = Path(tempfile.mkdtemp(prefix="llamaops-bench-"))
    kubeconfig = start_cluster(args.nodes if args.what == "scale" else 2, args.kueue, work / "home")
    config.load_kube_config(str(kubeconfig))
    api = client.ApiClient()
    from llamaops_dev.devcluster import binaries

    kubectl = str(binaries.resolve() / "kubectl")

    def apply(path: str) -> None:
        subprocess.run([kubectl, f"--kubeconfig={kubeconfig}", "apply", "--server-side", "-f", path], check=True,
                       capture_output=True)
        subprocess.run([kubectl, f"--kubeconfig={kubeconfig}", "wait", "--for=condition=Established",
                        "crd/llamafinetunes.llamaops.io"], check=True, capture_output=True)

    results = {}
    try:
        for mode in (["builtin", "kueue"] if args.kueue else ["builtin"]):
            ns = f"bench-{mode}"
            setup(api, apply, ns)
            if mode == "kueue":
                from llamaops_dev.devcluster import kueue as kq
                from llamaops_dev.devcluster.config import NodePools

                quota = kq.gpu_quota(NodePools(gpu_nodes=args.nodes, cpu_nodes=0))  # all simulated GPUs
                kq.create_default_queues(api, ns, quota=quota, local_queue_name="bench")
            log = work / f"operator-{mode}.log"
            proc = start_operator(kubeconfig, log, mode, ns)
            time.sleep(2)
            if args.what == "latency":
                latency(api, ns, runs)
                requests, peak = stop_operator(proc, log)
                print(f"operator peak RSS {peak:.0f} MB, {requests} API requests")
            else:
                result = scale(api, ns, runs, args.duration)
                requests, peak = stop_operator(proc, log)
                result.update(peak_mb=peak or 0, requests_per_run=(requests or 0) / runs)
                results[mode] = result
                print(f"[{mode}] {runs} runs on {args.nodes} x 8 GPUs: submitted in {result['submit_s']:.1f} s, "
                      f"drained in {result['wall_s']:.1f} s, {result['admissions_per_s']:.1f} admissions/s, "
                      f"operator peak {result['peak_mb']:.0f} MB (target < 250), "
                      f"{result['requests_per_run']:.1f} API requests per run", flush=True)
            client.CoreV1Api(api).delete_namespace(ns)
        if len(results) == 2:
            b, k = results["builtin"], results["kueue"]
            print(f"builtin vs Kueue: drain {b['wall_s']:.1f} s vs {k['wall_s']:.1f} s "
                  f"(ratio {k['wall_s'] / b['wall_s']:.2f}), admissions/s {b['admissions_per_s']:.1f} vs "
                  f"{k['admissions_per_s']:.1f}")
        print(json.dumps(results))
    finally:
        from llamaops_dev.devcluster import DevCluster

        DevCluster(work / "home").down()


if __name__ == "__main__":
    main()
