"""The LlamaServe's children, built by value: the vLLM Deployment for the seed's `vllm serve`, LoRA flags,
the chat template that serves the training system prompt, and the phase read from a Deployment."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from api_cases import example
from llamaops.api import LlamaServe
from llamaops.api.chat_template import LLAMA3_TEMPLATE, LLAMA31_TEMPLATE, OLLAMA_LLAMA31_TEMPLATE, served_template
from llamaops.api.finetune import LlamaFineTune
from llamaops.builders import serve as b
from llamaops.builders.serve import validate_serve
from llamaops.builders.serve.ollama import OLLAMA_READY, adapter_version
from llamaops.builders.serve.vllm import chat_template, round_lora_rank
from llamaops.settings import Settings
from llamaops.state.serve import resolve, rollout_phase

BASE = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = "You are a concise assistant for Kubernetes questions."
SETTINGS = Settings()


def serve(**spec: Any) -> LlamaServe:
    doc = example("llama-3.1-8b-serve.yaml")
    doc["metadata"].update(namespace="ml", uid="uid-1")
    doc["spec"].update(spec)
    return LlamaServe.model_validate(doc)


def run_adapter(name: str = "k8s-assistant", r: int = 32, prompt: str | None = PROMPT, **kw: Any) -> b.ResolvedAdapter:
    return b.ResolvedAdapter(name, f"pvc://adapters/ml/{name}/adapter", f"LlamaFineTune/{name}", BASE, r, prompt,
                             kw.pop("revision", "2025-01-01T00:00:00Z"), **kw)


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_seed_example_deployment_in_full() -> None:
    """examples/llama-3.1-8b-serve.yaml with its run's adapter (r=32, trained with a system prompt)."""
    w = b.workload(serve(), [run_adapter()], SETTINGS)
    dep = w.deployment
    ctr = container(dep)
    assert ctr["image"] == "vllm/vllm-openai:v0.33.0"
    assert ctr["command"] == ["vllm", "serve"]
    assert ctr["args"] == [
        BASE, "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "1", "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.9", "--dtype", "auto", "--served-model-name", BASE,
        "--enable-lora", "--lora-modules",
        '{"name":"k8s-assistant","path":"/var/lib/llamaops/adapters/k8s-assistant",'
        '"base_model_name":"meta-llama/Llama-3.1-8B-Instruct"}',
        "--max-loras", "1", "--max-lora-rank", "32",
        "--chat-template", "/etc/llamaops/chat/template.jinja",
    ]
    assert ctr["env"] == [
        {"name": "HF_HOME", "value": "/var/cache/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}},
    ]
    assert ctr["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert ctr["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    health = {"path": "/health", "port": "http"}
    # 1800 s of startup budget by default (70B weights), in 10 s periods; liveness only after it.
    assert ctr["startupProbe"] == {"httpGet": health, "periodSeconds": 10, "timeoutSeconds": 5,
                                   "failureThreshold": 180}
    assert ctr["readinessProbe"] == {"httpGet": health, "periodSeconds": 5, "timeoutSeconds": 5,
                                     "failureThreshold": 3}
    assert ctr["livenessProbe"]["httpGet"] == health
    assert ctr["volumeMounts"] == [
        {"name": "model-cache", "mountPath": "/var/cache/huggingface"},
        {"name": "pvc-0", "mountPath": "/var/lib/llamaops/adapters/k8s-assistant", "readOnly": True,
         "subPath": "ml/k8s-assistant/adapter"},
        {"name": "chat-template", "mountPath": "/etc/llamaops/chat", "readOnly": True},
    ]
    pod = dep["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "model-cache", "emptyDir": {}},
        {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}},
        {"name": "chat-template", "configMap": {"name": "llama31-8b-chat-template"}},
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert ctr["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert dep["spec"]["progressDeadlineSeconds"] > 1800
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics" and ann["llamaops.io/adapters"] == "k8s-assistant"
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("LlamaServe", "llama31-8b", "uid-1", True)
    assert dep["spec"]["selector"]["matchLabels"] == {"llamaops.io/serve": "llama31-8b",
                                                      "app.kubernetes.io/component": "server"}
    # The Service, the chat template, and nothing optional unless asked for.
    assert w.service["spec"]["type"] == "ClusterIP"
    assert w.service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert w.service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [cm["metadata"]["name"] for cm in w.config_maps] == ["llama31-8b-chat-template"]
    assert w.config_maps[0]["data"]["template.jinja"] == served_template(BASE, PROMPT)
    assert w.pdb is None and w.hpa is None
    assert b.endpoint(serve()) == "http://llama31-8b.ml.svc:8000/v1"
    assert [m["kind"] for m in w.in_apply_order()] == ["ConfigMap", "NetworkPolicy", "Service", "Deployment"]
    # Into the replicas only the server's port; and no API token in them (they need no API access).
    assert w.network_policy["spec"] == {"podSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]},
                                        "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 8000,
                                                                                             "protocol": "TCP"}]}]}
    assert pod["automountServiceAccountToken"] is False
    assert b.workload(serve(), [run_adapter()], Settings(network_policies=False)).network_policy is None


