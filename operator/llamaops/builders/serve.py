"""The serving workload of one LlamaServe, as manifests.

    ConfigMap <name>-chat-template   the chat template with the adapters' system prompt (when there is one)
    ConfigMap <name>-modelfiles      Ollama only: one Modelfile per served model
    Deployment <name>                vLLM (or Ollama) replicas, rolled out without lost capacity
    Service <name>                   ClusterIP on the server's port
    PodDisruptionBudget <name>       when spec.podDisruptionBudget is set
    HorizontalPodAutoscaler <name>   when spec.autoscaling is set

Adapters reach this module already resolved (`ResolvedAdapter`): a fineTuneRef
has become its run's status.adapter. Pure: no I/O.
"""

from __future__ import annotations

import copy
import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from llamaops.api import LlamaServe
from llamaops.api.chat_template import served_template
from llamaops.api.contract import HF_HOME, digest, parse_pvc_uri
from llamaops.api.serve import VLLM_LORA_RANKS
from llamaops.builders.naming import (
    ANNOTATION_SPEC_HASH,
    LABEL_SERVE,
    child_name,
    label_value,
    labels,
    metadata,
)
from llamaops.builders.scheduling import GPU, cpu_memory, node_selector, tolerations
from llamaops.settings import Settings
from llamaops.status import condition

KIND = "LlamaServe"
CONTAINER = "server"
COMPONENT = "server"
# Pod template annotation: hash of everything resolved outside the spec (adapters, chat
# template), so a re-trained adapter at the same location still rolls the pods.
ANNOTATION_CONFIG_HASH = "llamaops.io/config-hash"
ANNOTATION_ADAPTERS = "llamaops.io/adapters"

ADAPTER_ROOT = "/var/lib/llamaops/adapters"  # pvc:// adapters, one read-only mount each
S3_ADAPTER_ROOT = "/var/lib/llamaops/s3-adapters"  # s3:// adapters, fetched by the init container
MODEL_ROOT = "/var/lib/llamaops/models"  # pvc:// base models, claim mounted read-only
CHAT_TEMPLATE_DIR = "/etc/llamaops/chat"
CHAT_TEMPLATE_FILE = "template.jinja"
MODELFILE_DIR = "/etc/llamaops/modelfiles"
OLLAMA_PORT = 11434
OLLAMA_HOME = "/root/.ollama"
OLLAMA_READY = "/tmp/llamaops-models-created"
# Time for in-flight requests to finish after SIGTERM (vLLM drains on shutdown).
TERMINATION_GRACE_SECONDS = 60
# A replica that never becomes Ready leaves the Deployment Progressing=False this long after the
# startup budget: the LlamaServe then reports Degraded.
PROGRESS_MARGIN_SECONDS = 600
STARTUP_PERIOD_SECONDS = 10


@dataclass(frozen=True)
class S3Credentials:
    endpoint: str | None = None
    region: str | None = None
    secret: str | None = None  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY


@dataclass(frozen=True)
class ResolvedAdapter:
    """One adapter to serve, wherever it came from."""

    name: str
    uri: str  # pvc://claim/path, s3://bucket/prefix or hf://org/repo
    source: str  # "LlamaFineTune/<name>" or "uri"
    base_model: str | None = None
    r: int | None = None
    system_prompt: str | None = None
    revision: str | None = None  # the run's completion time: changes when it is re-trained
    s3: S3Credentials | None = field(default=None, compare=False)

    def status(self) -> dict[str, Any]:
        out = {"name": self.name, "uri": self.uri, "source": self.source, "baseModel": self.base_model,
               "r": self.r, "systemPrompt": self.system_prompt, "revision": self.revision}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class ServeWorkload:
    deployment: dict[str, Any]
    service: dict[str, Any]
    config_maps: list[dict[str, Any]] = field(default_factory=list)
    pdb: dict[str, Any] | None = None
    hpa: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def in_apply_order(self) -> list[dict[str, Any]]:
        """What the pods mount first, the Deployment after, then what refers to it."""
        return [*self.config_maps, self.service, self.deployment, *(x for x in (self.pdb, self.hpa) if x)]


class ServeError(ValueError):
    """The spec and its adapters cannot be served (reported on the LlamaServe, nothing is built)."""


