"""The training workload of one LlamaFineTune, as manifests.

    ConfigMap <name>-spec        the spec the trainer reads
    ConfigMap <name>-report      the one object the trainer writes: its progress and saved adapter
    ServiceAccount/Role/Binding  <name>-trainer: may get and patch only the report ConfigMap
    Service <job>                headless: pod 0 is the torchrun master, <job>-0.<job>
    Job <name>-train             Indexed, one pod per node, torchrun per pod
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llamaops.api import LlamaFineTune
from llamaops.api.constants import (
    ANNOTATION_PLACEMENT,
    COMPONENT_REPORT,
    COMPONENT_TRAINER,
    HOSTNAME_LABEL,
    KIND_FINETUNE,
    LABEL_COMPONENT,
)
from llamaops.api.contract import (
    ENV_HTTP_AUTHORIZATION,
    ENV_NAME,
    ENV_NAMESPACE,
    ENV_REPORT,
    ENV_SPEC,
    ENV_STOP_TIMEOUT,
    HF_HOME,
    NON_RETRYABLE_EXIT_CODES,
    PVC_ROOT,
    SPEC_PATH,
    digest,
    parse_pvc_uri,
    pvc_path,
    spec_hash,
)
from llamaops.api.manifests import dump
from llamaops.builders.naming import (
    ANNOTATION_RUN_HASH,
    ANNOTATION_SPEC_HASH,
    LABEL_FINETUNE,
    MAX_JOB_NAME,
    child_name,
    dns_label,
    label_value,
    labels,
    metadata,
)
from llamaops.builders.scheduling import GPU, cpu_memory, node_placement, pod_options, secret_env
from llamaops.queue.policy import Placement
from llamaops.settings import Settings
from llamaops.state.finetune import run_hash

KIND = KIND_FINETUNE
CONTAINER = COMPONENT_TRAINER
MASTER_PORT = 29500
TRAINER_UID = 1000
# Time for the trainer to finish its step and write a checkpoint after SIGTERM (Kubernetes' default is 30 s):
# at least this, more once the run has reported its step time (status.progress.stepSeconds, the slowest step).
TERMINATION_GRACE_SECONDS = 120
STEP_MARGIN = 1.5  # the measured step, and half again: steps vary (sequence lengths, a slower node)
SAVE_SECONDS = 60  # writing and syncing the checkpoint, the last report, the exit
MAX_TERMINATION_GRACE_SECONDS = 3600  # what a report (written by the pod) can make a node wait for, at most
# Between the launcher's stop timeout and the kubelet's SIGKILL: the launcher kills what is left and exits
# with a contract code and a termination message.
STOP_SLACK_SECONDS = 15
# The pod's /tmp (staging_limit): at least this, data included; a model the catalog does not know gets the
# second (its size is unknown here).
STAGING_MIN_GI, STAGING_DATA_GI, STAGING_UNKNOWN_GI = 20, 10, 100
# The fixed part of the trainer's environment (`llamaops run --local` sets it too).
TRAINER_ENV = {"PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


@dataclass(frozen=True)
class Names:
    spec: str
    account: str
    job: str
    report: str

    @classmethod
    def of(cls, name: str) -> Names:
        # The Job names its pods' hostnames and its headless Service: a DNS label, whatever the run's name.
        return cls(child_name(name, "spec"), child_name(name, "trainer"),
                   child_name(dns_label(name), "train", MAX_JOB_NAME), child_name(name, COMPONENT_REPORT))


@dataclass
class Workload:
    config_map: dict[str, Any]
    service_account: dict[str, Any]
    role: dict[str, Any]
    role_binding: dict[str, Any]
    service: dict[str, Any]
    job: dict[str, Any]
    report: dict[str, Any]
    network_policy: dict[str, Any] | None = None

    def in_creation_order(self) -> list[dict[str, Any]]:
        """The Job last, so its pods find everything they mount and use."""
        return [self.config_map, self.report, self.service_account, self.role, self.role_binding, self.service,
                *(x for x in (self.network_policy,) if x), self.job]


def _meta(lft: LlamaFineTune, name: str, component: str, **kw: Any) -> dict[str, Any]:
    m = lft.metadata
    return metadata(name, m.namespace or "default", KIND, m.name or "", m.uid or "",
                    labels(LABEL_FINETUNE, m.name or "", component), **kw)


def spec_document(lft: LlamaFineTune) -> str:
    """The manifest the trainer reads: every default spelled out, nothing but metadata and spec."""
    doc = {
        "apiVersion": lft.api_version, "kind": KIND,
        "metadata": {"name": lft.metadata.name, "namespace": lft.metadata.namespace,
                     "generation": lft.metadata.generation},
        "spec": lft.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return dump(doc)


def _claims(lft: LlamaFineTune) -> dict[str, bool]:
    """Claim -> read-only? The output claim is writable; model and dataset claims are read-only."""
    claims: dict[str, bool] = {}
    spec = lft.spec
    if spec.model.base_model.startswith("pvc://"):
        claims[parse_pvc_uri(spec.model.base_model)[0]] = True
    if spec.dataset.pvc is not None:
        claims.setdefault(spec.dataset.pvc.claim_name, True)
    if spec.output.pvc is not None:
        claims[spec.output.pvc.claim_name] = False
    return claims


def termination_grace(lft: LlamaFineTune) -> int:
    """The pods' terminationGracePeriodSeconds: a step and a save, from the step time the run has reported."""
    progress = lft.status.progress if lft.status is not None else None
    step = progress.step_seconds if progress is not None else None
    if not step:
        return TERMINATION_GRACE_SECONDS
    needed = math.ceil(step * STEP_MARGIN + SAVE_SECONDS)
    return min(MAX_TERMINATION_GRACE_SECONDS, max(TERMINATION_GRACE_SECONDS, needed))