@pytest.mark.parametrize(("r", "rank"), [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (32, 32), (33, 64),
                                         (200, 256), (300, 320), (321, 512), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_value_vllm_accepts(r: int, rank: int) -> None:
    assert round_lora_rank(r) == rank
    args = container(b.deployment(serve(), [run_adapter(r=r)], SETTINGS))["args"]
    assert args[args.index("--max-lora-rank") + 1] == str(rank)


def test_rank_above_vllm_limit_is_refused() -> None:
    with pytest.raises(b.ServeError, match="above the largest"):
        round_lora_rank(1024)


def test_lora_modules_json_for_every_source_and_max_loras() -> None:
    adapters = [run_adapter("a", r=8, prompt=None), run_adapter("b", r=64, prompt=None),
                b.ResolvedAdapter("c", "s3://bucket/adapters/c", "uri", r=16,
                                  s3=b.S3Credentials("http://minio:9000", "eu-west-1", "s3-creds")),
                b.ResolvedAdapter("d", "hf://org/llama-adapter", "uri")]
    dep = b.deployment(serve(vllm={"port": 8080, "served_model_name": "llama"}), adapters, SETTINGS)
    args = container(dep)["args"]
    i = args.index("--lora-modules")
    modules = [json.loads(x) for x in args[i + 1:i + 5]]
    assert modules == [
        {"name": "a", "path": "/var/lib/llamaops/adapters/a", "base_model_name": "llama"},
        {"name": "b", "path": "/var/lib/llamaops/adapters/b", "base_model_name": "llama"},
        {"name": "c", "path": "/var/lib/llamaops/s3-adapters/c", "base_model_name": "llama"},
        {"name": "d", "path": "org/llama-adapter", "base_model_name": "llama"},
    ]
    assert args[i + 5:] == ["--max-loras", "4", "--max-lora-rank", "64"]
    assert "--chat-template" not in args  # no system prompt anywhere: the tokenizer's own template
    # Both PVC adapters come from one claim, mounted once, each at its own subPath.
    pod = dep["spec"]["template"]["spec"]
    assert [v for v in pod["volumes"] if "persistentVolumeClaim" in v] == [
        {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}}]
    # The S3 adapter is fetched before the server starts, into a volume the server reads.
    (init,) = pod["initContainers"]
    assert init["image"] == SETTINGS.adapter_fetch_image
    assert init["command"] == ["aws", "s3", "--endpoint-url", "http://minio:9000", "sync", "--only-show-errors",
                               "s3://bucket/adapters/c/", "/var/lib/llamaops/s3-adapters/c/"]
    assert {e["name"] for e in init["env"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert {"name": "s3-adapters", "emptyDir": {}} in pod["volumes"]
    mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
    assert mounts["/var/lib/llamaops/s3-adapters"]["readOnly"] is True
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8080"


def test_no_adapters_no_lora_flags() -> None:
    args = container(b.deployment(serve(adapters=[]), [], SETTINGS))["args"]
    assert not [a for a in args if "lora" in a]


def test_explicit_vllm_settings_and_extra_args_last() -> None:
    lsv = serve(vllm={"max_num_seqs": 64, "dtype": "bfloat16", "quantization": "fp8", "max_loras": 4,
                      "max_lora_rank": 64, "max_cpu_loras": 2, "enable_prefix_caching": False,
                      "extra_args": ["--enable-chunked-prefill", "--seed", "7"]},
                model={"base_model": BASE, "revision": "main"})
    args = container(b.deployment(lsv, [run_adapter(r=8, prompt=None)], SETTINGS))["args"]
    for flag, value in [("--max-num-seqs", "64"), ("--dtype", "bfloat16"), ("--quantization", "fp8"),
                        ("--max-loras", "4"), ("--max-lora-rank", "64"), ("--max-cpu-loras", "4"),
                        ("--revision", "main")]:
        assert args[args.index(flag) + 1] == value, flag
    assert "--no-enable-prefix-caching" in args
    assert args[-3:] == ["--enable-chunked-prefill", "--seed", "7"]


def test_tensor_parallel_gets_gpus_and_in_memory_shm() -> None:
    lsv = serve(model={"base_model": "meta-llama/Llama-3.3-70B-Instruct"},
                vllm={"tensor_parallel_size": 4, "max_model_len": 8192}, resources={"shmSize": "32Gi"})
    dep = b.deployment(lsv, [], SETTINGS)
    ctr, pod = container(dep), dep["spec"]["template"]["spec"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in ctr["volumeMounts"]
    assert ctr["args"][ctr["args"].index("--tensor-parallel-size") + 1] == "4"
    # One GPU: no shm volume.
    assert not [v for v in b.deployment(serve(), [], SETTINGS)["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "dshm"]


def test_api_key_only_through_the_environment() -> None:
    lsv = serve(apiKeySecretRef={"name": "vllm-key", "key": "token"})
    ctr = container(b.deployment(lsv, [run_adapter()], SETTINGS))
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "token"}}} in ctr["env"]
    assert not [a for a in ctr["args"] + ctr["command"] if "api-key" in a or "vllm-key" in a or "token" in a]


def test_model_cache_claim_and_pvc_base_model() -> None:
    lsv = serve(model={"base_model": "pvc://models/llama-3.1-8b-instruct"}, modelCachePvc="hf-cache", adapters=[])
    dep = b.deployment(lsv, [], Settings(model_cache_pvc="ignored-default"))
    ctr, pod = container(dep), dep["spec"]["template"]["spec"]
    assert ctr["args"][0] == "/var/lib/llamaops/models/models/llama-3.1-8b-instruct"
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
    assert {"name": "pvc-0", "mountPath": "/var/lib/llamaops/models/models", "readOnly": True} in ctr["volumeMounts"]
    # The operator's default claim when the spec names none.
    dep = b.deployment(serve(), [], Settings(model_cache_pvc="shared-cache"))
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-cache"}} in \
        dep["spec"]["template"]["spec"]["volumes"]


def test_pod_template_changes_when_a_run_is_retrained_at_the_same_location() -> None:
    first = b.deployment(serve(), [run_adapter(revision="2025-01-01T00:00:00Z")], SETTINGS)
    again = b.deployment(serve(), [run_adapter(revision="2025-01-01T00:00:00Z")], SETTINGS)
    retrained = b.deployment(serve(), [run_adapter(revision="2025-02-01T00:00:00Z")], SETTINGS)
    assert first == again
    assert container(first)["args"] == container(retrained)["args"]
    assert first["spec"]["template"] != retrained["spec"]["template"]


def test_pdb_and_hpa_and_replicas_left_to_the_autoscaler() -> None:
    lsv = serve(podDisruptionBudget={"maxUnavailable": 1},
                autoscaling={"minReplicas": 2, "maxReplicas": 6,
                             "metric": {"name": "vllm:num_requests_waiting", "averageValue": "5"}})
    w = b.workload(lsv, [run_adapter()], SETTINGS)
    assert "replicas" not in w.deployment["spec"]
    assert w.pdb["spec"]["maxUnavailable"] == 1
    assert w.pdb["spec"]["selector"]["matchLabels"] == w.deployment["spec"]["selector"]["matchLabels"]
    hpa = w.hpa["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama31-8b"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "vllm:num_requests_waiting"},
                                                          "target": {"type": "AverageValue", "averageValue": "5"}}}]
    assert [m["kind"] for m in w.in_apply_order()][-2:] == ["PodDisruptionBudget", "HorizontalPodAutoscaler"]