# ---------------------------------------------------------------- small pure helpers


def round_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that covers rank `r`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ServeError(f"LoRA rank {r} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


def names(lsv: LlamaServe) -> dict[str, str]:
    name = lsv.metadata.name or ""
    return {"deployment": child_name(name, ""), "service": child_name(name, ""),
            "chat": child_name(name, "chat-template"), "modelfiles": child_name(name, "modelfiles")}


def port(lsv: LlamaServe) -> int:
    return OLLAMA_PORT if lsv.spec.runtime == "ollama" else lsv.spec.vllm.port


def endpoint(lsv: LlamaServe) -> str:
    """The in-cluster OpenAI-compatible base URL (Ollama serves the same API under /v1)."""
    m = lsv.metadata
    return f"http://{names(lsv)['service']}.{m.namespace or 'default'}.svc:{port(lsv)}/v1"


def served_model_name(lsv: LlamaServe) -> str:
    return lsv.spec.vllm.served_model_name or lsv.spec.model.base_model


def _meta(lsv: LlamaServe, name: str, component: str, **kw: Any) -> dict[str, Any]:
    m = lsv.metadata
    return metadata(name, m.namespace or "default", KIND, m.name or "", m.uid or "",
                    labels(LABEL_SERVE, m.name or "", component), **kw)


def selector(lsv: LlamaServe) -> dict[str, str]:
    return {LABEL_SERVE: label_value(lsv.metadata.name or ""), "app.kubernetes.io/component": COMPONENT}


def system_prompt(lsv: LlamaServe, adapters: list[ResolvedAdapter]) -> str | None:
    """The system prompt to serve by default.

    spec.systemPrompt wins; else the one the adapters were trained with. Adapters
    trained with different prompts cannot share one template (a request names its
    adapter only in the body, and the template cannot see which): refused.
    """
    if lsv.spec.system_prompt:
        return lsv.spec.system_prompt
    prompts = {a.system_prompt for a in adapters if a.system_prompt}
    if len(prompts) > 1:
        which = ", ".join(sorted(a.name for a in adapters if a.system_prompt))
        raise ServeError(f"adapters {which} were trained with different system prompts and one server applies "
                         "one chat template: set spec.systemPrompt (or vllm.chat_template), or serve them from "
                         "separate LlamaServes")
    return prompts.pop() if prompts else None


def chat_template(lsv: LlamaServe, adapters: list[ResolvedAdapter]) -> str | None:
    """The template vLLM is given (`--chat-template`), or None to keep the tokenizer's own."""
    if lsv.spec.vllm.chat_template:
        return lsv.spec.vllm.chat_template
    prompt = system_prompt(lsv, adapters)
    return served_template(lsv.spec.model.base_model, prompt) if prompt else None


def adapter_path(adapter: ResolvedAdapter) -> str:
    """Where the server finds the adapter (hf:// is a repo id vLLM downloads itself)."""
    if adapter.uri.startswith("pvc://"):
        return f"{ADAPTER_ROOT}/{adapter.name}"
    if adapter.uri.startswith("s3://"):
        return f"{S3_ADAPTER_ROOT}/{adapter.name}"
    if adapter.uri.startswith("hf://"):
        return adapter.uri[len("hf://"):]
    raise ServeError(f'adapter "{adapter.name}": unsupported location {adapter.uri}')


def model_path(lsv: LlamaServe) -> str:
    base = lsv.spec.model.base_model
    if base.startswith("pvc://"):
        claim, path = parse_pvc_uri(base)
        return f"{MODEL_ROOT}/{claim}/{path}".rstrip("/")
    return base


def config_hash(lsv: LlamaServe, adapters: list[ResolvedAdapter], template: str | None) -> str:
    return digest({"adapters": [asdict(a) | {"s3": None} for a in adapters], "chatTemplate": template,
                   "runtime": lsv.spec.runtime})[:16]


# ---------------------------------------------------------------- vLLM


def vllm_args(lsv: LlamaServe, adapters: list[ResolvedAdapter], template: str | None) -> list[str]:
    """Everything after `vllm serve`: the model, then flags. The API key is never here (env VLLM_API_KEY)."""
    v = lsv.spec.vllm
    args = [model_path(lsv), "--host", "0.0.0.0", "--port", str(v.port),
            "--tensor-parallel-size", str(v.tensor_parallel_size)]
    if v.max_model_len:
        args += ["--max-model-len", str(v.max_model_len)]
    args += ["--gpu-memory-utilization", str(v.gpu_memory_utilization), "--dtype", v.dtype]
    if v.max_num_seqs:
        args += ["--max-num-seqs", str(v.max_num_seqs)]
    if v.quantization:
        args += ["--quantization", v.quantization]
    # The name clients use for the base model; adapters' base_model_name points at it.
    args += ["--served-model-name", served_model_name(lsv)]
    if lsv.spec.model.revision:
        args += ["--revision", lsv.spec.model.revision]
    if lsv.spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    if v.enable_prefix_caching is not None:
        args.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if adapters:
        ranks = [a.r for a in adapters if a.r is not None]
        max_rank = v.max_lora_rank or round_lora_rank(max(ranks, default=16))
        max_loras = v.max_loras or len(adapters)
        args.append("--enable-lora")
        args.append("--lora-modules")
        args += [json.dumps({"name": a.name, "path": adapter_path(a), "base_model_name": served_model_name(lsv)},
                            separators=(",", ":")) for a in adapters]
        args += ["--max-loras", str(max_loras), "--max-lora-rank", str(max_rank)]
        if v.max_cpu_loras:
            args += ["--max-cpu-loras", str(max(v.max_cpu_loras, max_loras))]
    if template is not None:
        args += ["--chat-template", f"{CHAT_TEMPLATE_DIR}/{CHAT_TEMPLATE_FILE}"]
    args += list(v.extra_args or [])
    return args


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(lsv: LlamaServe) -> list[dict[str, Any]]:
    spec = lsv.spec
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": HF_HOME}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.hf_token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", spec.hf_token_secret_ref.name, spec.hf_token_secret_ref.key))
    if spec.api_key_secret_ref is not None and spec.runtime == "vllm":
        env.append(_secret_env("VLLM_API_KEY", spec.api_key_secret_ref.name, spec.api_key_secret_ref.key))
    if spec.vllm.tensor_parallel_size > 1:
        env.append({"name": "NCCL_DEBUG", "value": "WARN"})
    return env