def staging_limit(lft: LlamaFineTune) -> str:
    """sizeLimit of the pod's /tmp: S3 runs stage their checkpoints and adapter there (and every run its
    downloaded datasets). (save_total_limit + 1) checkpoints, as rotation runs once a new one is whole, each
    about 12 bytes per trainable parameter (fp32 weights and Adam state), two adapter copies and PiSSA/OLoRA's
    initial one at 4 bytes, plus room for data: a kubelet evicts a pod that outgrows it."""
    from llamaops.api import catalog
    from llamaops.api.memory import lora_parameters

    spec = lft.spec
    known = catalog.lookup(spec.model.base_model)
    if known is None:
        return f"{STAGING_UNKNOWN_GI}Gi"
    params = lora_parameters(known.arch, spec.lora.exported_rank, spec.lora.target_modules)
    if spec.lora.modules_to_save and "lm_head" in spec.lora.modules_to_save:
        params += known.arch.vocab * known.arch.hidden
    copies = 2 + (1 if spec.lora.init_lora_weights in ("pissa", "olora") else 0)
    needed = (spec.training.save_total_limit + 1) * params * 12 + copies * params * 4
    return f"{max(STAGING_MIN_GI, math.ceil(needed / 2**30) + STAGING_DATA_GI)}Gi"


def stop_timeout(grace: int) -> int:
    """$LLAMAOPS_STOP_TIMEOUT_SECONDS: the workers' time to stop, inside the grace period."""
    return grace - STOP_SLACK_SECONDS


