"""The training workload builders, by value."""

from __future__ import annotations

import math
import re

import yaml
from api_cases import example
from llamaops.api import LlamaFineTune
from llamaops.api.contract import ENV_STOP_TIMEOUT
from llamaops.api.finetune import FineTuneStatus, Progress
from llamaops.api.manifests import load_all
from llamaops.builders.finetune import (
    MAX_TERMINATION_GRACE_SECONDS,
    SAVE_SECONDS,
    STEP_MARGIN,
    STOP_SLACK_SECONDS,
    TERMINATION_GRACE_SECONDS,
    Names,
    spec_document,
    workload,
)
from llamaops.builders.naming import MAX_JOB_NAME, child_name
from llamaops.queue import Placement, PolicyConfig, QueuedRun, create
from llamaops.settings import Settings


def lft(name: str = "llama31-8b-lora", base: str = "llama-3.1-8b-lora.yaml", **resources) -> LlamaFineTune:
    doc = example(base)
    doc["metadata"].update(name=name, namespace="team-a", uid="uid-1", generation=3,
                           labels={"app.kubernetes.io/instance": "argo-app"})
    doc["spec"]["resources"].update(resources)
    return LlamaFineTune.model_validate(doc)


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def test_names_are_deterministic_and_fit_kubernetes_limits() -> None:
    assert Names.of("run") == Names("run-spec", "run-trainer", "run-train", "run-report")
    long = "x" * 80
    names = Names.of(long)
    assert len(names.job) <= MAX_JOB_NAME and len(names.spec) <= 63 and names == Names.of(long)
    assert child_name(long, "train") != child_name(long + "y", "train")


def test_single_node_run_is_standalone_torchrun() -> None:
    w = workload(lft(), Settings(), Placement(nodes=("gpu-node-0",)))
    ctr = pod(w.job)["containers"][0]
    assert ctr["args"][:3] == ["--nnodes=1", "--nproc-per-node=1", "--standalone"]
    assert ctr["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert pod(w.job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchFields"][0] == {"key": "metadata.name", "operator": "In", "values": ["gpu-node-0"]}
    assert "podAntiAffinity" not in pod(w.job)["affinity"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(w.job)["tolerations"]


def test_multi_node_run_rendezvous_through_pod_zero() -> None:
    w = workload(lft(nodes=2, gpusPerNode=8), Settings(), Placement(nodes=("a", "b")))
    job = w.job
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    args = pod(job)["containers"][0]["args"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert "--master-addr=llama31-8b-lora-train-0.llama31-8b-lora-train" in args
    assert pod(job)["subdomain"] == w.service["metadata"]["name"] == "llama31-8b-lora-train"
    assert w.service["spec"]["clusterIP"] == "None" and w.service["spec"]["publishNotReadyAddresses"]
    anti = pod(job)["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    # The nodes admission counted the GPUs on, by name: one term each (a node field selector takes one value).
    terms = pod(job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [n]}]} for n in "ab"]


def test_cpu_run_requests_no_gpus_and_tolerates_nothing_extra() -> None:
    w = workload(lft("tiny", "tiny-llama-cpu.yaml"), Settings(), Placement())
    p = pod(w.job)
    assert p["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                               "limits": {"cpu": "2", "memory": "4Gi"}}
    assert "tolerations" not in p and "affinity" not in p and "nodeSelector" not in p
    # The model and the dataset share the demo claim with the output: mounted once, writable.
    claims = [v for v in p["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "llamaops-demo"}}]


def test_children_are_owned_and_never_carry_the_parents_labels() -> None:
    w = workload(lft(), Settings(), Placement())
    for obj in w.in_creation_order():
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaFineTune",
                                            "name": "llama31-8b-lora", "uid": "uid-1", "controller": True,
                                            "blockOwnerDeletion": True}]
        assert "app.kubernetes.io/instance" not in meta["labels"]
        assert meta["labels"]["llamaops.io/finetune"] == "llama31-8b-lora"
    assert [o["kind"] for o in w.in_creation_order()][-1] == "Job"


def test_trainer_role_reaches_only_its_report() -> None:
    """The pod writes its progress and adapter into its report ConfigMap and nothing else: not its run's status."""
    w = workload(lft(), Settings(), Placement())
    assert w.role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                                "resourceNames": ["llama31-8b-lora-report"], "verbs": ["get", "patch"]}]
    assert w.report["metadata"]["name"] == "llama31-8b-lora-report" and "data" not in w.report
    assert w.report["metadata"]["labels"]["app.kubernetes.io/component"] == "report"
    env = {e["name"]: e.get("value") for e in pod(w.job)["containers"][0]["env"]}
    assert env["LLAMAOPS_REPORT"] == "llama31-8b-lora-report"
    assert [m["kind"] for m in w.in_creation_order()][-1] == "Job"
    assert w.role_binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama31-8b-lora-trainer",
                                           "namespace": "team-a"}]
    assert pod(w.job)["serviceAccountName"] == "llama31-8b-lora-trainer"