def _probes(lsv: LlamaServe) -> dict[str, Any]:
    """Liveness and readiness start only once the startup probe passed, so a slow loader is never killed."""
    if lsv.spec.runtime == "ollama":
        get = {"path": "/", "port": "http"}  # "Ollama is running"
        # Started once every model was created from its Modelfile (ollama_script).
        startup: dict[str, Any] = {"exec": {"command": ["test", "-f", OLLAMA_READY]}}
    else:
        get = {"path": "/health", "port": "http"}
        startup = {"httpGet": get}
    return {
        "startupProbe": {**copy.deepcopy(startup), "periodSeconds": STARTUP_PERIOD_SECONDS, "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(lsv.spec.startup_timeout_seconds / STARTUP_PERIOD_SECONDS)},
        "readinessProbe": {"httpGet": dict(get), "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3},
        # A wedged engine answers 503; a busy one still answers: restart after ~1.5 min of failures.
        "livenessProbe": {"httpGet": dict(get), "periodSeconds": 15, "timeoutSeconds": 10, "failureThreshold": 6},
    }


def _resources(lsv: LlamaServe) -> dict[str, Any]:
    amounts = cpu_memory(lsv.spec.resources)
    gpus = str(lsv.spec.vllm.tensor_parallel_size)
    return {"requests": {**amounts, GPU: gpus}, "limits": {**amounts, GPU: gpus}}


@dataclass
class _Volumes:
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    claims: dict[str, str] = field(default_factory=dict)  # claim -> volume name

    def claim(self, claim: str) -> str:
        if claim not in self.claims:
            vol = f"pvc-{len(self.claims)}"
            self.claims[claim] = vol
            self.volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        return self.claims[claim]


def _s3_fetch(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings) -> list[dict[str, Any]]:
    """One init container per s3:// adapter: `aws s3 sync` into the shared emptyDir (idempotent on restart)."""
    out = []
    for i, a in enumerate(x for x in adapters if x.uri.startswith("s3://")):
        creds = a.s3 or S3Credentials()
        cmd = ["aws", "s3", "sync", "--only-show-errors", a.uri.rstrip("/") + "/", f"{S3_ADAPTER_ROOT}/{a.name}/"]
        if creds.endpoint:
            cmd[2:2] = ["--endpoint-url", creds.endpoint]
        env: list[dict[str, Any]] = []
        if creds.secret:
            env += [_secret_env("AWS_ACCESS_KEY_ID", creds.secret, "AWS_ACCESS_KEY_ID"),
                    _secret_env("AWS_SECRET_ACCESS_KEY", creds.secret, "AWS_SECRET_ACCESS_KEY")]
        if creds.region:
            env.append({"name": "AWS_DEFAULT_REGION", "value": creds.region})
        ctr: dict[str, Any] = {
            "name": f"fetch-adapter-{i}",
            "image": settings.adapter_fetch_image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": cmd,
            "volumeMounts": [{"name": "s3-adapters", "mountPath": S3_ADAPTER_ROOT}],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
        if env:
            ctr["env"] = env
        out.append(ctr)
    return out


def _volumes(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings,
             template: str | None) -> _Volumes:
    spec = lsv.spec
    vols = _Volumes()
    cache_claim = spec.model_cache_pvc or settings.model_cache_pvc
    vols.volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache_claim}}
                        if cache_claim else {"name": "model-cache", "emptyDir": {}})
    vols.mounts.append({"name": "model-cache", "mountPath": OLLAMA_HOME if spec.runtime == "ollama" else HF_HOME})
    if spec.vllm.tensor_parallel_size > 1:
        # NCCL's shared-memory transport between the tensor-parallel workers fails on the default 64Mi.
        vols.volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}})
        vols.mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.model.base_model.startswith("pvc://"):
        claim, _ = parse_pvc_uri(spec.model.base_model)
        vols.mounts.append({"name": vols.claim(claim), "mountPath": f"{MODEL_ROOT}/{claim}", "readOnly": True})
    for a in adapters:
        if a.uri.startswith("pvc://"):
            claim, path = parse_pvc_uri(a.uri)
            mount = {"name": vols.claim(claim), "mountPath": f"{ADAPTER_ROOT}/{a.name}", "readOnly": True}
            if path.strip("/"):
                mount["subPath"] = path.strip("/")
            vols.mounts.append(mount)
    if any(a.uri.startswith("s3://") for a in adapters):
        vols.volumes.append({"name": "s3-adapters", "emptyDir": {}})
        vols.mounts.append({"name": "s3-adapters", "mountPath": S3_ADAPTER_ROOT, "readOnly": True})
    if template is not None:
        n = names(lsv)
        vols.volumes.append({"name": "chat-template", "configMap": {"name": n["chat"]}})
        vols.mounts.append({"name": "chat-template", "mountPath": CHAT_TEMPLATE_DIR, "readOnly": True})
    if spec.runtime == "ollama":
        vols.volumes.append({"name": "modelfiles", "configMap": {"name": names(lsv)["modelfiles"]}})
        vols.mounts.append({"name": "modelfiles", "mountPath": MODELFILE_DIR, "readOnly": True})
    return vols