def test_autoscaling_bounds_checked_by_cel() -> None:
    doc = example("llama-3.1-8b-serve.yaml")
    doc["spec"]["autoscaling"] = {"minReplicas": 4, "maxReplicas": 2, "targetCPUUtilization": 80}
    result = validate_serve(doc)
    assert [p.field for p in result.errors] == ["spec.autoscaling.maxReplicas"]


# ---------------------------------------------------------------- system prompt and chat template


def test_system_prompt_rules() -> None:
    assert chat_template(serve(), [run_adapter(prompt=None)]) is None
    assert chat_template(serve(), [run_adapter()]) == served_template(BASE, PROMPT)
    # The LlamaServe's own prompt wins; its own template wins over everything.
    assert chat_template(serve(systemPrompt="Be brief."), [run_adapter()]) == served_template(BASE, "Be brief.")
    assert chat_template(serve(vllm={"chat_template": "{{ messages }}"}), [run_adapter()]) == "{{ messages }}"
    # Adapters trained with different prompts cannot share one template: refused, naming them.
    with pytest.raises(b.ServeError, match="a, b were trained with different system prompts"):
        b.workload(serve(), [run_adapter("a"), run_adapter("b", prompt="Other.")], SETTINGS)
    b.workload(serve(systemPrompt="Shared."), [run_adapter("a"), run_adapter("b", prompt="Other.")], SETTINGS)
    # Same prompt, or only one adapter with one: fine.
    assert chat_template(serve(), [run_adapter("a"), run_adapter("b", prompt=None)]) == served_template(BASE, PROMPT)


