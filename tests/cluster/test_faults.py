"""The queue and the lifecycle under faults, hostile pods and bad input, on a real API server.

Each test names the defect it proves fixed: what a training pod may write, objects the operator does not own,
lost nodes, pods that never schedule, races between writers, stale status, and input the schema lets through.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def faults_ns(kubectl) -> Iterator[str]:
    with crd_namespace(kubectl, "faults") as name:
        yield name


@pytest.fixture(scope="module")
def operator(faults_ns: str, kubeconfig: Path, kubectl, tmp_path_factory) -> Iterator[OperatorProcess]:
    gpu_pods_gone(kubectl)
    # Stuck pods and NotReady nodes are told after 5 s here (300 s by default).
    with running_operator(kubeconfig, tmp_path_factory.mktemp("operator"), faults_ns, LLAMAOPS_STUCK_AFTER="5",
                          LLAMAOPS_NODE_LOST_AFTER="5") as proc:
        yield proc


@pytest.fixture(scope="module")
def volumes(faults_ns: str, kubectl, tmp_path_factory) -> Path:
    return claim_volumes(kubectl, faults_ns, tmp_path_factory)


@pytest.fixture
def c(operator: OperatorProcess, faults_ns: str, kubectl, volumes: Path, request) -> Iterator[Cluster]:
    with cluster_for_test(operator, Cluster(kubectl, faults_ns, volumes), request) as cluster:
        yield cluster

def can(c: Cluster, account: str, *args: str) -> bool:
    """What the API server's authorizer allows `account` of this namespace (a SubjectAccessReview)."""
    out = c.kubectl("auth", "can-i", *args, "-n", c.ns, f"--as=system:serviceaccount:{c.ns}:{account}", check=False)
    return out.stdout.strip() == "yes"


def report(c: Cluster, name: str, **data: object) -> None:
    c.kubectl("patch", "configmap", "-n", c.ns, f"{name}-report", "--type=merge", "-p",
              json.dumps({"data": {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}}))


# ---------------------------------------------------------------- trust


def test_a_training_pod_writes_its_report_and_nothing_the_operator_trusts(c: Cluster) -> None:
    """Defect 1: the pod could patch its run's whole status (phase, restarts, adapter, assignedNodes: the
    nodes admission counts as taken). Now its Role reaches its report ConfigMap alone, and what it writes
    there is checked before any of it reaches the status."""
    c.run("trusted", gpus=1)
    c.run("neighbour", gpus=1)
    running = c.wait_phase("trusted", "Running")
    c.wait_phase("neighbour", "Running")
    sa = "trusted-trainer"
    assert can(c, sa, "patch", "configmap/trusted-report") and can(c, sa, "get", "configmap/trusted-report")
    assert not can(c, sa, "patch", "llamafinetunes.llamaops.io/trusted", "--subresource=status")
    assert not can(c, sa, "get", "llamafinetunes.llamaops.io/trusted")
    assert not can(c, sa, "patch", "configmap/neighbour-report")
    assert not can(c, sa, "patch", "configmap/trusted-spec")
    assert not can(c, sa, "create", "configmaps")

    # A report full of forgeries: only a well-formed progress reaches the status.
    progress = {"step": 7, "totalSteps": 10, "display": "7/10", "loss": 1.25}
    report(c, "trusted", progress=progress, adapter={"baseModel": "evil", "r": 9999999},
           phase="Succeeded", assignedNodes=["gpu-node-0", "gpu-node-1"])
    status = wait_until(lambda: c.status("trusted") if c.status("trusted").get("progress") == progress else None,
                        "the reported progress in the status")
    assert status["phase"] == "Running" and status["assignedNodes"] == running["assignedNodes"]
    assert not status.get("adapter") and not status.get("restarts")
    report(c, "trusted", progress={"step": -5, "phase": "Succeeded"})  # refused: not a Progress
    c.finish_pods("neighbour")
    c.wait_phase("neighbour", "Succeeded")  # the operator went on acting meanwhile
    assert c.status("trusted")["progress"] == progress
    # The reported adapter was not this spec's: at completion the rank is the one the spec exports.
    c.finish_pods("trusted")
    done = c.wait_phase("trusted", "Succeeded")
    assert done["adapter"]["r"] == 32 and done["adapter"]["baseModel"] == "meta-llama/Llama-3.1-8B-Instruct"


