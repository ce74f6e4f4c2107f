"""The operator on a real API server with simulated GPU nodes: lifecycle, queue, workload, failures."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from llamaops.api import LlamaFineTune
from llamaops.api.contract import spec_hash
from operator_fixtures import (
    Cluster,
    OperatorProcess,
    claim_volumes,
    cluster_for_test,
    crd_namespace,
    gpu_pods_gone,
    running_operator,
    wait_until,
)

pytestmark = pytest.mark.cluster
H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="module")
def ops_ns(kubectl) -> Iterator[str]:
    with crd_namespace(kubectl, "ops") as name:
        yield name


@pytest.fixture(scope="module")
def operator(ops_ns: str, kubeconfig: Path, kubectl, tmp_path_factory) -> Iterator[OperatorProcess]:
    gpu_pods_gone(kubectl)
    with running_operator(kubeconfig, tmp_path_factory.mktemp("operator"), ops_ns) as proc:
        yield proc


@pytest.fixture(scope="module")
def volumes(ops_ns: str, kubectl, tmp_path_factory) -> Path:
    return claim_volumes(kubectl, ops_ns, tmp_path_factory)


@pytest.fixture
def c(operator: OperatorProcess, ops_ns: str, kubectl, volumes: Path, request) -> Iterator[Cluster]:
    with cluster_for_test(operator, Cluster(kubectl, ops_ns, volumes), request) as cluster:
        yield cluster

def _args(job: dict) -> list[str]:
    return job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_run_is_admitted_with_its_whole_workload(c: Cluster) -> None:
    c.run("one", gpus=2)
    status = c.wait_phase("one", "Running")
    assert status["assignedNodes"] and status["assignedNodes"][0].startswith("gpu-node-")
    conditions = {x["type"]: x["status"] for x in status["conditions"]}
    assert conditions.items() >= {"Valid": "True", "Admitted": "True", "Queued": "False", "Running": "True"}.items()
    job = c.job("one")
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("LlamaFineTune", "one", True)
    assert owner["uid"] == c.get("lft", "one")["metadata"]["uid"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 1, 1, 0)
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [64, 65]
    pod = spec["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["command"] == ["python", "-m", "llamaops_trainer.launch"]
    assert _args(job) == ["--nnodes=1", "--nproc-per-node=2", "--standalone", "-m", "llamaops_trainer",
                          "--spec", "/etc/llamaops/spec.yaml"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2"
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/mnt/pvc/training-data"]["readOnly"] is True and "readOnly" not in mounts["/mnt/pvc/adapters"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert pod["securityContext"]["runAsNonRoot"] and ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": H100}
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert env["LLAMAOPS_NAME"] == "one" and env["LLAMAOPS_SPEC"] == "/etc/llamaops/spec.yaml"
    # The spec the trainer reads, every default spelled out.
    cm = c.get("configmap", "one-spec")
    spec_doc = yaml.safe_load(cm["data"]["spec.yaml"])
    assert spec_doc["spec"]["lora"]["r"] == 32 and spec_doc["spec"]["training"]["optim"] == "adamw_torch"
    # The trainer may read and patch only this object's status.
    role = c.get("role", "one-trainer")
    assert {tuple(r["resources"]): r["resourceNames"] for r in role["rules"]} == {("configmaps",): ["one-report"]}
    assert c.get("service", "one-train")["spec"]["clusterIP"] == "None"
    # GitOps tracking labels of the parent never reach the children.
    for kind, name in [("job", "one-train"), ("configmap", "one-spec"), ("service", "one-train")]:
        assert "app.kubernetes.io/instance" not in c.get(kind, name)["metadata"]["labels"]
    assert c.pods("one")[0]["spec"]["nodeName"] == status["assignedNodes"][0]
    assert any(e["reason"] == "Admitted" for e in c.events("one"))


def test_invalid_spec_fails_naming_every_field_and_creates_nothing(c: Cluster) -> None:
    c.run("too-big", "llama-3.3-70b-qlora.yaml", gpus=1,
          resources={"gpusPerNode": 1, "gpuProduct": "NVIDIA-L4"},
          lora={"r": 16, "lora_alpha": 32, "target_modules": ["q_prj"]})
    status = c.wait_phase("too-big", "Failed")
    valid = next(x for x in status["conditions"] if x["type"] == "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.resources.gpusPerNode" in valid["message"] and "spec.lora.target_modules[0]" in valid["message"]
    assert c.job("too-big") is None and c.get("configmap", "too-big-spec") is None
    wait_until(lambda: any(e["reason"] == "InvalidSpec" for e in c.events("too-big")), "an InvalidSpec event")


def test_queue_orders_by_priority_then_age_and_admits_when_capacity_frees(c: Cluster) -> None:
    whole = c.run("whole-cluster", gpus=8, nodes=2)
    c.wait_phase("whole-cluster", "Running")
    c.run("low-old", gpus=1, priority=0)
    time.sleep(1.1)  # creation timestamps have one-second resolution
    c.run("high-new", gpus=1, priority=5)
    c.run("low-new", gpus=1, priority=0)
    wait_until(lambda: [c.status(n).get("queuePosition") for n in ("high-new", "low-old", "low-new")] == [1, 2, 3],
             "queue positions 1, 2, 3")
    queued = next(x for x in c.status("low-old")["conditions"] if x["type"] == "Queued")
    assert queued["status"] == "True" and "position 2" in queued["message"]
    # The trainer reports what only it knows (a PiSSA export has twice the rank), as its last act.
    adapter = {"r": 64, "baseModel": "meta-llama/Llama-3.1-8B-Instruct",
               "specHash": spec_hash(LlamaFineTune.model_validate(whole).spec)}
    c.kubectl("patch", "-n", c.ns, "configmap", "whole-cluster-report", "--type=merge",
              "-p", json.dumps({"data": {"adapter": json.dumps(adapter)}}))
    c.finish_pods("whole-cluster")
    status = c.wait_phase("whole-cluster", "Succeeded")
    assert status["adapter"]["uri"] == f"pvc://adapters/{c.ns}/whole-cluster/adapter"
    assert status["adapter"]["baseModel"] == "meta-llama/Llama-3.1-8B-Instruct" and status["adapter"]["r"] == 64
    assert status["adapter"]["loraAlpha"] == 64
    for name in ("high-new", "low-old", "low-new"):
        assert c.wait_phase(name, "Running", timeout=15).get("queuePosition") is None


def test_gang_waits_for_whole_nodes_counting_foreign_gpu_pods(c: Cluster) -> None:
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "someone-else"}, "spec": {
        "nodeName": "gpu-node-1", "containers": [{"name": "x", "image": "registry.k8s.io/pause:3.10",
                                                  "resources": {"limits": {"nvidia.com/gpu": 1}}}]}})
    wait_until(lambda: (c.get("pod", "someone-else") or {}).get("status", {}).get("phase") == "Running", "foreign pod")
    c.run("gang", gpus=8, nodes=2)
    c.wait_phase("gang", "Queued")
    status = wait_until(lambda: c.status("gang") if c.status("gang").get("queuePosition") == 1 else None, "position")
    queued = next(x for x in status["conditions"] if x["type"] == "Queued")
    assert "2 nodes with 8 free" in queued["message"] and "8, 7" in queued["message"]
    assert c.job("gang") is None
    c.kubectl("delete", "pod", "-n", c.ns, "someone-else", "--grace-period=0", "--force")
    status = c.wait_phase("gang", "Running", timeout=20)
    assert sorted(status["assignedNodes"]) == ["gpu-node-0", "gpu-node-1"]
    nodes = sorted(p["spec"]["nodeName"] for p in c.pods("gang"))
    assert nodes == ["gpu-node-0", "gpu-node-1"]
    args = _args(c.job("gang"))
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args and "--master-addr=gang-train-0.gang-train" in args


def test_trainer_bad_config_exit_fails_the_run_without_retry(c: Cluster) -> None:
    c.run("bad-data", gpus=1)
    c.wait_phase("bad-data", "Running")
    uid = c.job("bad-data")["metadata"]["uid"]
    c.finish_pods("bad-data", exit_code=65, message="dataset: line 3 has no assistant turn")
    status = c.wait_phase("bad-data", "Failed")
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "TrainerError" and "exit code 65" in failed["message"]
    assert "no assistant turn" in failed["message"]
    assert not status.get("restarts")
    assert c.job("bad-data")["metadata"]["uid"] == uid  # not recreated


def test_infrastructure_failure_restarts_the_whole_gang(c: Cluster) -> None:
    c.run("flaky", gpus=1, maxRestarts=1)
    c.wait_phase("flaky", "Running")
    first = c.job("flaky")["metadata"]["uid"]
    c.finish_pods("flaky", exit_code=1, message="NCCL error: unhandled system error")
    wait_until(lambda: (c.job("flaky") or {}).get("metadata", {}).get("uid") not in (None, first), "a new Job")
    status = wait_until(lambda: c.status("flaky") if c.status("flaky").get("restarts") == 1 else None, "restarts 1")
    assert status["phase"] in ("Admitted", "Running")
    assert any(e["reason"] == "Restarting" for e in c.events("flaky"))
    # The restart budget spent, the next failure fails the run.
    c.wait_phase("flaky", "Running")
    c.finish_pods("flaky", exit_code=1, message="NCCL error again")
    failed = next(x for x in c.wait_phase("flaky", "Failed")["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "RestartsExhausted"


def test_a_trainer_that_checkpointed_and_exited_75_queues_again_and_resumes(c: Cluster) -> None:
    """Exit 75 (the trainer saved a checkpoint: interrupted, or infrastructure trouble): the run gives its GPUs
    back and goes through the queue again (here behind a more urgent run), then resumes on a new Job."""
    c.run("interrupted", gpus=8, nodes=2, maxRestarts=2)
    c.wait_phase("interrupted", "Running")
    first = c.job("interrupted")["metadata"]["uid"]
    c.run("urgent", gpus=8, nodes=2, priority=10)
    c.wait_phase("urgent", "Queued")
    c.finish_pods("interrupted", exit_code=75, message="stopped at step 40 by a termination signal", count=2)
    c.wait_phase("urgent", "Running", timeout=30)  # the GPUs went back to the queue, and its head took them
    queued = c.wait_phase("interrupted", "Queued")
    assert queued["restarts"] == 1 and not queued.get("assignedNodes")
    reason = {x["type"]: x["reason"] for x in queued["conditions"]}
    assert reason["Admitted"] == "Interrupted" and reason["Running"] == "Interrupted"
    wait_until(lambda: c.status("interrupted").get("queuePosition") == 1, "interrupted's queue position")
    assert any(e["reason"] == "Interrupted" and "resumes from its checkpoint" in e["message"]
               for e in c.events("interrupted"))
    c.finish_pods("urgent", count=2)
    status = c.wait_phase("interrupted", "Running", timeout=30)
    assert len(status["assignedNodes"]) == 2 and status["restarts"] == 1
    assert c.job("interrupted")["metadata"]["uid"] != first


def test_suspend_frees_gpus_and_resume_requeues(c: Cluster) -> None:
    c.run("pausable", gpus=8, nodes=2)
    c.wait_phase("pausable", "Running")
    c.run("waiting", gpus=8)
    c.wait_phase("waiting", "Queued")
    c.kubectl("patch", "-n", c.ns, "lft", "pausable", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    c.wait_phase("pausable", "Suspended")
    wait_until(lambda: c.job("pausable") is None, "the Job of the suspended run to go")
    c.wait_phase("waiting", "Running", timeout=20)
    c.kubectl("patch", "-n", c.ns, "lft", "pausable", "--type=merge", "-p", '{"spec": {"suspend": false}}')
    c.wait_phase("pausable", "Queued")
    # The admission loop sets the position just after the phase: wait for it.
    wait_until(lambda: c.status("pausable").get("queuePosition"), "pausable's queue position")
    assert c.status("pausable")["queuePosition"] == 1  # needs two whole nodes; one is busy
    c.finish_pods("waiting")
    c.wait_phase("pausable", "Running", timeout=20)


def test_deleting_a_run_removes_its_workload_and_frees_its_place(c: Cluster) -> None:
    c.run("doomed", gpus=8, nodes=2)
    c.wait_phase("doomed", "Running")
    c.run("next", gpus=8, nodes=2)
    c.wait_phase("next", "Queued")
    c.kubectl("delete", "lft", "-n", c.ns, "doomed")
    wait_until(lambda: c.job("doomed") is None and c.get("configmap", "doomed-spec") is None, "children collected")
    c.wait_phase("next", "Running", timeout=30)


def test_spec_edit_restarts_the_run_cleanly(c: Cluster) -> None:
    doc = c.run("edited", gpus=1)
    c.wait_phase("edited", "Running")
    old = c.job("edited")
    doc["spec"]["training"]["learning_rate"] = 5e-5
    c.apply(doc)
    new = wait_until(lambda: (j := c.job("edited")) and j["metadata"]["uid"] != old["metadata"]["uid"] and j,
                   "a Job for the edited spec")
    key = "llamaops.io/run-hash"
    assert new["metadata"]["annotations"][key] != old["metadata"]["annotations"][key]
    assert yaml.safe_load(c.get("configmap", "edited-spec")["data"]["spec.yaml"])["spec"]["training"][
        "learning_rate"] == 5e-5
    assert any(e["reason"] == "SpecChanged" for e in c.events("edited"))
    # A priority change only reorders the queue: the running Job stays.
    doc["spec"]["queue"]["priority"] = 9
    c.apply(doc)
    c.wait_phase("edited", "Running")
    assert c.job("edited")["metadata"]["uid"] == new["metadata"]["uid"]


def test_operator_restart_creates_no_duplicates_and_keeps_status(c: Cluster, operator: OperatorProcess) -> None:
    c.run("running", gpus=8, nodes=2)
    c.wait_phase("running", "Running")
    c.run("queued", gpus=4)
    c.wait_phase("queued", "Queued")
    job_uid = c.job("running")["metadata"]["uid"]
    before = {n: c.status(n) for n in ("running", "queued")}
    operator.restart(kill=True)
    c.run("late", gpus=1, priority=7)  # handled by the new process
    wait_until(lambda: c.status("late").get("queuePosition") == 1, "the restarted operator to queue a new run")
    assert c.job("running")["metadata"]["uid"] == job_uid
    assert len((c.get("jobs") or {})["items"]) == 1
    after = {n: c.status(n) for n in ("running", "queued")}
    for n in ("running", "queued"):
        for key in ("phase", "runHash", "assignedNodes"):
            assert after[n].get(key) == before[n].get(key), (n, key)
    assert c.status("queued")["queuePosition"] == 2
    assert json.dumps(c.get("lft", "running")["metadata"].get("annotations", {})).count("kopf") == 0