def test_template_family_follows_the_catalog() -> None:
    assert served_template("meta-llama/Meta-Llama-3-8B-Instruct", "x").endswith(LLAMA3_TEMPLATE)
    for base in (BASE, "meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"):
        assert served_template(base, "x").endswith(LLAMA31_TEMPLATE)


CONVERSATIONS = [
    [{"role": "user", "content": "what colour does alice like?"}, {"role": "assistant", "content": "alice likes red."}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": "The request's own system prompt."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}],
]


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, LLAMA31_TEMPLATE], ids=["llama3", "llama3.1"])
@pytest.mark.parametrize("prompt", [PROMPT, 'Quotes " \' and {% raw %} }} #} braces, ünïcode 😀\nand lines'],
                         ids=["plain", "nasty"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "two-turns", "own-system"])
def test_served_prompt_matches_the_trainer_byte_for_byte(template: str, prompt: str,
                                                        conversation: list[dict[str, str]]) -> None:
    """What vLLM renders from the served template == what the trainer rendered for the same conversation."""
    pytest.importorskip("torch")
    from llamaops.api.finetune import DatasetSpec
    from llamaops_trainer.data import ChatEncoder, to_messages
    from llamaops_trainer.sources import Record
    from llamaops_trainer.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = template  # the base model's own template, as the trainer finds it
    encoder = ChatEncoder(tokenizer)
    trained = to_messages(Record("row 1", {"messages": conversation}), DatasetSpec(pvc={"claimName": "d", "path": "x"}),
                          prompt)
    with_template = template_for(template, prompt)
    for upto in range(1, len(conversation) + 1):
        request = conversation[:upto]  # a client sends the conversation without the training system prompt
        if request[-1]["role"] != "assistant":
            continue
        served = tokenizer.apply_chat_template(request[:-1], chat_template=with_template, tokenize=False,
                                               add_generation_prompt=True)
        n_system = len(trained) - len(conversation)
        expected = encoder.render(trained[:n_system + upto - 1], add_generation_prompt=True)
        assert served == expected
    # The whole conversation too (no generation prompt).
    assert tokenizer.apply_chat_template(conversation, chat_template=with_template, tokenize=False) == \
        encoder.render(trained)


def template_for(base_template: str, prompt: str) -> str:
    from llamaops.api.chat_template import with_system_prompt

    return with_system_prompt(prompt, base_template)


# ---------------------------------------------------------------- phase from the Deployment


def dep(replicas: int = 2, generation: int = 3, observed: int = 3, updated: int = 2, total: int = 2,
        available: int = 2, ready: int | None = None, progressing: dict[str, str] | None = None) -> dict[str, Any]:
    st: dict[str, Any] = {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total,
                          "availableReplicas": available, "readyReplicas": available if ready is None else ready}
    if progressing:
        st["conditions"] = [{"type": "Progressing", **progressing}]
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas}, "status": st}