# ---------------------------------------------------------------- nothing adopted, nothing of others deleted


def test_an_object_of_a_childs_name_that_the_run_does_not_control_is_never_adopted(c: Cluster) -> None:
    """Defect 3: server-side apply was forced onto fixed names, so a ServiceAccount <run>-trainer someone made
    was adopted and the Job ran as it. Now the run fails with a Conflict naming the object, which is untouched."""
    c.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "adopt-trainer",
                                                                        "labels": {"team": "theirs"}}})
    c.run("adopt", gpus=1)
    status = c.wait_phase("adopt", "Failed")
    conflict = next(x for x in status["conditions"] if x["type"] == "Conflict")
    assert conflict["status"] == "True" and "ServiceAccount" in conflict["message"] and "adopt-trainer" in conflict[
        "message"]
    assert any(e["reason"] == "Conflict" for e in c.events("adopt"))
    sa = c.get("serviceaccount", "adopt-trainer")
    assert not sa["metadata"].get("ownerReferences") and sa["metadata"]["labels"] == {"team": "theirs"}
    assert c.job("adopt") is None and not status.get("assignedNodes")
    c.kubectl("delete", "serviceaccount", "-n", c.ns, "adopt-trainer")


def test_a_serve_neither_takes_over_nor_deletes_what_it_does_not_control(c: Cluster) -> None:
    """Defect 3: a Service named like a LlamaServe had its selector replaced, and any PodDisruptionBudget,
    autoscaler or ConfigMap of a child's name was deleted. Now the serve reports a Conflict and leaves them."""
    c.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mine"},
             "spec": {"selector": {"app": "mine"}, "ports": [{"port": 80}]}})
    c.apply({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "taken"},
             "spec": {"selector": {"matchLabels": {"app": "theirs"}}, "maxUnavailable": 1}})
    c.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "taken-chat-template"},
             "data": {"keep": "me"}})
    serve = {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe",
             "metadata": {"name": "mine"}, "spec": {"model": {"base_model": "meta-llama/Llama-3.1-8B-Instruct"}}}
    c.apply(serve)
    status = wait_until(lambda: (c.get("lsv", "mine") or {}).get("status") if
                        ((c.get("lsv", "mine") or {}).get("status") or {}).get("phase") == "Failed" else None,
                        "the LlamaServe to fail on the Service it does not control")
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "Conflict" and "Service" in failed["message"]
    assert c.get("service", "mine")["spec"]["selector"] == {"app": "mine"}
    # A serve without a budget or a chat template, whose names are taken: they stay.
    c.apply({**serve, "metadata": {"name": "taken"}})
    wait_until(lambda: ((c.get("lsv", "taken") or {}).get("status") or {}).get("phase") in ("Deploying", "Ready"),
               "the other LlamaServe to deploy")
    assert c.get("pdb", "taken")["spec"]["selector"] == {"matchLabels": {"app": "theirs"}}
    assert c.get("configmap", "taken-chat-template")["data"] == {"keep": "me"}
    c.kubectl("delete", "lsv", "--all", "-n", c.ns, "--wait=true", "--timeout=60s")
    c.kubectl("delete", "service/mine", "pdb/taken", "configmap/taken-chat-template", "-n", c.ns)


# ---------------------------------------------------------------- faults: nothing pinned