def _env(lft: LlamaFineTune, names: Names) -> list[dict[str, Any]]:
    spec = lft.spec
    env: list[dict[str, Any]] = [
        {"name": ENV_NAME, "value": lft.metadata.name},
        {"name": ENV_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": ENV_REPORT, "value": names.report},
        {"name": ENV_SPEC, "value": SPEC_PATH},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": ENV_STOP_TIMEOUT, "value": str(stop_timeout(termination_grace(lft)))},
        *({"name": k, "value": v} for k, v in TRAINER_ENV.items()),
    ]
    if spec.hf_token_secret_ref is not None:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref.name, spec.hf_token_secret_ref.key))
    auth = spec.dataset.http.auth_secret_ref if spec.dataset.http is not None else None
    if auth is not None:
        env.append(secret_env(ENV_HTTP_AUTHORIZATION, auth.name, auth.key))
    s3 = spec.dataset.s3 or spec.output.s3
    for loc in (spec.dataset.s3, spec.output.s3):
        if loc is not None and loc.credentials_secret is not None:
            env += [secret_env("AWS_ACCESS_KEY_ID", loc.credentials_secret.name, "AWS_ACCESS_KEY_ID"),
                    secret_env("AWS_SECRET_ACCESS_KEY", loc.credentials_secret.name, "AWS_SECRET_ACCESS_KEY")]
            break
    if s3 is not None and s3.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": s3.region})
    return env


def launch_command(python: str = "python") -> list[str]:
    """torchrun, wrapped so a rank's exit code (bad config, bad data) survives as the pod's."""
    return [python, "-m", "llamaops_trainer.launch"]


def torchrun_args(nodes: int, nproc_per_node: int | str, job: str = "", spec_path: str = SPEC_PATH) -> list[str]:
    """The launcher's arguments: standalone on one node; on several, this pod's rank from the Indexed Job
    and pod 0 of `job` (through its headless Service) as the rendezvous master."""
    rdzv = [f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}"]
    if nodes == 1:
        rdzv.append("--standalone")
    else:
        # JOB_COMPLETION_INDEX is set by the Job controller in every pod of an Indexed Job.
        rdzv += ["--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={job}-0.{job}",
                 f"--master-port={MASTER_PORT}"]
    return [*rdzv, "-m", "llamaops_trainer", "--spec", spec_path]


def _resources(lft: LlamaFineTune, gpus: int) -> dict[str, Any]:
    amounts = cpu_memory(lft.spec.resources)
    limits = dict(amounts)
    if gpus:
        limits[GPU] = str(gpus)
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def _affinity(lft: LlamaFineTune, placement: Placement) -> dict[str, Any] | None:
    affinity: dict[str, Any] = {}
    if placement.nodes:
        # Exactly the nodes the queue counted the GPUs on, by their names (a node's hostname label may differ);
        # a node field selector takes one value, so one term (ORed) per node.
        affinity["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
            for node in sorted(placement.nodes)]}}
    if lft.spec.resources.nodes > 1:
        affinity["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {LABEL_FINETUNE: label_value(lft.metadata.name or "")}},
            "topologyKey": HOSTNAME_LABEL}]}
    return affinity or None


def _pod_spec(lft: LlamaFineTune, names: Names, settings: Settings, placement: Placement) -> dict[str, Any]:
    spec, res = lft.spec, lft.spec.resources
    claims = _claims(lft)
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": names.spec}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": staging_limit(lft)}},
        {"name": "hf-cache", "persistentVolumeClaim": {"claimName": settings.model_cache_pvc}}
        if settings.model_cache_pvc else {"name": "hf-cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": SPEC_PATH.rsplit("/", 1)[0], "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "hf-cache", "mountPath": HF_HOME},
    ]
    for i, (claim, read_only) in enumerate(sorted(claims.items())):
        ro = {"readOnly": True} if read_only else {}
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, **ro}})
        mounts.append({"name": f"pvc-{i}", "mountPath": pvc_path(claim, root=PVC_ROOT), **ro})

    # Demo mode: the dev node runs every pod of the gang as a local process on its CPU (gloo);
    # nothing GPU-shaped would schedule there.
    gpus = 0 if settings.dev_node else res.gpus_per_node
    selector, tols = node_placement(res, gpus, settings.dev_node)

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": launch_command(),
        "args": torchrun_args(res.nodes, max(gpus, 1), names.job),
        "env": _env(lft, names),
        # training.report_to's credentials and server (WANDB_API_KEY, MLFLOW_TRACKING_URI, ...): the whole Secret.
        **({"envFrom": [{"secretRef": {"name": spec.tracking_secret_ref.name}}]} if spec.tracking_secret_ref else {}),
        "ports": [{"name": "rdzv", "containerPort": MASTER_PORT}],
        "resources": _resources(lft, gpus),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": names.account,
        "subdomain": names.job,
        "terminationGracePeriodSeconds": termination_grace(lft),
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID,
                            "fsGroup": TRAINER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if selector:
        pod["nodeSelector"] = selector
    if tols:
        pod["tolerations"] = tols
    affinity = None if settings.dev_node else _affinity(lft, placement)
    if affinity:
        pod["affinity"] = affinity
    pod.update(pod_options(res, spec.image_pull_secrets))
    return pod


