"""The serving workload of one LlamaServe, as manifests, for whichever runtime serves it.

    ConfigMap <name>-<runtime's suffix>  the runtime's files (vLLM's chat template, Ollama's Modelfiles), if any
    Deployment <name>                    the replicas, rolled out without lost capacity
    Service <name>                       ClusterIP on the server's port
    PodDisruptionBudget <name>           when spec.podDisruptionBudget is set
    HorizontalPodAutoscaler <name>       when spec.autoscaling is set

Adapters reach this module already resolved (state.serve.ResolvedAdapter): a
fineTuneRef has become its run's status.adapter. Pure: no I/O.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from llamaops.api import LlamaServe
from llamaops.api.constants import ANNOTATION_SPEC_HASH, COMPONENT_SERVER, GROUP, KIND_SERVE, LABEL_COMPONENT
from llamaops.api.contract import HF_HOME, digest, parse_pvc_uri
from llamaops.builders.naming import LABEL_SERVE, child_name, dns_label, label_value, labels, metadata
from llamaops.builders.scheduling import GPU, cpu_memory, node_placement, pod_options, secret_env
from llamaops.builders.serve.runtime import ServeContext, ServeError, Server, ServingRuntime, get, runtimes
from llamaops.settings import Settings
from llamaops.state.serve import ResolvedAdapter, S3Credentials

CONTAINER = "server"
COMPONENT = COMPONENT_SERVER
# Pod template annotation: hash of everything resolved outside the spec (adapters, the runtime's files), so a
# re-trained adapter at the same location still rolls the pods.
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
ANNOTATION_ADAPTERS = f"{GROUP}/adapters"

ADAPTER_ROOT = "/var/lib/llamaops/adapters"  # pvc:// adapters, one read-only mount each
S3_ADAPTER_ROOT = "/var/lib/llamaops/s3-adapters"  # s3:// adapters, fetched by the init container
MODEL_ROOT = "/var/lib/llamaops/models"  # pvc:// base models, claim mounted read-only
# Time for in-flight requests to finish after SIGTERM (vLLM drains on shutdown).
TERMINATION_GRACE_SECONDS = 60
# A terminating replica keeps serving this long before SIGTERM, while the endpoints controller and the proxies
# stop sending it new requests (they learn of the deletion at the same time as the kubelet).
PRESTOP_SLEEP_SECONDS = 5
# A replica that never becomes Ready leaves the Deployment Progressing=False this long after the
# startup budget: the LlamaServe then reports Degraded.
PROGRESS_MARGIN_SECONDS = 600
STARTUP_PERIOD_SECONDS = 10


@dataclass
class ServeWorkload:
    deployment: dict[str, Any]
    service: dict[str, Any]
    config_maps: list[dict[str, Any]] = field(default_factory=list)
    pdb: dict[str, Any] | None = None
    hpa: dict[str, Any] | None = None
    network_policy: dict[str, Any] | None = None

    def in_apply_order(self) -> list[dict[str, Any]]:
        """What the pods mount first, the Deployment after, then what refers to it."""
        return [*self.config_maps, *(x for x in (self.network_policy,) if x), self.service, self.deployment,
                *(x for x in (self.pdb, self.hpa) if x)]


# ---------------------------------------------------------------- small pure helpers


def runtime_of(lsv: LlamaServe) -> ServingRuntime:
    return get(lsv.spec.runtime)


def names(lsv: LlamaServe) -> dict[str, str]:
    """deployment/service/...: the children's names; config: the runtime's ConfigMap."""
    name = lsv.metadata.name or ""
    return {"deployment": child_name(name, ""), "service": child_name(dns_label(name), ""),  # a DNS label
            "config": child_name(name, runtime_of(lsv).config_suffix)}


def config_map_names(lsv: LlamaServe) -> list[str]:
    """The ConfigMap name every registered runtime would use: what a runtime switch leaves behind."""
    name = lsv.metadata.name or ""
    return sorted({child_name(name, rt.config_suffix) for rt in runtimes()})


def endpoint(lsv: LlamaServe) -> str:
    """The in-cluster OpenAI-compatible base URL."""
    m = lsv.metadata
    return f"http://{names(lsv)['service']}.{m.namespace or 'default'}.svc:{runtime_of(lsv).port(lsv)}/v1"


def _meta(lsv: LlamaServe, name: str, component: str, **kw: Any) -> dict[str, Any]:
    m = lsv.metadata
    return metadata(name, m.namespace or "default", KIND_SERVE, m.name or "", m.uid or "",
                    labels(LABEL_SERVE, m.name or "", component), **kw)


def selector(lsv: LlamaServe) -> dict[str, str]:
    return {LABEL_SERVE: label_value(lsv.metadata.name or ""), LABEL_COMPONENT: COMPONENT}


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


def adapter_path(adapter: ResolvedAdapter) -> str:
    """Where the server finds the adapter (hf:// is a repo id the server downloads itself)."""
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


def config_hash(lsv: LlamaServe, adapters: list[ResolvedAdapter], files: dict[str, str]) -> str:
    return digest({"adapters": [asdict(a) | {"s3": None} for a in adapters], "files": files,
                   "runtime": lsv.spec.runtime})[:16]


# ---------------------------------------------------------------- the pod


def _env(lsv: LlamaServe, server: Server) -> list[dict[str, Any]]:
    spec = lsv.spec
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": HF_HOME}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.hf_token_secret_ref is not None:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref.name, spec.hf_token_secret_ref.key))
    return env + server.env


def _probes(lsv: LlamaServe, server: Server) -> dict[str, Any]:
    """Liveness and readiness start only once the startup probe passed, so a slow loader is never killed."""
    return {
        "startupProbe": {**copy.deepcopy(server.startup), "periodSeconds": STARTUP_PERIOD_SECONDS,
                         "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(lsv.spec.startup_timeout_seconds / STARTUP_PERIOD_SECONDS)},
        "readinessProbe": {"httpGet": dict(server.health), "periodSeconds": 5, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        # A wedged engine answers 503; a busy one still answers: restart after ~1.5 min of failures.
        "livenessProbe": {"httpGet": dict(server.health), "periodSeconds": 15, "timeoutSeconds": 10,
                          "failureThreshold": 6},
    }


def _resources(lsv: LlamaServe) -> dict[str, Any]:
    amounts = cpu_memory(lsv.spec.resources)
    gpus = runtime_of(lsv).gpus(lsv)
    if gpus:
        amounts = {**amounts, GPU: str(gpus)}
    return {"requests": amounts, "limits": dict(amounts)} if amounts else {}


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


def _s3_fetch(adapters: list[ResolvedAdapter], settings: Settings) -> list[dict[str, Any]]:
    """One init container per s3:// adapter: `aws s3 sync` into the shared emptyDir (idempotent on restart)."""
    out = []
    for i, a in enumerate(x for x in adapters if x.uri.startswith("s3://")):
        creds = a.s3 or S3Credentials()
        cmd = ["aws", "s3", "sync", "--only-show-errors", a.uri.rstrip("/") + "/", f"{S3_ADAPTER_ROOT}/{a.name}/"]
        if creds.endpoint:
            cmd[2:2] = ["--endpoint-url", creds.endpoint]
        env: list[dict[str, Any]] = []
        if creds.secret:
            env += [secret_env("AWS_ACCESS_KEY_ID", creds.secret, "AWS_ACCESS_KEY_ID"),
                    secret_env("AWS_SECRET_ACCESS_KEY", creds.secret, "AWS_SECRET_ACCESS_KEY")]
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


def _volumes(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings, server: Server) -> _Volumes:
    spec, runtime = lsv.spec, runtime_of(lsv)
    vols = _Volumes()
    cache_claim = spec.model_cache_pvc or settings.model_cache_pvc
    vols.volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache_claim}}
                        if cache_claim else {"name": "model-cache", "emptyDir": {}})
    vols.mounts.append({"name": "model-cache", "mountPath": runtime.cache_dir})
    vols.volumes += server.volumes
    vols.mounts += server.mounts
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
    if server.files:
        volume = runtime.config_suffix
        vols.volumes.append({"name": volume, "configMap": {"name": names(lsv)["config"]}})
        vols.mounts.append({"name": volume, "mountPath": runtime.config_dir, "readOnly": True})
    return vols