def test_pod_is_restricted_and_keeps_tokens_in_secrets() -> None:
    p = pod(workload(lft(), Settings(), Placement()).job)
    ctr = p["containers"][0]
    assert p["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    assert ctr["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                      "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    token = next(e for e in ctr["env"] if e["name"] == "HF_TOKEN")
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in p["volumes"]


def test_kueue_placement_suspends_the_job_with_the_queue_label() -> None:
    kueue = create("kueue", PolicyConfig(default_queue="default"))
    placement = kueue.submission(QueuedRun("ml/run", 0, 0.0, queue_name="team-a-queue"))
    job = workload(lft(), Settings(), placement).job
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    assert "affinity" not in pod(job)


def test_spec_configmap_spells_out_every_default() -> None:
    cm = workload(lft(), Settings(trainer_image="registry.local/trainer:1"), Placement()).config_map
    doc = yaml.safe_load(cm["data"]["spec.yaml"])
    assert doc["metadata"] == {"name": "llama31-8b-lora", "namespace": "team-a", "generation": 3}
    assert doc["spec"]["training"]["save_steps"] == 100 and doc["spec"]["quantization"]["load_in_4bit"] is False


def test_image_override_and_adapter_location() -> None:
    w = workload(lft(), Settings(trainer_image="registry.local/trainer:1"), Placement())
    assert pod(w.job)["containers"][0]["image"] == "registry.local/trainer:1"
    assert lft().adapter_uri() == "pvc://adapters/team-a/llama31-8b-lora/adapter"


def test_demo_mode_sends_the_gang_to_the_dev_node_on_cpu() -> None:
    """LLAMAOPS_DEV_NODE: every pod on the dev node (its taint tolerated), no GPUs, one CPU process per pod."""
    settings = Settings.from_env({"LLAMAOPS_DEV_NODE": "local-cpu"})
    assert settings.dev_node == "local-cpu" and Settings.from_env({}).dev_node is None
    w = workload(lft(nodes=2, gpusPerNode=8, gpuProduct="NVIDIA-H100-80GB-HBM3"), settings,
                 Placement(nodes=("local-cpu",)))
    p = pod(w.job)
    ctr = p["containers"][0]
    assert p["nodeSelector"] == {"kubernetes.io/hostname": "local-cpu"}
    assert p["tolerations"] == [{"key": "llamaops.io/dev-node", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nvidia.com/gpu" not in str(ctr["resources"])
    assert "affinity" not in p  # both pods of the gang share the one dev node
    assert ctr["args"][:2] == ["--nnodes=2", "--nproc-per-node=1"]
    assert "--master-addr=llama31-8b-lora-train-0.llama31-8b-lora-train" in ctr["args"]
    # The dev node's agent registers exactly the taint and label the builder tolerates and selects.
    from llamaops.builders.scheduling import DEV_NODE_KEY, DEV_NODE_TOLERATION
    from llamaops_dev.devnode import NODE_LABEL, NODE_TAINT

    assert NODE_LABEL == DEV_NODE_KEY and NODE_TAINT["key"] == DEV_NODE_TOLERATION["key"]
    assert NODE_TAINT["effect"] == DEV_NODE_TOLERATION["effect"]


def test_names_users_pick_make_valid_services_and_hostnames() -> None:
    """`8b-lora` and `llama3.1-lora` are legal object names but not DNS labels: the Job (pod hostnames) and its
    headless Service get a DNS-1035 name, distinct for distinct runs, and the same one every time."""
    label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    names = {n: workload(lft(n), Settings(), Placement()) for n in ("8b-lora", "llama3.1-lora", "llama3-1-lora")}
    for w in names.values():
        service = w.service["metadata"]["name"]
        assert label.match(service) and len(service) <= 63, service
        assert w.job["metadata"]["name"] == service == pod(w.job)["subdomain"]
        assert label.match(f"{w.job['metadata']['name']}-0") and len(w.job["metadata"]["name"]) <= MAX_JOB_NAME
    assert len({w.service["metadata"]["name"] for w in names.values()}) == 3
    assert Names.of("8b-lora") == Names.of("8b-lora") and Names.of("run").job == "run-train"


def test_the_spec_document_reads_back_as_written() -> None:
    """A string YAML would read as a number (a system prompt "1e5", a revision "1e5") stays a string for the
    trainer: its own config code reads the document the Job mounts."""
    from llamaops_trainer.config import parse_spec

    run = lft()
    run.spec.system_prompt = "1e5"
    run.spec.model.revision = "2e10"
    doc = yaml.safe_load(spec_document(run))  # what a reader without our resolver sees: still strings
    assert doc["spec"]["systemPrompt"] == "1e5"
    parsed = parse_spec(load_all(spec_document(run))[0])
    assert parsed.spec.system_prompt == "1e5" and parsed.spec.model.revision == "2e10"


def test_only_the_gang_itself_reaches_its_pods() -> None:
    """The rendezvous port and NCCL's (any port) are open to the run's own pods only."""
    w = workload(lft(nodes=2, gpusPerNode=8), Settings(), Placement(nodes=("a", "b")))
    gang = {"llamaops.io/finetune": "llama31-8b-lora", "app.kubernetes.io/component": "trainer"}
    assert w.network_policy["spec"] == {"podSelector": {"matchLabels": gang}, "policyTypes": ["Ingress"],
                                        "ingress": [{"from": [{"podSelector": {"matchLabels": gang}}]}]}
    assert gang.items() <= w.job["spec"]["template"]["metadata"]["labels"].items()
    assert [m["kind"] for m in w.in_creation_order()][-2:] == ["NetworkPolicy", "Job"]
    assert workload(lft(), Settings(network_policies=False), Placement()).network_policy is None


def test_a_download_credential_reaches_the_trainer_from_its_secret_only() -> None:
    run = lft()
    run.spec.dataset = run.spec.dataset.model_validate({"http": {"url": "https://data.example/chat.jsonl",
                                                                 "authSecretRef": {"name": "dl", "key": "auth"}}})
    env = pod(workload(run, Settings(), Placement()).job)["containers"][0]["env"]
    assert {"name": "LLAMAOPS_HTTP_AUTHORIZATION", "valueFrom": {"secretKeyRef": {"name": "dl", "key": "auth"}}} in env


def _stop(job: dict) -> tuple[int, int]:
    """(terminationGracePeriodSeconds, $LLAMAOPS_STOP_TIMEOUT_SECONDS) of a Job's pods."""
    p = pod(job)
    env = {e["name"]: e.get("value") for e in p["containers"][0]["env"]}
    return p["terminationGracePeriodSeconds"], int(env[ENV_STOP_TIMEOUT])


def measured(step_seconds: float | None) -> LlamaFineTune:
    run = lft()
    run.status = FineTuneStatus(progress=Progress(step=7, step_seconds=step_seconds))
    return run


def test_stop_grace_is_the_default_until_a_step_time_is_measured() -> None:
    assert _stop(workload(lft(), Settings(), Placement()).job) == (
        TERMINATION_GRACE_SECONDS, TERMINATION_GRACE_SECONDS - STOP_SLACK_SECONDS)
    assert _stop(workload(measured(None), Settings(), Placement()).job)[0] == TERMINATION_GRACE_SECONDS
    # A fast step never shortens it below the default.
    assert _stop(workload(measured(2.5), Settings(), Placement()).job)[0] == TERMINATION_GRACE_SECONDS


def test_stop_grace_covers_a_measured_slow_step_and_its_save() -> None:
    """A 70B step of 130 s: the grace covers it 1.5 times plus the save; the trainer stops 15 s before SIGKILL."""
    grace, timeout = _stop(workload(measured(130.0), Settings(), Placement()).job)
    assert grace == math.ceil(130 * STEP_MARGIN + SAVE_SECONDS) == 255
    assert timeout == grace - STOP_SLACK_SECONDS and 130 < timeout < grace
    # Whatever a pod reports, a node is not held past the cap.
    assert _stop(workload(measured(1e9), Settings(), Placement()).job)[0] == MAX_TERMINATION_GRACE_SECONDS


def test_a_run_read_from_the_server_keeps_its_measured_step_for_the_builder() -> None:
    from llamaops.handlers.workload import parse

    body = {**example("llama-3.1-8b-lora.yaml"), "status": {
        "phase": "Running", "kopf": {"progress": {}}, "conditions": [],
        "progress": {"step": 40, "stepSeconds": 90, "updatedAt": "2026-01-01T00:00:00Z"}}}
    body["metadata"].update(namespace="team-a", uid="uid-1")
    run = parse(body)
    assert run.status is not None and run.status.progress is not None and run.status.progress.step_seconds == 90
    assert run.status.phase is None  # the rest of the status is the operator's, read elsewhere
    assert _stop(workload(run, Settings(), Placement()).job)[0] == 90 * STEP_MARGIN + SAVE_SECONDS
    body["status"]["progress"] = {"step": "garbage"}
    assert parse(body).status is None


def _tmp_limit(run: LlamaFineTune) -> str:
    [tmp] = [v for v in pod(workload(run, Settings(), Placement()).job)["volumes"] if v["name"] == "tmp"]
    return tmp["emptyDir"]["sizeLimit"]


def test_the_staging_tmp_is_bounded_by_what_the_run_keeps_there() -> None:
    """(save_total_limit + 1) checkpoints at 12 bytes per trainable parameter, adapter copies, room for data."""
    run = lft()  # Llama 3.1 8B, r=32 on all seven projections: 84 M trainable parameters, 1.0 GB a checkpoint
    assert _tmp_limit(run) == "20Gi"  # the floor: 4 checkpoints + 2 adapters (4.4 GiB) + 10 GiB of data
    run.spec.training.save_total_limit = 40
    assert _tmp_limit(run) == "50Gi"  # 41 checkpoints (38.5 GiB) + 2 adapters (0.6 GiB), rounded up, + 10 GiB
    run.spec.model.base_model = "pvc://models/unknown"
    assert _tmp_limit(run) == "100Gi"  # a model the catalog does not know: no estimate


def test_tracking_credentials_come_from_their_secret_whole() -> None:
    run = lft()
    assert "envFrom" not in pod(workload(run, Settings(), Placement()).job)["containers"][0]
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"].update(name="tracked", namespace="team-a", uid="u")
    doc["spec"]["training"]["report_to"] = ["wandb", "tensorboard"]
    doc["spec"]["trackingSecretRef"] = {"name": "wandb"}
    tracked = LlamaFineTune.model_validate(doc)
    ctr = pod(workload(tracked, Settings(), Placement()).job)["containers"][0]
    assert ctr["envFrom"] == [{"secretRef": {"name": "wandb"}}]
    assert not any(e.get("name", "").startswith("WANDB") for e in ctr["env"])  # no value inlined in the Job
