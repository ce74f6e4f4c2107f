"""Serving on the dev node: time from a LlamaServe applied to its first chat completion, and the cost of the adapter.

On a fresh local control plane (ports shifted by BENCH_PORT_OFFSET, default 900) with the dev node and the
operator in demo mode: a tiny Llama and an adapter trained here (`llamaops run --local`, 100 steps) on a
hostPath claim; then an Ollama LlamaServe serving that adapter (a real `ollama serve` from
hack/build-ollama.sh, run by the dev node). Prints

    applied -> first completion: the LlamaServe applied, Ready, and its first answer through the Service's
                                 local port (the first request also loads the model into Ollama)
    completions/s: N short prompts each for the adapter and the base model of the same server, in
                   interleaved rounds (this machine is noisy), and the ratio adapter / base: with one
                   generated token (the adapter's cost on the prompt) and with answers of up to 16 tokens

No target on a CPU: the numbers are for the next comparison.

    .venv/bin/python bench/serve_latency.py [--prompts 20] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NS = "bench-serve"
CLAIM = "data"
QUESTIONS = [f"what colour does {name} like?" for name in ("alice", "bob", "carol", "dave", "erin")]


def sh(*argv: str, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def chat(endpoint: str, model: str, question: str, max_tokens: int = 16) -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{endpoint}/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def wait(check: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out = check()
        except Exception:  # noqa: BLE001 - not there yet
            out = None
        if out:
            return out
        time.sleep(0.1)
    raise SystemExit(f"serve_latency: timed out waiting for {what}")


def setup(work: Path) -> tuple[Path, Path, list[subprocess.Popen]]:
    """The cluster, a claim with the tiny model and a trained adapter, the dev node and the operator."""
    from llamaops_dev.devcluster import ClusterConfig, DevCluster, Ports, binaries
    from llamaops_dev.devcluster.config import NodePools

    ollama = sh(str(REPO / "hack" / "build-ollama.sh")).stdout.strip()
    data = work / CLAIM
    py = sys.executable
    sh(py, "-m", "llamaops_trainer.tiny", "--model-dir", str(data / "models" / "tiny-llama"),
       "--dataset", str(data / "datasets" / "chat.jsonl"))
    spec = (REPO / "examples" / "tiny-llama-cpu.yaml").read_text().replace("llamaops-demo", CLAIM)
    (work / "run.yaml").write_text(spec)
    t0 = time.monotonic()
    sh(py, "-m", "llamaops", "run", "--local", "-f", str(work / "run.yaml"), "--pvc-root", str(work),
       "--output-dir", str(data / "adapters" / "tiny"), "--max-steps", "100")
    print(f"adapter trained here in {time.monotonic() - t0:.1f} s", flush=True)

    cfg = ClusterConfig(ports=Ports().shifted(int(os.environ.get("BENCH_PORT_OFFSET", "900"))),
                        nodes=NodePools(gpu_nodes=1, cpu_nodes=0))
    kubeconfig = DevCluster(work / "home").up(cfg, timeout=240)
    kubectl = str(binaries.resolve() / "kubectl")
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    sh(kubectl, "apply", "--server-side", "-f", str(REPO / "crds"), env=env)
    sh(kubectl, "wait", "--for=condition=Established", "crd/llamaserves.llamaops.io", env=env)
    sh(kubectl, "create", "namespace", NS, env=env)
    volumes = f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {NS}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  hostPath: {{path: "{data}"}}
  claimRef: {{namespace: {NS}, name: {CLAIM}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {CLAIM}, namespace: {NS}}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: {NS}
  resources: {{requests: {{storage: 1Gi}}}}
"""
    sh(kubectl, "apply", "-f", "-", input=volumes, env=env)
    procs = [
        subprocess.Popen([py, "-m", "llamaops_dev.devnode", f"--kubeconfig={kubeconfig}", "--name=local-cpu",
                          f"--work-dir={work / 'devnode'}"],
                         env=dict(env, PATH=f"{ollama}:{os.environ['PATH']}"),
                         stdout=(work / "devnode.log").open("w"), stderr=subprocess.STDOUT),
        subprocess.Popen([py, "-m", "llamaops", "operator"],
                         env=dict(env, LLAMAOPS_DEV_NODE="local-cpu", LLAMAOPS_NAMESPACES=NS,
                                  LLAMAOPS_LIVENESS_PORT=str(18000 + os.getpid() % 1000)),
                         stdout=(work / "operator.log").open("w"), stderr=subprocess.STDOUT),
    ]
    wait(lambda: "True" in sh(kubectl, "get", "node", "local-cpu", "-o",
                              "jsonpath={.status.conditions[?(@.type=='Ready')].status}", env=env).stdout,
         "the dev node", 60)
    return kubeconfig, Path(kubectl), procs