@pytest.fixture
def lost_node(c: Cluster) -> Iterator[Callable[[str], None]]:
    """Deletes a simulated node (as when a machine is gone for good), and puts it back afterwards."""
    saved: list[dict] = []

    def lose(name: str) -> None:
        node = c.get("node", name)
        if (node["metadata"].get("annotations") or {}).get("kwok.x-k8s.io/node") != "fake":
            pytest.skip(f"node {name} is not simulated: not deleting it")
        saved.append(node)
        c.kubectl("delete", "node", name, "--wait=true")

    yield lose
    for node in saved:
        meta = {k: node["metadata"][k] for k in ("name", "labels", "annotations")}
        c.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": meta,
                                                         "spec": {}, "status": {
                                                             "capacity": node["status"]["capacity"],
                                                             "allocatable": node["status"]["allocatable"]}}))
        wait_until(lambda n=meta["name"]: any(x.get("type") == "Ready" and x.get("status") == "True" for x in (
            (c.get("node", n) or {}).get("status") or {}).get("conditions") or []), f"node {meta['name']} back")


def test_a_run_whose_node_is_lost_queues_again_onto_other_nodes(c: Cluster, lost_node) -> None:
    """Defect 7: a restarted Job kept the lost node's affinity and nothing timed out in Running, so the run was
    pinned to a node that is gone. Now it goes back to the queue and is admitted onto nodes that exist."""
    c.run("castaway", gpus=8, maxRestarts=2)
    before = c.wait_phase("castaway", "Running")
    (node,) = before["assignedNodes"]
    lost_node(node)
    requeued = wait_until(lambda: c.status("castaway") if c.status("castaway").get("restarts") == 1 else None,
                          "the run to be requeued", timeout=60)
    running = wait_until(lambda: c.status("castaway") if c.status("castaway").get("phase") == "Running" and
                         c.status("castaway").get("assignedNodes") not in (None, [node]) else None,
                         "the run to run on another node", timeout=60)
    assert running["restarts"] == 1 and node not in running["assignedNodes"]
    reasons = {e["reason"] for e in c.events("castaway")}
    assert "NodeLost" in reasons, reasons
    assert requeued["restarts"] == 1


def test_pods_that_can_never_be_scheduled_give_their_gpus_back(c: Cluster) -> None:
    """Defect 8: admitted pods that could never schedule (here: more CPU than any node has) held their GPUs
    forever. Now they are requeued after a bounded time, with the scheduler's reason, and fail once the
    restarts are spent: the GPUs go to the next run."""
    c.run("greedy", gpus=8, maxRestarts=1, resources={"gpusPerNode": 8, "nodes": 1, "cpu": "500",
                                                      "gpuProduct": "NVIDIA-H100-80GB-HBM3"})
    c.wait_phase("greedy", "Admitted")
    failed = c.wait_phase("greedy", "Failed", timeout=90)
    condition = next(x for x in failed["conditions"] if x["type"] == "Failed")
    assert condition["reason"] == "Unschedulable" and "Insufficient cpu" in condition["message"], condition
    assert failed["restarts"] == 1 and not failed.get("assignedNodes")
    wait_until(lambda: c.job("greedy") is None, "its Job to be deleted")
    c.run("patient", gpus=8, nodes=2)
    c.wait_phase("patient", "Running", timeout=30)  # every GPU is free again


def test_a_job_that_cannot_create_its_pods_fails_the_run_and_frees_its_place(c: Cluster) -> None:
    """Defect 8: a ResourceQuota (or a missing PriorityClass, an admission policy) refusing the pods left the run
    Admitted forever. Now it fails within a bounded time, saying where to look."""
    c.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-gpus"},
             "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    try:
        c.run("refused", gpus=1)
        failed = c.wait_phase("refused", "Failed", timeout=60)
        condition = next(x for x in failed["conditions"] if x["type"] == "Failed")
        assert condition["reason"] == "PodsNotCreated" and "ResourceQuota" in condition["message"]
        wait_until(lambda: c.job("refused") is None, "its Job to be deleted")
    finally:
        c.kubectl("delete", "resourcequota", "-n", c.ns, "no-gpus")


# ---------------------------------------------------------------- bad input that once passed