@pytest.mark.parametrize(("deployment", "previous", "phase"), [
    (dep(), None, "Ready"),
    (dep(observed=2), "Ready", "Deploying"),  # the controller has not seen the new template yet
    (dep(updated=1, total=3, available=2), "Ready", "Deploying"),  # surge pod starting, old ones serving
    (dep(updated=2, total=3, available=2), "Ready", "Deploying"),  # one old pod still to go
    (dep(available=0, updated=2, total=2), None, "Deploying"),  # first rollout, loading weights
    (dep(available=1), "Ready", "Degraded"),  # a replica lost after the rollout finished
    (dep(available=1, progressing={"status": "False", "reason": "ProgressDeadlineExceeded", "message": "m"}),
     "Deploying", "Degraded"),
    (dep(replicas=0, updated=0, total=0, available=0), None, "Ready"),
])
def test_rollout_phase(deployment: dict[str, Any], previous: str | None, phase: str) -> None:
    assert rollout_phase(deployment, previous)[0] == phase


# ---------------------------------------------------------------- adapters from runs


def finetune(name: str, phase: str | None, uri: str | None = None, base: str = BASE, **status: Any) -> LlamaFineTune:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"] = {"name": name, "namespace": "ml"}
    doc["spec"]["model"]["base_model"] = base
    if phase:
        doc["status"] = {"phase": phase, **status}
        if uri:
            doc["status"]["adapter"] = {"uri": uri, "baseModel": base, "r": 32, "systemPrompt": PROMPT}
            doc["status"]["completionTime"] = "2025-03-01T10:00:00Z"
    return LlamaFineTune.model_validate(doc)


def test_resolve_waits_for_unfinished_runs_and_keeps_serving_a_retraining_one() -> None:
    lsv = serve(adapters=[{"name": "done", "fineTuneRef": "run-a"}, {"name": "todo", "fineTuneRef": "run-b"},
                          {"name": "gone", "fineTuneRef": "run-c"}, {"name": "direct", "uri": "hf://org/x", "r": 8}])
    runs = {"run-a": finetune("run-a", "Succeeded", "pvc://adapters/ml/run-a/adapter"),
            "run-b": finetune("run-b", "Running"), "run-c": None}
    adapters, waiting = resolve(lsv, runs, [])
    assert [(a.name, a.uri, a.source, a.r, a.revision) for a in adapters] == [
        ("done", "pvc://adapters/ml/run-a/adapter", "LlamaFineTune/run-a", 32, "2025-03-01T10:00:00Z"),
        ("direct", "hf://org/x", "uri", 8, None)]
    assert waiting == ["todo (LlamaFineTune run-b: Running)", "gone (LlamaFineTune run-c: not found)"]
    assert adapters[0].system_prompt == PROMPT
    # run-b served before and is being re-trained: its earlier adapter keeps serving.
    served = [{"name": "todo", "uri": "pvc://adapters/ml/run-b/adapter", "source": "LlamaFineTune/run-b", "r": 16}]
    adapters, waiting = resolve(lsv, runs, served)
    assert waiting == ["gone (LlamaFineTune run-c: not found)"]
    assert ("todo", "pvc://adapters/ml/run-b/adapter", 16) in [(a.name, a.uri, a.r) for a in adapters]


def test_base_model_mismatch_names_the_adapter() -> None:
    doc = example("llama-3.1-8b-serve.yaml")
    other = "meta-llama/Llama-3.2-3B-Instruct"
    result = validate_serve(doc, finetunes={"llama31-8b-lora": finetune("llama31-8b-lora", "Succeeded",
                                                                        "pvc://a/b", base=other)})
    assert [p.field for p in result.errors] == ["spec.adapters[0].fineTuneRef"]
    assert '"k8s-assistant" was trained on "meta-llama/Llama-3.2-3B-Instruct"' in result.errors[0].message
    doc["spec"]["adapters"] = [{"name": "x", "uri": "hf://org/x", "baseModel": other}]
    assert [p.field for p in validate_serve(doc).errors] == ["spec.adapters[0].baseModel"]


# ---------------------------------------------------------------- Ollama


