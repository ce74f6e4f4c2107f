"""The two seams: a serving runtime and a queue policy, each added from this file alone (one class and one
`register` call), give a Deployment and an admission decision without any other module knowing them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from api_cases import example
from llamaops import queue
from llamaops.api import LlamaServe
from llamaops.api.catalog import CatalogModel
from llamaops.api.validation import AdapterFacts, Problem, RuntimeReport
from llamaops.builders import serve as b
from llamaops.builders.serve import runtime as runtimes
from llamaops.handlers.admission import Admitter
from llamaops.handlers.runtime import Runtime
from llamaops.queue import policy as policies
from llamaops.queue.capacity import NodeCapacity
from llamaops.settings import Settings
from llamaops.state.finetune import RunSnapshot
from llamaops.tools import crdgen
from recording_kube import RecordingKube

# ---------------------------------------------------------------- a serving runtime


class EchoRuntime:
    """A made-up server: `echo-server --model M --adapter NAME=PATH`, reading one file of its own."""

    name = "echo"
    section = None
    config_suffix = "echo-config"
    config_dir = "/etc/echo"
    cache_dir = "/var/cache/echo"

    def image(self, settings: Settings) -> str:
        return "registry.example/echo:1"

    def port(self, lsv: LlamaServe) -> int:
        return 7070

    def gpus(self, lsv: LlamaServe) -> int:
        return 2

    def section_set(self, lsv: LlamaServe) -> bool:
        return False

    def validate(self, lsv: LlamaServe, model: CatalogModel | None,
                 adapters: Mapping[str, AdapterFacts]) -> RuntimeReport:
        big = [Problem("spec.adapters", f"echo serves ranks up to 64, not {a.r}") for a in adapters.values()
               if a.r and a.r > 64]
        return RuntimeReport(big)

    def server(self, lsv: LlamaServe, ctx: b.ServeContext) -> b.Server:
        args = ["--model", ctx.model_path, *(f"--adapter={a.name}={ctx.adapter_paths[a.name]}" for a in ctx.adapters)]
        return b.Server(command=["echo-server"], args=args, startup={"tcpSocket": {"port": "http"}},
                        health={"path": "/ping", "port": "http"}, files={"echo.conf": "verbose = true\n"},
                        env=[{"name": "ECHO_MODE", "value": "lora"}])


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> EchoRuntime:
    monkeypatch.setattr(runtimes, "_REGISTRY", dict(runtimes._REGISTRY))  # registered for this test only
    rt = EchoRuntime()
    b.register(rt)
    return rt


def test_a_runtime_registered_here_builds_its_deployment(echo: EchoRuntime) -> None:
    doc = example("llama-3.1-8b-serve.yaml")
    doc["metadata"].update(namespace="ml", uid="uid-1")
    doc["spec"].update(runtime="echo", vllm={})
    adapter = b.ResolvedAdapter("k8s-assistant", "pvc://adapters/ml/run/adapter", "uri", r=32)
    lsv = LlamaServe.model_validate(doc)
    w = b.workload(lsv, [adapter], Settings())
    pod = w.deployment["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["image"] == "registry.example/echo:1"
    assert ctr["command"] == ["echo-server"]
    assert ctr["args"] == ["--model", "meta-llama/Llama-3.1-8B-Instruct",
                           "--adapter=k8s-assistant=/var/lib/llamaops/adapters/k8s-assistant"]
    assert ctr["ports"] == [{"name": "http", "containerPort": 7070, "protocol": "TCP"}]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert ctr["startupProbe"]["tcpSocket"] == {"port": "http"} and ctr["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert {"name": "ECHO_MODE", "value": "lora"} in ctr["env"]
    assert {"name": "model-cache", "mountPath": "/var/cache/echo"} in ctr["volumeMounts"]
    assert {"name": "echo-config", "mountPath": "/etc/echo", "readOnly": True} in ctr["volumeMounts"]
    # What every runtime gets: the adapter mounted from its claim, the Service on the runtime's port.
    assert {"name": "pvc-0", "mountPath": "/var/lib/llamaops/adapters/k8s-assistant", "readOnly": True,
            "subPath": "ml/run/adapter"} in ctr["volumeMounts"]
    assert w.service["spec"]["ports"][0]["port"] == 7070
    assert [cm["metadata"]["name"] for cm in w.config_maps] == ["llama31-8b-echo-config"]
    assert b.endpoint(lsv) == "http://llama31-8b.ml.svc:7070/v1"
    assert "llama31-8b-echo-config" in b.config_map_names(lsv)


def test_a_runtime_registered_here_is_validated_and_listed_in_the_crd(echo: EchoRuntime) -> None:
    doc = example("llama-3.1-8b-serve.yaml")
    doc["spec"].update(runtime="echo", vllm={}, adapters=[{"name": "big", "uri": "pvc://a/b", "r": 128}])
    assert [str(p) for p in b.validate_serve(doc).errors] == ["spec.adapters: echo serves ranks up to 64, not 128"]
    # The vLLM section is another runtime's: refused while echo serves.
    doc["spec"]["vllm"] = {"max_model_len": 4096}
    assert "spec.vllm" in [p.field for p in b.validate_serve(doc).errors]
    crd = crdgen.render()["llamaops.io_llamaserves.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["runtime"]["enum"] == ["echo", "ollama", "vllm"]


def test_an_unknown_runtime_names_the_field_and_the_choices() -> None:
    doc = example("llama-3.1-8b-serve.yaml")
    doc["spec"]["runtime"] = "tgi"
    (problem,) = b.validate_serve(doc).errors
    assert str(problem) == "spec.runtime: unsupported runtime 'tgi': use one of ollama, vllm"


# ---------------------------------------------------------------- a queue policy


class NewestFirst:
    """A made-up policy: the newest run goes first, onto the node with the most free GPUs."""

    name = "newest-first"
    external = False

    def __init__(self, config: policies.PolicyConfig) -> None:
        self.config = config

    def submission(self, run: queue.QueuedRun) -> queue.Placement | None:
        return None

    def admit(self, waiting: Sequence[queue.QueuedRun], capacity: Sequence[NodeCapacity]) -> queue.Decision:
        decision = queue.Decision()
        order = sorted(waiting, key=lambda r: -r.created)
        roomiest = max(capacity, key=lambda n: n.free)
        for position, run in enumerate(order, start=1):
            if position == 1 and roomiest.free >= run.gpus_per_node:
                decision.admitted[run.key] = [roomiest.name]
            else:
                decision.positions[run.key] = position - 1
                decision.reasons[run.key] = "a newer run goes first"
        return decision


def finetune(name: str, created: str) -> dict[str, Any]:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"].update(name=name, namespace="ml", uid=f"uid-{name}", generation=1, creationTimestamp=created)
    doc["status"] = {"phase": "Queued"}
    return doc


def test_a_policy_registered_here_decides_what_the_admission_pass_creates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policies, "_REGISTRY", dict(policies._REGISTRY))  # registered for this test only
    queue.register(NewestFirst.name, NewestFirst)
    settings = Settings(queue_mode=NewestFirst.name)
    runs = {"ml/old": finetune("old", "2026-01-01T00:00:00Z"), "ml/new": finetune("new", "2026-01-02T00:00:00Z")}
    kube = RecordingKube(runs)
    rt = Runtime.start(settings, kube)  # type: ignore[arg-type]
    assert isinstance(rt.policy, NewestFirst)
    nodes = {"gpu-a": [{"metadata": {"name": "gpu-a", "labels": {}}, "spec": {},
                        "status": {"allocatable": {"nvidia.com/gpu": "8"},
                                   "conditions": [{"type": "Ready", "status": "True"}]}}],
             "gpu-b": [{"metadata": {"name": "gpu-b", "labels": {}}, "spec": {},
                        "status": {"allocatable": {"nvidia.com/gpu": "2"},
                                   "conditions": [{"type": "Ready", "status": "True"}]}}]}
    index = {("ml", key.split("/")[1]): [RunSnapshot.of(body)] for key, body in runs.items()}
    asyncio.run(Admitter(rt, index, nodes, {}).run_pass())

    (job,) = [m for m in kube.created if m["kind"] == "Job"]
    assert job["metadata"]["name"] == "new-train"
    affinity = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    assert affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchFields"][0]["values"] == ["gpu-a"]
    admitted = dict(kube.patches)["ml/new"]
    assert admitted["phase"] == "Admitted" and admitted["assignedNodes"] == ["gpu-a"]
    waiting = dict(kube.patches)["ml/old"]
    assert waiting["queuePosition"] == 1 and "a newer run goes first" in waiting["conditions"][0]["message"]
    assert ("new", "Admitted") in kube.events


def test_an_unknown_queue_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="LLAMAOPS_QUEUE_MODE must be one of builtin, kueue, not 'fifo'"):
        Settings.from_env({"LLAMAOPS_QUEUE_MODE": "fifo"})