def test_names_users_pick_train_and_serve(c: Cluster) -> None:
    """`8b-lora` and `llama3.1-lora` are legal names, but not DNS labels: their Services were refused (422) and the
    runs stuck Queued. Now their Jobs and Services get DNS names and they run; a serve named so goes Ready."""
    for name in ("8b-lora", "llama3.1-lora"):
        c.run(name, gpus=1)
    for name in ("8b-lora", "llama3.1-lora"):
        status = c.wait_phase(name, "Running")
        job = c.get("job", status["jobName"])
        assert job["spec"]["template"]["spec"]["subdomain"] == status["jobName"]
        assert c.get("service", status["jobName"])["spec"]["clusterIP"] == "None"
    c.apply({"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe", "metadata": {"name": "8b-serve"},
             "spec": {"model": {"base_model": "meta-llama/Llama-3.1-8B-Instruct"}}})
    status = wait_until(lambda: ((c.get("lsv", "8b-serve") or {}).get("status") or {}).get("phase") == "Ready" and
                        c.get("lsv", "8b-serve")["status"], "LlamaServe 8b-serve Ready", timeout=60)
    service = status["endpoint"].split("//")[1].split(".")[0]
    assert service != "8b-serve" and c.get("service", service) is not None
    c.kubectl("delete", "lsv", "8b-serve", "-n", c.ns, "--wait=true", "--timeout=60s")


def test_a_run_that_can_never_fit_is_told_once_with_the_clusters_shape(c: Cluster) -> None:
    """A run asking for more nodes than the cluster has waited forever; now it still waits (nodes may be added)
    but says so, with what the cluster has, in its condition and in one Event."""
    c.run("huge", gpus=1, nodes=100)
    queued = wait_until(lambda: next((x for x in c.status("huge").get("conditions") or []
                                      if x["type"] == "Queued" and "cannot fit" in x["message"]), None),
                        "the run to say it cannot fit")
    assert "2 nodes of NVIDIA-H100-80GB-HBM3 with 8 GPUs" in queued["message"] or "nodes of" in queued["message"]
    wait_until(lambda: [e for e in c.events("huge") if e["reason"] == "CannotFit"], "the CannotFit event")
    time.sleep(4)  # several admission passes
    told = [e for e in c.events("huge") if e["reason"] == "CannotFit"]
    assert len(told) == 1 and told[0]["count"] == 1 and "the cluster has" in told[0]["message"]


# ---------------------------------------------------------------- what a spec may ask for


def test_the_platforms_policy_is_enforced_with_a_condition(c: Cluster) -> None:
    """Defect 4: creating a LlamaFineTune was creating a pod with any image, priority class and queue priority."""
    c.run("miner", gpus=1, image="registry.evil/miner:1")
    c.run("vip", gpus=1, queue={"priority": 1000000})
    for name, field in (("miner", "spec.image"), ("vip", "spec.queue.priority")):
        status = c.wait_phase(name, "Failed")
        valid = next(x for x in status["conditions"] if x["type"] == "Valid")
        assert valid["status"] == "False" and valid["reason"] == "PolicyViolation" and field in valid["message"]
        assert c.job(name) is None
    assert any(e["reason"] == "PolicyViolation" for e in c.events("miner"))