def _server_container(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings,
                      template: str | None, models: list[str], vols: _Volumes) -> dict[str, Any]:
    spec = lsv.spec
    ctr: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or (settings.ollama_image if spec.runtime == "ollama" else settings.vllm_image),
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "env": _env(lsv),
        "ports": [{"name": "http", "containerPort": port(lsv), "protocol": "TCP"}],
        "resources": _resources(lsv),
        "volumeMounts": vols.mounts,
        **_probes(lsv),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # The official vLLM and Ollama images run as root and write caches under $HOME
        # (torch.compile, Triton, FlashInfer; Ollama's model store): runAsNonRoot and a
        # read-only root filesystem break them. What is left is still "restricted"-minded:
        # no privilege escalation, no capabilities, the runtime's seccomp profile.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if spec.runtime == "ollama":
        ctr["command"] = ["/bin/sh", "-c", ollama_script(models)]
        ctr["env"].append({"name": "OLLAMA_HOST", "value": f"0.0.0.0:{OLLAMA_PORT}"})
        if spec.vllm.max_model_len:
            ctr["env"].append({"name": "OLLAMA_CONTEXT_LENGTH", "value": str(spec.vllm.max_model_len)})
    else:
        # The image's entrypoint differs between releases; name the command outright.
        ctr["command"] = ["vllm", "serve"]
        ctr["args"] = vllm_args(lsv, adapters, template)
    return ctr