def test_ollama_runtime_modelfiles() -> None:
    lsv = serve(runtime="ollama", model={"base_model": "llama3.1:8b"}, vllm={}, ollama={"context_length": 8192},
                adapters=[{"name": "k8s-assistant", "uri": "pvc://adapters/ml/run/adapter"}])
    adapter = b.ResolvedAdapter("k8s-assistant", "pvc://adapters/ml/run/adapter", "uri", system_prompt=PROMPT)
    w = b.workload(lsv, [adapter], SETTINGS)
    ctr = container(w.deployment)
    assert ctr["image"] == SETTINGS.ollama_image
    assert ctr["ports"][0]["containerPort"] == 11434
    assert "args" not in ctr and ctr["command"][:2] == ["/bin/sh", "-c"]
    # Each adapter also under a name that changes with its weights (location and revision).
    version = adapter_version(adapter)
    assert len(version) == 12 and version != adapter_version(dataclasses.replace(adapter, revision="later"))
    # Paths are arguments of the script: the Modelfile directory, the work directory, the adapters to stage
    # (name, mount), then the models to create in ConfigMap order.
    assert ctr["command"][3:] == ["ollama-start", "/etc/llamaops/modelfiles", "/var/lib/llamaops/ollama",
                                  "k8s-assistant", "/var/lib/llamaops/adapters/k8s-assistant", "--",
                                  "llama31-8b", "k8s-assistant", f"k8s-assistant:{version}"]
    assert ctr["startupProbe"]["exec"]["command"] == ["test", "-f", OLLAMA_READY]
    assert OLLAMA_READY.startswith("/var/lib/llamaops/ollama/")
    assert {"name": "ollama-work", "mountPath": "/var/lib/llamaops/ollama"} in ctr["volumeMounts"]
    assert {"name": "OLLAMA_CONTEXT_LENGTH", "value": "8192"} in ctr["env"]
    assert {"name": "OLLAMA_MODELS", "value": "/root/.ollama/models"} in ctr["env"]
    assert ctr["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    (cm,) = w.config_maps
    # Llama 3.1's template (its system block with the fixed date), written for Ollama; then the stop tokens.
    tail = (f'TEMPLATE """{OLLAMA_LLAMA31_TEMPLATE}"""\nSYSTEM """{PROMPT}"""\n'
            "PARAMETER stop <|eot_id|>\nPARAMETER stop <|start_header_id|>\nPARAMETER stop <|end_header_id|>\n")
    assert "Today Date: 26 Jul 2024" in OLLAMA_LLAMA31_TEMPLATE
    assert cm["data"] == {
        "model-0": "FROM llama3.1:8b\n" + tail,
        # relative to the Modelfile's directory: the staged copy in the work directory
        "model-1": "FROM llama3.1:8b\nADAPTER ../../../var/lib/llamaops/ollama/adapters/k8s-assistant\n" + tail,
        "model-2": "FROM llama3.1:8b\nADAPTER ../../../var/lib/llamaops/ollama/adapters/k8s-assistant\n" + tail,
    }
    assert "prometheus.io/scrape" not in w.deployment["spec"]["template"]["metadata"]["annotations"]
    assert b.endpoint(lsv) == "http://llama31-8b.ml.svc:11434/v1"


@pytest.mark.parametrize(("lora", "rank"), [({"r": 32}, 32), ({"r": 32, "init_lora_weights": "pissa"}, 64),
                                            ({"r": 16, "init_lora_weights": "olora"}, 32),
                                            ({"r": 16, "rank_pattern": {"q_proj": 48}}, 48)])
def test_a_run_is_served_at_the_rank_it_will_export(lora: dict[str, Any], rank: int) -> None:
    """Before a run finished, vLLM's --max-lora-rank is checked against what the trainer will export: PiSSA and
    OLoRA adapters are converted to plain LoRA at twice r, and rank_pattern may exceed r."""
    run = finetune("llama31-8b-lora", "Running")
    run.spec.lora = run.spec.lora.model_validate({**run.spec.lora.model_dump(), **lora})
    assert run.spec.lora.exported_rank == rank
    doc = example("llama-3.1-8b-serve.yaml")
    doc["spec"]["vllm"]["max_lora_rank"] = 32
    errors = validate_serve(doc, finetunes={"llama31-8b-lora": run}).errors
    if rank > 32:
        assert [str(p) for p in errors] == [f'spec.vllm.max_lora_rank: 32 is below the rank {rank} of adapter '
                                            f'"k8s-assistant"; use one of '
                                            f'{", ".join(str(x) for x in (64, 128, 256, 320, 512) if x >= rank)}']
    else:
        assert errors == []


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"apiKeySecretRef": {"name": "k", "key": "api-key"}}, "spec.apiKeySecretRef", "no API keys"),
    ({"systemPrompt": 'Answer.\n"""\nFROM evil/model'}, "spec.systemPrompt", 'contains """'),
    ({"model": {"base_model": "llama3.1:8b\nADAPTER /etc/passwd"}}, "spec.model.base_model", "line break"),
])
def test_ollama_refuses_what_it_cannot_honour(spec: dict[str, Any], field: str, words: str) -> None:
    """Ollama has no API keys (the key was silently dropped), and its Modelfile has no escape for a SYSTEM block
    holding three quotes nor for a line break in FROM: refused, naming the field, instead of served wrongly."""
    doc = example("llama-3.1-8b-serve.yaml")
    doc["spec"].update({"runtime": "ollama", "vllm": {}, "model": {"base_model": "llama3.1:8b"},
                        "adapters": [{"name": "a", "uri": "pvc://adapters/ml/run/adapter"}]}, **spec)
    doc["spec"].pop("hfTokenSecretRef", None)
    errors = validate_serve(doc).errors
    assert [p.field for p in errors] == [field] and words in errors[0].message