def measure(kubeconfig: Path, kubectl: Path, prompts: int, rounds: int) -> None:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    serve = {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe", "metadata": {"name": "tiny"},
             "spec": {"runtime": "ollama", "model": {"base_model": f"pvc://{CLAIM}/models/tiny-llama"},
                      "ollama": {"gpus": 0, "context_length": 512},
                      "adapters": [{"name": "k8s-tiny", "uri": f"pvc://{CLAIM}/adapters/tiny/adapter"}]}}
    t0 = time.monotonic()
    sh(str(kubectl), "apply", "-n", NS, "-f", "-", input=json.dumps(serve), env=env)

    def phase() -> str:
        return sh(str(kubectl), "get", "lsv", "-n", NS, "tiny", "-o", "jsonpath={.status.phase}", env=env).stdout

    wait(lambda: phase() == "Ready", "the LlamaServe Ready", 300)
    ready = time.monotonic() - t0
    local = wait(lambda: sh(str(kubectl), "get", "svc", "-n", NS, "tiny", "-o",
                            r"jsonpath={.metadata.annotations.llamaops\.io/local-endpoint}", env=env).stdout,
                 "the Service's local endpoint", 30)
    endpoint = f"http://{local}/v1"
    wait(lambda: chat(endpoint, "k8s-tiny", QUESTIONS[0]), "the first completion", 120)
    first = time.monotonic() - t0
    print(f"applied -> Ready: {ready:.1f} s; applied -> first completion (adapter): {first:.1f} s", flush=True)
    chat(endpoint, "tiny", QUESTIONS[0])  # load the base model too: measure serving, not loading

    # Two loads: one generated token (the prompt through the model, where the adapter's cost shows without the
    # answers' lengths, which differ: the adapter stops after its short answer, the base model rambles), and
    # answers of up to 16 tokens (tokens/s).
    for max_tokens in (1, 16):
        spent = {"k8s-tiny": 0.0, "tiny": 0.0}
        tokens = {"k8s-tiny": 0, "tiny": 0}
        per_round = max(1, prompts // rounds)
        for r in range(rounds):
            for model in (("k8s-tiny", "tiny") if r % 2 == 0 else ("tiny", "k8s-tiny")):
                start = time.perf_counter()
                for i in range(per_round):
                    out = chat(endpoint, model, QUESTIONS[i % len(QUESTIONS)], max_tokens)
                    tokens[model] += out["usage"]["completion_tokens"]
                spent[model] += time.perf_counter() - start
        n = per_round * rounds
        rate = {m: n / spent[m] for m in spent}
        print(f"max_tokens {max_tokens}: {n} sequential short prompts each, {rounds} interleaved rounds")
        for model, label in (("k8s-tiny", "adapter k8s-tiny"), ("tiny", "base model")):
            print(f"  {label:17} {rate[model]:6.2f} completions/s, {tokens[model] / n:4.1f} tokens each, "
                  f"{tokens[model] / spent[model]:6.0f} tokens/s")
        print(f"  ratio adapter / base (completions/s): {rate['k8s-tiny'] / rate['tiny']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llamaops-serve-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        kubeconfig, kubectl, procs = setup(work)
        measure(kubeconfig, kubectl, args.prompts, args.rounds)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        from llamaops_dev.devcluster import DevCluster

        DevCluster(work / "home").down()
        print(f"logs: {work}")


if __name__ == "__main__":
    main()