def deployment(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings) -> dict[str, Any]:
    """The Deployment alone (`workload` builds it with the rest)."""
    return workload(lsv, adapters, settings).deployment


def _deployment(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings, template: str | None,
                models: list[str]) -> dict[str, Any]:
    """`template`: the vLLM chat template (None: the tokenizer's); `models`: the Ollama models to create, in order."""
    spec, res = lsv.spec, lsv.spec.resources
    vols = _volumes(lsv, adapters, settings, template)
    container = _server_container(lsv, adapters, settings, template, models, vols)
    placement = node_selector(res)
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": vols.volumes,
        "tolerations": tolerations(res, gpus=True),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,  # a Service named "vllm" would otherwise set VLLM_PORT and confuse vLLM
    }
    init = _s3_fetch(lsv, adapters, settings)
    if init:
        pod["initContainers"] = init
    if placement:
        pod["nodeSelector"] = placement
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    sel = selector(lsv)
    port_ = str(port(lsv))
    pod_annotations = {
        ANNOTATION_CONFIG_HASH: config_hash(lsv, adapters, template),
        ANNOTATION_ADAPTERS: ",".join(a.name for a in adapters),
    }
    if spec.runtime == "vllm":
        pod_annotations |= {"prometheus.io/scrape": "true", "prometheus.io/port": port_, "prometheus.io/path": "/metrics"}
    meta = _meta(lsv, names(lsv)["deployment"], COMPONENT,
                 annotations={ANNOTATION_SPEC_HASH: digest(spec.model_dump(mode="json", by_alias=True))[:16]})
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": sel},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": spec.rolling_update.max_surge,
                                                                 "maxUnavailable": spec.rolling_update.max_unavailable}},
        "progressDeadlineSeconds": spec.startup_timeout_seconds + PROGRESS_MARGIN_SECONDS,
        "revisionHistoryLimit": 5,
        "template": {"metadata": {"labels": {**meta["labels"], **sel}, "annotations": pod_annotations}, "spec": pod},
    }
    if spec.autoscaling is None:
        dep_spec["replicas"] = spec.replicas  # else the HPA owns it: applying it would fight the autoscaler
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": dep_spec}


def service(lsv: LlamaServe) -> dict[str, Any]:
    p = port(lsv)
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(lsv, names(lsv)["service"], COMPONENT),
            "spec": {"type": "ClusterIP", "selector": selector(lsv),
                     "ports": [{"name": "http", "port": p, "targetPort": "http", "protocol": "TCP"}]}}


def pdb(lsv: LlamaServe) -> dict[str, Any] | None:
    b = lsv.spec.pod_disruption_budget
    if b is None:
        return None
    spec: dict[str, Any] = {"selector": {"matchLabels": selector(lsv)},
                            # a replica still loading its weights may be evicted: it serves nothing yet
                            "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    if b.min_available is not None:
        spec["minAvailable"] = b.min_available
    else:
        spec["maxUnavailable"] = b.max_unavailable
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(lsv, names(lsv)["deployment"], COMPONENT), "spec": spec}


def hpa(lsv: LlamaServe) -> dict[str, Any] | None:
    a = lsv.spec.autoscaling
    if a is None:
        return None
    metrics: list[dict[str, Any]] = []
    if a.target_cpu_utilization is not None:
        metrics.append({"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": a.target_cpu_utilization}}})
    if a.metric is not None:
        metrics.append({"type": "Pods", "pods": {"metric": {"name": a.metric.name}, "target": {
            "type": "AverageValue", "averageValue": a.metric.average_value}}})
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(lsv, names(lsv)["deployment"], COMPONENT),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names(lsv)["deployment"]},
                     "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas, "metrics": metrics,
                     # a new replica loads weights for minutes: do not scale down on a short lull
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}}


# ---------------------------------------------------------------- Ollama


def ollama_model_name(lsv: LlamaServe) -> str:
    return lsv.spec.vllm.served_model_name or (lsv.metadata.name or "base")