def test_a_trained_prompt_ollama_cannot_hold_is_not_rendered() -> None:
    lsv = serve(runtime="ollama", model={"base_model": "llama3.1:8b"}, vllm={},
                adapters=[{"name": "a", "uri": "pvc://adapters/ml/run/adapter"}])
    adapter = b.ResolvedAdapter("a", "pvc://adapters/ml/run/adapter", "uri", system_prompt='x"""\nFROM evil')
    with pytest.raises(b.ServeError, match='system prompt cannot be served by Ollama: it contains """'):
        b.workload(lsv, [adapter], SETTINGS)


@pytest.mark.parametrize(("runtime", "lora", "words"), [
    # Ollama 0.17 permutes lora_A of q_proj/k_proj where lora_B's rows need it: a different model is served.
    ("ollama", {"target_modules": ["q_proj", "v_proj"]}, "has LoRA weights on q_proj, which Ollama 0.17 converts"),
    ("ollama", {"target_modules": ["v_proj"], "modules_to_save": ["lm_head"]}, "saves whole modules (lm_head)"),
    # vLLM refuses adapters that save whole modules or adapt lm_head (vllm#9280).
    ("vllm", {"target_modules": ["q_proj", "lm_head"]}, "trains lm_head"),
    ("vllm", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, "trains embed_tokens"),
])
def test_adapters_a_runtime_would_serve_wrongly_are_refused_naming_the_adapter(
        runtime: str, lora: dict[str, Any], words: str) -> None:
    run = finetune("llama31-8b-lora", "Running")
    run.spec.lora = run.spec.lora.model_validate({**run.spec.lora.model_dump(), **lora})
    doc = example("llama-3.1-8b-serve.yaml")
    if runtime == "ollama":
        doc["spec"] = {"runtime": "ollama", "model": {"base_model": BASE}, "ollama": {"gpus": 1},
                       "adapters": doc["spec"]["adapters"]}
    errors = validate_serve(doc, finetunes={"llama31-8b-lora": run}).errors
    assert [p.field for p in errors] == ["spec.adapters[0]"], errors
    assert words in errors[0].message and 'LlamaFineTune "llama31-8b-lora"' in errors[0].message


def test_linear_layer_adapters_pass_both_runtimes() -> None:
    run = finetune("llama31-8b-lora", "Running")
    run.spec.lora = run.spec.lora.model_validate({**run.spec.lora.model_dump(),
                                                  "target_modules": ["v_proj", "o_proj", "down_proj"]})
    doc = example("llama-3.1-8b-serve.yaml")
    assert validate_serve(doc, finetunes={"llama31-8b-lora": run}).errors == []
    doc["spec"] = {"runtime": "ollama", "model": {"base_model": BASE}, "adapters": doc["spec"]["adapters"]}
    assert validate_serve(doc, finetunes={"llama31-8b-lora": run}).errors == []