def test_serving_and_rendezvous_get_network_policies_and_ollama_refuses_an_api_key(c: Cluster) -> None:
    """Defect 5: Ollama dropped the API key silently and the serving and rendezvous ports were open to every pod.
    Now the key is refused, naming the field; the gang and the server get NetworkPolicies the API server
    accepts; serving pods mount no ServiceAccount token."""
    c.run("fenced", gpus=8, nodes=2)
    status = c.wait_phase("fenced", "Running")
    gang = c.get("networkpolicy", status["jobName"])
    assert gang["spec"]["podSelector"]["matchLabels"]["llamaops.io/finetune"] == "fenced"
    assert gang["spec"]["ingress"] == [{"from": [{"podSelector": gang["spec"]["podSelector"]}]}]
    serve = {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe", "metadata": {"name": "fenced-serve"},
             "spec": {"model": {"base_model": "meta-llama/Llama-3.1-8B-Instruct"}}}
    c.apply(serve)
    wait_until(lambda: ((c.get("lsv", "fenced-serve") or {}).get("status") or {}).get("phase") in
               ("Deploying", "Ready"), "the serve to deploy")
    policy = c.get("networkpolicy", "fenced-serve")
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    pod = c.get("deployment", "fenced-serve")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    c.apply({**serve, "metadata": {"name": "open-ollama"}, "spec": {
        "model": {"base_model": "llama3.1:8b"}, "runtime": "ollama", "apiKeySecretRef": {"name": "k", "key": "k"}}})
    failed = wait_until(lambda: (c.get("lsv", "open-ollama") or {}).get("status") if
                        ((c.get("lsv", "open-ollama") or {}).get("status") or {}).get("phase") == "Failed" else None,
                        "the Ollama serve with an API key to fail")
    assert any("spec.apiKeySecretRef" in x["message"] for x in failed["conditions"] if x["type"] == "Failed")
    c.kubectl("delete", "lsv", "--all", "-n", c.ns, "--wait=true", "--timeout=60s")


# ---------------------------------------------------------------- nothing stale


def test_an_adapter_is_never_stale_nor_empty(c: Cluster) -> None:
    """Defect 10: status.adapter survived a re-queue and was merged into the next completion, and an S3 run whose
    trainer reported nothing ended Succeeded with uri "" (its LlamaServe waiting forever)."""
    c.run("silent", gpus=1, output={"s3": {"uri": "s3://team-a/adapters/silent/"}})
    c.wait_phase("silent", "Running")
    c.finish_pods("silent")
    failed = c.wait_phase("silent", "Failed")
    condition = next(x for x in failed["conditions"] if x["type"] == "Failed")
    assert condition["reason"] == "AdapterMissing" and "no adapter location" in condition["message"]
    assert not failed.get("adapter")

    doc = c.run("retrained", gpus=1)
    c.wait_phase("retrained", "Running")
    c.finish_pods("retrained")
    assert c.wait_phase("retrained", "Succeeded")["adapter"]["uri"]
    doc["spec"]["lora"]["r"] = 16  # what is trained changed: the run starts over
    c.apply(doc)
    wait_until(lambda: c.status("retrained").get("phase") in ("Queued", "Admitted", "Running") and
               not c.status("retrained").get("adapter"), "the earlier adapter to be gone from the status")
    c.wait_phase("retrained", "Running")
    c.finish_pods("retrained")
    assert c.wait_phase("retrained", "Succeeded")["adapter"]["r"] == 16


# ---------------------------------------------------------------- one writer, no double booking


def test_a_job_left_by_a_crash_for_other_nodes_is_replaced(c: Cluster) -> None:
    """Defect 9: a crash between a Job's creation and the status that records it left a Job while the run was
    Queued; re-admission took its 409 for success, whatever the Job was made for, and the run's status named other
    nodes than its pods held: GPUs counted twice. Now the Job is taken only if made for the same placement."""
    from llamaops.api import LlamaFineTune
    from llamaops.builders.finetune import job
    from llamaops.queue import Placement
    from llamaops.settings import Settings

    c.run("blocker", gpus=8, nodes=2)
    c.wait_phase("blocker", "Running")
    c.run("crashy", gpus=8)
    c.wait_phase("crashy", "Queued")
    obj = c.get("lft", "crashy")
    lft = LlamaFineTune.model_validate({**obj, "metadata": {k: obj["metadata"][k] for k in (
        "name", "namespace", "uid", "generation")}, "status": None})
    left = job(lft, Settings(), Placement(nodes=("gpu-node-1",)))  # what a crashed admission made
    c.kubectl("create", "-f", "-", input=json.dumps(left))
    c.finish_pods("blocker", count=2)
    status = c.wait_phase("crashy", "Running", timeout=30)
    (node,) = status["assignedNodes"]
    terms = c.job("crashy")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchFields"][0]["values"] for t in terms] == [[node]]
    assert c.pods("crashy")[0]["spec"]["nodeName"] == node
