"""LlamaServe on a real API server with the operator running: vLLM Deployments from adapters, rollouts that
keep every replica serving, refusals, edits, clean-up. kwok makes the serving pods Running and Ready."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_cases import example
from operator_fixtures import (
    Cluster,
    OperatorProcess,
    claim_volumes,
    cluster_for_test,
    crd_namespace,
    running_operator,
    wait_until,
)

pytestmark = pytest.mark.cluster
BASE = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = "You are a concise assistant for Kubernetes questions."


class Serving(Cluster):
    def serve(self, name: str, **spec: Any) -> dict[str, Any]:
        doc = example("llama-3.1-8b-serve.yaml")
        doc["metadata"] = {"name": name, "labels": {"app.kubernetes.io/instance": "team-serving"}}
        doc["spec"].pop("hfTokenSecretRef", None)
        doc["spec"].update(spec)
        self.apply(doc)
        return doc

    def serve_status(self, name: str) -> dict[str, Any]:
        return (self.get("lsv", name) or {}).get("status") or {}

    def wait_serve(self, name: str, phase: str, timeout: float = 60, check=lambda s: True) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            s = self.serve_status(name)
            return s if s.get("phase") == phase and check(s) else None
        return wait_until(ok, f"LlamaServe {name} to be {phase} (status: {self.serve_status(name)})", timeout)

    def deployment(self, name: str) -> dict[str, Any] | None:
        return self.get("deployment", name)

    def args(self, name: str) -> list[str]:
        return (self.deployment(name) or {}).get("spec", {}).get("template", {}).get("spec", {}) \
            .get("containers", [{}])[0].get("args", [])

    def ready_pods(self, name: str) -> list[str]:
        pods = (self.get("pods", selector=f"llamaops.io/serve={name}") or {}).get("items", [])
        return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])]

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.serve_status(name).get("conditions") or [] if c["type"] == type_), {})


class ReadyWatch:
    """Counts the Ready pods of a LlamaServe in the background, remembering the fewest it ever saw."""

    def __init__(self, c: Serving, name: str) -> None:
        self.c, self.name = c, name
        self.fewest: int | None = None
        self.seen: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready = self.c.ready_pods(self.name)
            self.seen.update(ready)
            self.samples += 1
            self.fewest = len(ready) if self.fewest is None else min(self.fewest, len(ready))
            time.sleep(0.05)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def serve_ns(kubectl) -> Iterator[str]:
    with crd_namespace(kubectl, "serve") as name:
        yield name


@pytest.fixture(scope="module")
def operator(serve_ns: str, kubeconfig: Path, tmp_path_factory) -> Iterator[OperatorProcess]:
    with running_operator(kubeconfig, tmp_path_factory.mktemp("operator"), serve_ns) as proc:
        yield proc


@pytest.fixture(scope="module")
def volumes(serve_ns: str, kubectl, tmp_path_factory) -> Path:
    return claim_volumes(kubectl, serve_ns, tmp_path_factory)


@pytest.fixture
def c(operator: OperatorProcess, serve_ns: str, kubectl, volumes: Path, request) -> Iterator[Serving]:
    with cluster_for_test(operator, Serving(kubectl, serve_ns, volumes), request, "lsv,lft", "deployments",
                          timeout=90) as cluster:
        yield cluster

def test_serve_with_a_direct_adapter_goes_ready(c: Serving) -> None:
    c.serve("direct", replicas=2, adapters=[{"name": "helper", "uri": "hf://acme/llama31-helper", "r": 24}])
    status = c.wait_serve("direct", "Ready", check=lambda s: s.get("readyReplicas") == 2)
    assert status["replicas"] == 2 and status["observedGeneration"] == 1
    assert status["endpoint"] == f"http://direct.{c.ns}.svc:8000/v1"
    assert status["adapterNames"] == "helper"
    assert status["adapters"] == [{"name": "helper", "uri": "hf://acme/llama31-helper", "source": "uri", "r": 24}]
    conditions = {x["type"]: x["status"] for x in status["conditions"]}
    assert conditions.items() >= {"Valid": "True", "AdaptersReady": "True", "Available": "True",
                                  "Progressing": "False"}.items()
    dep = c.deployment("direct")
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("LlamaServe", "direct", c.get("lsv", "direct")["metadata"]["uid"])
    args = c.args("direct")
    modules = json.loads(args[args.index("--lora-modules") + 1])
    assert modules == {"name": "helper", "path": "acme/llama31-helper", "base_model_name": BASE}
    assert args[args.index("--max-lora-rank") + 1] == "32"
    svc = c.get("service", "direct")
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["selector"]["llamaops.io/serve"] == "direct"
    # GitOps tracking labels of the parent never reach the children; the user's object gets no annotations.
    assert "app.kubernetes.io/instance" not in dep["metadata"]["labels"]
    assert not (c.get("lsv", "direct")["metadata"].get("annotations") or {}).keys() - {
        "kubectl.kubernetes.io/last-applied-configuration"}
    assert any(e["reason"] == "Deploying" for e in c.events("direct"))
    assert len(c.ready_pods("direct")) == 2


def test_waits_for_its_run_then_rolls_out_and_retraining_rolls_out_without_lost_capacity(c: Serving) -> None:
    c.run("lora", systemPrompt=PROMPT)
    c.serve("chat", replicas=2, adapters=[{"name": "k8s-assistant", "fineTuneRef": "lora"}])
    status = c.wait_serve("chat", "WaitingForAdapters")
    waiting = c.condition("chat", "AdaptersReady")
    assert waiting["status"] == "False" and "k8s-assistant (LlamaFineTune lora:" in waiting["message"]
    assert c.deployment("chat") is None
    assert status["endpoint"] == f"http://chat.{c.ns}.svc:8000/v1"

    # The run finishes: its adapter is served, with the chat template of its system prompt.
    c.wait_phase("lora", "Running")
    c.finish_pods("lora")
    run = c.wait_phase("lora", "Succeeded")
    status = c.wait_serve("chat", "Ready", check=lambda s: s.get("readyReplicas") == 2)
    uri = run["adapter"]["uri"]
    assert status["adapters"][0]["uri"] == uri and status["adapters"][0]["source"] == "LlamaFineTune/lora"
    args = c.args("chat")
    assert json.loads(args[args.index("--lora-modules") + 1])["path"] == "/var/lib/llamaops/adapters/k8s-assistant"
    assert args[args.index("--max-lora-rank") + 1] == "32"
    assert args[args.index("--chat-template") + 1] == "/etc/llamaops/chat/template.jinja"
    assert PROMPT in c.get("configmap", "chat-chat-template")["data"]["template.jinja"]
    mount = next(m for m in c.deployment("chat")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                 if m["mountPath"] == "/var/lib/llamaops/adapters/k8s-assistant")
    assert mount["readOnly"] is True and uri.endswith(mount["subPath"])
    first_pods = set(c.ready_pods("chat"))
    first_hash = c.deployment("chat")["spec"]["template"]["metadata"]["annotations"]["llamaops.io/config-hash"]

    # Re-training (a spec edit restarts the run): the old adapter keeps serving meanwhile...
    c.kubectl("patch", "-n", c.ns, "lft", "lora", "--type=merge", "-p",
              json.dumps({"spec": {"training": {"learning_rate": 1e-4}}}))
    c.wait_phase("lora", "Running")
    assert c.serve_status("chat")["phase"] == "Ready" and set(c.ready_pods("chat")) == first_pods
    # ... and the new one rolls out with never fewer than 2 Ready replicas.
    time.sleep(1.1)  # a new completion time (seconds) even on a fast machine
    with ReadyWatch(c, "chat") as watch:
        c.finish_pods("lora")
        c.wait_phase("lora", "Succeeded")

        def rolled() -> bool:
            dep = c.deployment("chat")
            ann = dep["spec"]["template"]["metadata"]["annotations"]["llamaops.io/config-hash"]
            st = dep.get("status") or {}
            return ann != first_hash and st.get("updatedReplicas") == 2 and st.get("replicas") == 2 and \
                st.get("availableReplicas") == 2 and not first_pods & set(c.ready_pods("chat"))
        wait_until(rolled, "the Deployment to roll out the re-trained adapter", timeout=60)
    assert watch.samples > 5 and watch.fewest is not None and watch.fewest >= 2, vars(watch)
    assert len(watch.seen - first_pods) >= 2  # new pods came up
    c.wait_serve("chat", "Ready", check=lambda s: s.get("readyReplicas") == 2)
    assert any(e["reason"] == "RollingOut" for e in c.events("chat"))


def test_spec_edits_reach_the_deployment(c: Serving) -> None:
    c.serve("edit", adapters=[{"name": "one", "uri": "hf://acme/one", "r": 8}])
    c.wait_serve("edit", "Ready", check=lambda s: s.get("readyReplicas") == 1)
    # replicas
    c.kubectl("patch", "-n", c.ns, "lsv", "edit", "--type=merge", "-p", '{"spec": {"replicas": 2}}')
    wait_until(lambda: c.deployment("edit")["spec"]["replicas"] == 2, "replicas 2 in the Deployment")
    c.wait_serve("edit", "Ready", check=lambda s: s.get("readyReplicas") == 2)
    # an extra argument
    c.kubectl("patch", "-n", c.ns, "lsv", "edit", "--type=merge", "-p",
              json.dumps({"spec": {"vllm": {"extra_args": ["--enable-chunked-prefill"]}}}))
    wait_until(lambda: c.args("edit")[-1] == "--enable-chunked-prefill", "the extra argument in the Deployment")
    # the adapter list: one more, and a rank that needs a larger --max-lora-rank
    c.kubectl("patch", "-n", c.ns, "lsv", "edit", "--type=merge", "-p", json.dumps({"spec": {"adapters": [
        {"name": "one", "uri": "hf://acme/one", "r": 8}, {"name": "two", "uri": "hf://acme/two", "r": 64}]}}))

    def both() -> bool:
        args = c.args("edit")
        return "--max-loras" in args and args[args.index("--max-loras") + 1] == "2" and \
            args[args.index("--max-lora-rank") + 1] == "64"
    wait_until(both, "two adapters in the Deployment")
    status = c.wait_serve("edit", "Ready", check=lambda s: s.get("adapterNames") == "one,two"
                          and s.get("readyReplicas") == 2 and s.get("observedGeneration") == 4)
    assert [a["name"] for a in status["adapters"]] == ["one", "two"]
    # ... and back to none: LoRA off.
    c.kubectl("patch", "-n", c.ns, "lsv", "edit", "--type=json", "-p", '[{"op": "remove", "path": "/spec/adapters"}]')
    wait_until(lambda: "--enable-lora" not in c.args("edit"), "LoRA off in the Deployment")
    c.wait_serve("edit", "Ready", check=lambda s: not s.get("adapterNames"))
    # A PodDisruptionBudget comes and goes with the spec.
    c.kubectl("patch", "-n", c.ns, "lsv", "edit", "--type=merge", "-p",
              '{"spec": {"podDisruptionBudget": {"maxUnavailable": 1}}}')
    wait_until(lambda: c.get("pdb", "edit"), "the PodDisruptionBudget")
    c.kubectl("patch", "-n", c.ns, "lsv", "edit", "--type=json", "-p",
              '[{"op": "remove", "path": "/spec/podDisruptionBudget"}]')
    wait_until(lambda: c.get("pdb", "edit") is None, "the PodDisruptionBudget to go")


def test_adapter_of_another_base_model_is_refused(c: Serving) -> None:
    c.run("small", model={"base_model": "meta-llama/Llama-3.2-3B-Instruct"})
    c.serve("mixed", adapters=[{"name": "small", "fineTuneRef": "small"}])
    c.wait_serve("mixed", "Failed")
    failed = c.condition("mixed", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert 'adapter "small" was trained on "meta-llama/Llama-3.2-3B-Instruct", not on the served ' \
           f'"{BASE}"' in failed["message"]
    assert c.condition("mixed", "Valid")["status"] == "False"
    assert c.deployment("mixed") is None
    wait_until(lambda: any(e["reason"] == "InvalidSpec" and "small" in e["message"] for e in c.events("mixed")),
               "an InvalidSpec event naming the adapter")
    # A uri adapter that says what it was trained on is checked too.
    c.serve("mixed-uri", adapters=[{"name": "other", "uri": "hf://acme/other",
                                    "baseModel": "meta-llama/Llama-3.2-3B-Instruct"}])
    c.wait_serve("mixed-uri", "Failed")
    assert "spec.adapters[0].baseModel" in c.condition("mixed-uri", "Failed")["message"]


def test_context_beyond_the_model_is_refused(c: Serving) -> None:
    c.serve("too-long", vllm={"max_model_len": 200000}, adapters=[])
    c.wait_serve("too-long", "Failed")
    valid = c.condition("too-long", "Valid")
    assert valid["status"] == "False"
    assert "spec.vllm.max_model_len: 200000 exceeds the 131072-token context of Llama 3.1 8B" in valid["message"]
    assert c.deployment("too-long") is None
    wait_until(lambda: any(e["reason"] == "InvalidSpec" for e in c.events("too-long")), "an InvalidSpec event")
    # Fixing the spec deploys it.
    c.kubectl("patch", "-n", c.ns, "lsv", "too-long", "--type=merge", "-p",
              '{"spec": {"vllm": {"max_model_len": 65536}}}')
    c.wait_serve("too-long", "Ready", check=lambda s: s.get("readyReplicas") == 1)
    assert c.condition("too-long", "Failed")["status"] == "False"


def test_deleting_removes_every_child(c: Serving) -> None:
    c.serve("bye", systemPrompt="Be brief.", podDisruptionBudget={"minAvailable": 0},
            adapters=[{"name": "a", "uri": "hf://acme/a"}])
    c.wait_serve("bye", "Ready", check=lambda s: s.get("readyReplicas") == 1)
    children = [("deployment", "bye"), ("service", "bye"), ("configmap", "bye-chat-template"), ("pdb", "bye")]
    for kind, name in children:
        assert c.get(kind, name) is not None, (kind, name)
    c.kubectl("delete", "-n", c.ns, "lsv", "bye", "--wait=true", "--timeout=60s")
    wait_until(lambda: all(c.get(kind, name) is None for kind, name in children), "the children to be collected",
               timeout=90)
    wait_until(lambda: not c.ready_pods("bye"), "the serving pods to go", timeout=60)


def test_ollama_runtime_serves_the_adapter_through_a_modelfile(c: Serving) -> None:
    c.serve("olla", runtime="ollama", model={"base_model": "llama3.1:8b"}, systemPrompt=PROMPT, vllm={},
            adapters=[{"name": "k8s-assistant", "uri": "pvc://adapters/ml/run/adapter"}])
    status = c.wait_serve("olla", "Ready", check=lambda s: s.get("readyReplicas") == 1)
    assert status["endpoint"] == f"http://olla.{c.ns}.svc:11434/v1"
    ctr = c.deployment("olla")["spec"]["template"]["spec"]["containers"][0]
    assert ctr["image"].startswith("ollama/ollama:") and 'ollama create "$model"' in ctr["command"][2]
    models = ctr["command"][ctr["command"].index("--") + 1:]
    assert models[:2] == ["olla", "k8s-assistant"] and models[2].startswith("k8s-assistant:")
    modelfiles = c.get("configmap", "olla-modelfiles")["data"]
    assert modelfiles["model-1"].startswith("FROM llama3.1:8b\nADAPTER ../../../var/lib/llamaops/ollama/adapters/"
                                            "k8s-assistant\nTEMPLATE ")
    assert f'SYSTEM """{PROMPT}"""\n' in modelfiles["model-1"] and modelfiles["model-2"] == modelfiles["model-1"]