def modelfiles(lsv: LlamaServe, adapters: list[ResolvedAdapter]) -> list[tuple[str, str]]:
    """(model name, Modelfile): the base itself, then one model per adapter (FROM base, ADAPTER, SYSTEM)."""
    base = model_path(lsv)
    prompt = system_prompt(lsv, adapters)
    system = f'SYSTEM """{prompt}"""\n' if prompt else ""
    files = [(ollama_model_name(lsv), f"FROM {base}\n{system}")]
    files += [(a.name, f"FROM {base}\nADAPTER {adapter_path(a)}\n{system}") for a in adapters]
    return files


def ollama_script(models: list[str]) -> str:
    """Start the server, create every model from its Modelfile, mark the replica started, stay with the server.

    `models` are the names of `modelfiles`, in order (ConfigMap key model-<i>). The startup probe waits
    for the marker, so the Service sends no traffic before every model exists.
    """
    steps = ["set -e", f"rm -f {OLLAMA_READY}", "ollama serve &", "pid=$!",
             "until ollama list >/dev/null 2>&1; do sleep 1; done"]
    for i, model in enumerate(models):
        steps.append(f"ollama create {shlex.quote(model)} -f {MODELFILE_DIR}/model-{i}")
    steps += [f"touch {OLLAMA_READY}", "wait $pid"]
    return "\n".join(steps)


# ---------------------------------------------------------------- everything


def workload(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings) -> ServeWorkload:
    """All children of a LlamaServe. Raises ServeError when the adapters cannot be served together."""
    n = names(lsv)
    config_maps = []
    template: str | None = None
    files: list[tuple[str, str]] = []
    if lsv.spec.runtime == "vllm":
        template = chat_template(lsv, adapters)
        if template is not None:
            config_maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(lsv, n["chat"], COMPONENT),
                                "data": {CHAT_TEMPLATE_FILE: template}})
    else:
        files = modelfiles(lsv, adapters)
        config_maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": _meta(lsv, n["modelfiles"], COMPONENT),
                            "data": {f"model-{i}": doc for i, (_, doc) in enumerate(files)}})
    dep = _deployment(lsv, adapters, settings, template, [model for model, _ in files])
    return ServeWorkload(deployment=dep, service=service(lsv), config_maps=config_maps, pdb=pdb(lsv), hpa=hpa(lsv))


# ---------------------------------------------------------------- the Deployment's state, as a phase


class Rollout(NamedTuple):
    """A LlamaServe's phase (with why) and its Deployment's replica counts."""

    phase: str  # Ready, Deploying or Degraded
    message: str
    desired: int  # spec.replicas
    replicas: int
    updated: int
    ready: int
    available: int


def rollout_phase(dep: dict[str, Any], previous: str | None) -> Rollout:
    """The rollout of a LlamaServe whose Deployment is `dep` (as the API server returns it).

    Ready: every replica runs the current pod template and is available.
    Deploying: a rollout is under way (old replicas keep serving until new ones are Ready).
    Degraded: the rollout missed its deadline, or replicas were lost after it finished.
    """
    spec, dst = dep.get("spec") or {}, dep.get("status") or {}
    # The server always has spec.replicas (defaulted to 1; with an autoscaler, the count it set).
    desired = spec.get("replicas", 1)
    gen_ok = (dst.get("observedGeneration") or 0) >= (dep.get("metadata") or {}).get("generation", 0)
    updated, total = dst.get("updatedReplicas") or 0, dst.get("replicas") or 0
    available, ready = dst.get("availableReplicas") or 0, dst.get("readyReplicas") or 0

    def rollout(phase: str, message: str) -> Rollout:
        return Rollout(phase, message, desired, total, updated, ready, available)

    progressing = condition(dst.get("conditions"), "Progressing") or {}
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return rollout("Degraded", f"the rollout made no progress: {progressing.get('message', '')}".strip())
    rolled = gen_ok and updated >= desired and total <= updated
    if rolled and available >= desired:
        return rollout("Ready", f"{ready}/{desired} replicas ready")
    if rolled and previous in ("Ready", "Degraded"):
        return rollout("Degraded", f"{available}/{desired} replicas available")
    if not gen_ok:
        return rollout("Deploying", "the Deployment is taking the new spec")
    return rollout("Deploying", f"{updated}/{desired} replicas updated, {available} available")