def _deployment(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings,
                server: Server) -> dict[str, Any]:
    spec, res = lsv.spec, lsv.spec.resources
    runtime = runtime_of(lsv)
    vols = _volumes(lsv, adapters, settings, server)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or runtime.image(settings),
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": server.command,
        **({"args": server.args} if server.args is not None else {}),
        "env": _env(lsv, server),
        "ports": [{"name": "http", "containerPort": runtime.port(lsv), "protocol": "TCP"}],
        "resources": _resources(lsv),
        "volumeMounts": vols.mounts,
        **_probes(lsv, server),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # The official vLLM and Ollama images run as root and write caches under $HOME
        # (torch.compile, Triton, FlashInfer; Ollama's model store): runAsNonRoot and a
        # read-only root filesystem break them. What is left is still "restricted"-minded:
        # no privilege escalation, no capabilities, the runtime's seccomp profile.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    nodes, tols = node_placement(res, runtime.gpus(lsv), settings.dev_node)
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": vols.volumes,
        "tolerations": tols,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,  # a Service named "vllm" would otherwise set VLLM_PORT and confuse vLLM
        # The server needs no API access: the namespace's default ServiceAccount token is not mounted.
        "automountServiceAccountToken": False,
    }
    init = _s3_fetch(adapters, settings)
    if init:
        pod["initContainers"] = init
    if nodes:
        pod["nodeSelector"] = nodes
    pod.update(pod_options(res, spec.image_pull_secrets))
    sel = selector(lsv)
    pod_annotations = {
        ANNOTATION_CONFIG_HASH: config_hash(lsv, adapters, server.files),
        ANNOTATION_ADAPTERS: ",".join(a.name for a in adapters),
        **server.annotations,
    }
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