def job(lft: LlamaFineTune, settings: Settings, placement: Placement) -> dict[str, Any]:
    names = Names.of(lft.metadata.name or "")
    nodes = lft.spec.resources.nodes
    hashes = {ANNOTATION_SPEC_HASH: spec_hash(lft.spec), ANNOTATION_RUN_HASH: run_hash(lft.spec)}
    # What it was made for: a Job found in its place later is taken only if it is the same one.
    made_for = {ANNOTATION_PLACEMENT: digest({"nodes": sorted(placement.nodes), "labels": dict(placement.labels),
                                              "suspend": placement.suspend})[:16]}
    meta = _meta(lft, names.job, COMPONENT_TRAINER, annotations={**hashes, **made_for})
    template_labels = dict(meta["labels"])
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        # One failed pod fails the Job; the operator restarts the whole gang (NCCL
        # peers of a lost rank cannot carry on) and the trainer resumes from its checkpoint.
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": list(NON_RETRYABLE_EXIT_CODES)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {
            "metadata": {"labels": template_labels, "annotations": hashes},
            "spec": _pod_spec(lft, names, settings, placement),
        },
    }
    if lft.spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = lft.spec.active_deadline_seconds
    # An external queue's labels, on a Job created suspended: its controller starts it (Kueue unsuspends it).
    meta["labels"].update(placement.labels)
    if placement.suspend:
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def workload(lft: LlamaFineTune, settings: Settings, placement: Placement) -> Workload:
    name = lft.metadata.name or ""
    names = Names.of(name)
    ns = lft.metadata.namespace or "default"
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": _meta(lft, names.spec, "spec"),
                  "data": {SPEC_PATH.rsplit("/", 1)[1]: spec_document(lft)}}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(lft, names.account, COMPONENT_TRAINER)}
    # Only its report: the run's status is the operator's alone (a pod could otherwise forge its phase,
    # its restarts, its adapter, or the nodes admission counts as taken).
    report = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(lft, names.report, COMPONENT_REPORT)}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(lft, names.account, COMPONENT_TRAINER),
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names.report],
                       "verbs": ["get", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": _meta(lft, names.account, COMPONENT_TRAINER),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.account},
               "subjects": [{"kind": "ServiceAccount", "name": names.account, "namespace": ns}]}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(lft, names.job, "rendezvous"),
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                        "selector": {LABEL_FINETUNE: label_value(name),
                                     "batch.kubernetes.io/job-name": names.job},
                        "ports": [{"name": "rdzv", "port": MASTER_PORT, "targetPort": MASTER_PORT}]}}
    # Into the training pods only their gang's own traffic: the rendezvous port and NCCL's (any port).
    gang = {LABEL_FINETUNE: label_value(name), LABEL_COMPONENT: COMPONENT_TRAINER}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": _meta(lft, names.job, "rendezvous"),
              "spec": {"podSelector": {"matchLabels": gang}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": gang}}]}]}}
    return Workload(config_map, account, role, binding, service, job(lft, settings, placement), report,
                    policy if settings.network_policies else None)