# ---------------------------------------------------------------- the other children


def service(lsv: LlamaServe) -> dict[str, Any]:
    port = runtime_of(lsv).port(lsv)
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(lsv, names(lsv)["service"], COMPONENT),
            "spec": {"type": "ClusterIP", "selector": selector(lsv),
                     "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]}}


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


def network_policy(lsv: LlamaServe) -> dict[str, Any]:
    """Into the serving pods, only the server's port (from anywhere: clients live in other namespaces)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(lsv, names(lsv)["deployment"], COMPONENT),
            "spec": {"podSelector": {"matchLabels": selector(lsv)}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"port": runtime_of(lsv).port(lsv), "protocol": "TCP"}]}]}}


# ---------------------------------------------------------------- everything


def workload(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings) -> ServeWorkload:
    """All children of a LlamaServe. Raises ServeError when the adapters cannot be served together."""
    runtime = runtime_of(lsv)
    ctx = ServeContext(adapters=adapters, adapter_paths={a.name: adapter_path(a) for a in adapters},
                       model_path=model_path(lsv), config_dir=runtime.config_dir)
    server = runtime.server(lsv, ctx)
    config_maps = []
    if server.files:
        config_maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": _meta(lsv, names(lsv)["config"], COMPONENT), "data": dict(server.files)})
    return ServeWorkload(deployment=_deployment(lsv, adapters, settings, server), service=service(lsv),
                         config_maps=config_maps, pdb=pdb(lsv), hpa=hpa(lsv),
                         network_policy=network_policy(lsv) if settings.network_policies else None)


def deployment(lsv: LlamaServe, adapters: list[ResolvedAdapter], settings: Settings) -> dict[str, Any]:
    """The Deployment alone (`workload` builds it with the rest)."""
    return workload(lsv, adapters, settings).deployment
