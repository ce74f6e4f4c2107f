"""Kueue on the cluster under test (`kueue_cluster`): suspended Jobs labelled
with a LocalQueue get a Workload, are admitted within the ClusterQueue's
quota, unsuspended onto the GPU nodes, and run to completion; a Job beyond
the quota waits, suspended, until quota is freed.

On the local control plane the pods are simulated by kwok; pods labelled
`llamaops.io/finetune` stay Running until the test writes their terminal
status, as the kubelet would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException
from kubetest import fresh_namespace, wait_until
from llamaops_dev.devcluster import kueue

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"
IMAGE = "busybox:1.36"
# kwok leaves pods with this label Running (see llamaops_dev.devcluster.kwok_stages).
HOLD_LABEL = "llamaops.io/finetune"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

@pytest.fixture(scope="module")
def kapi(kueue_cluster) -> Iterator[client.ApiClient]:
    api = kube_config.new_client_from_config(config_file=str(kueue_cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def kns(kapi, request) -> Iterator[str]:
    """A fresh namespace in the Kueue cluster."""
    with fresh_namespace(kapi, request.node.name, prefix="kq") as name:
        yield name


def _exists(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def gpu_node_allocatable(kapi) -> dict[str, str]:
    """Allocatable cpu, memory and GPUs of the cluster's largest GPU node."""
    nodes = client.CoreV1Api(kapi).list_node().items
    gpu_nodes = [n for n in nodes if int((n.status.allocatable or {}).get(GPU, "0")) > 0]
    if not gpu_nodes:
        pytest.skip("the cluster has no node offering nvidia.com/gpu")
    node = max(gpu_nodes, key=lambda n: int(n.status.allocatable[GPU]))
    return {r: node.status.allocatable[r] for r in ("cpu", "memory", GPU)}


@pytest.fixture
def queue(kapi, kns) -> Iterator[dict[str, Any]]:
    """A ResourceFlavor of the GPU nodes, a ClusterQueue whose quota is one GPU
    node's cpu, memory and GPUs, and the LocalQueue `default` in `kns`."""
    quota = gpu_node_allocatable(kapi)
    names = {"flavor": f"{kns}-gpu", "cluster_queue_name": kns, "local_queue_name": "default"}
    kueue.create_default_queues(kapi, kns, quota=quota, **names)
    kueue.wait_cluster_queue_active(kapi, kns)
    try:
        yield {"quota": quota, "gpus": int(quota[GPU]), **names}
    finally:
        custom = client.CustomObjectsApi(kapi)
        for plural, name in (("clusterqueues", names["cluster_queue_name"]), ("resourceflavors", names["flavor"])):
            try:
                custom.delete_cluster_custom_object(kueue.GROUP, kueue.VERSION, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def queued_job(name: str, local_queue: str, *, pods: int, gpus_per_pod: int, hold: bool = False) -> dict[str, Any]:
    """A Job for Kueue: suspended, labelled with its LocalQueue."""
    labels = {HOLD_LABEL: name} if hold else {}
    resources = {"requests": {"cpu": "100m", "memory": "64Mi", GPU: str(gpus_per_pod)}, "limits": {GPU: str(gpus_per_pod)}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {kueue.QUEUE_NAME_LABEL: local_queue}},
        "spec": {
            "suspend": True,
            "parallelism": pods,
            "completions": pods,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": IMAGE, "command": ["true"], "resources": resources}],
                },
            },
        },
    }


def workload_of(kapi, ns: str, job: str) -> dict[str, Any] | None:
    items = client.CustomObjectsApi(kapi).list_namespaced_custom_object(kueue.GROUP, kueue.VERSION, ns, "workloads")["items"]
    for wl in items:
        if any(o.get("kind") == "Job" and o.get("name") == job for o in wl["metadata"].get("ownerReferences") or []):
            return wl
    return None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def is_true(obj: dict[str, Any] | None, kind: str) -> bool:
    c = condition(obj, kind)
    return c is not None and c.get("status") == "True"


def job_done(batch: client.BatchV1Api, ns: str, name: str) -> bool:
    job = batch.read_namespaced_job(name, ns)
    return any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or [])


def job_pods(core: client.CoreV1Api, ns: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={job}").items


def finish(core: client.CoreV1Api, pod: client.V1Pod) -> None:
    """Write a Succeeded status on a held pod, as the kubelet would when it exits."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    terminated = {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}
    status = {
        "phase": "Succeeded",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
        "containerStatuses": [
            {"name": c.name, "image": c.image, "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": terminated}}
            for c in pod.spec.containers
        ],
    }
    core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})


def test_queued_job_is_admitted_runs_on_gpu_nodes_and_completes(kapi, kns, queue):
    batch, core = client.BatchV1Api(kapi), client.CoreV1Api(kapi)
    gpus = max(1, queue["gpus"] // 2)
    batch.create_namespaced_job(kns, queued_job("train", queue["local_queue_name"], pods=2, gpus_per_pod=gpus))

    wl = wait_until(lambda: workload_of(kapi, kns, "train"), timeout=30, what="Kueue to create the Job's Workload")
    assert wl["spec"]["queueName"] == queue["local_queue_name"]
    wl = wait_until(
        lambda: (w := workload_of(kapi, kns, "train")) and is_true(w, "Admitted") and w, timeout=30, what="the Workload to be admitted"
    )
    admission = wl["status"]["admission"]
    assert admission["clusterQueue"] == queue["cluster_queue_name"]
    assigned = admission["podSetAssignments"][0]
    assert assigned["flavors"][GPU] == queue["flavor"]
    assert assigned["count"] == 2

    wait_until(lambda: batch.read_namespaced_job("train", kns).spec.suspend is False, timeout=30, what="Kueue to unsuspend the Job")
    wait_until(lambda: job_done(batch, kns, "train"), timeout=60, what="the Job to complete")

    pods = job_pods(core, kns, "train")
    assert len(pods) == 2
    nodes = {n.metadata.name: n for n in core.list_node().items}
    for pod in pods:
        # Kueue put the flavor's node labels into the pod's nodeSelector.
        assert (pod.spec.node_selector or {}).items() >= kueue.GPU_NODE_LABELS.items(), pod.spec.node_selector
        node = nodes[pod.spec.node_name]
        assert int(node.status.allocatable.get(GPU, "0")) >= gpus, f"{pod.metadata.name} ran on {node.metadata.name}"
        assert node.metadata.labels.get("nvidia.com/gpu.present") == "true"
    wait_until(lambda: is_true(workload_of(kapi, kns, "train"), "Finished"), timeout=30, what="the Workload to be Finished")


def test_job_beyond_the_quota_waits_until_quota_is_freed(kapi, kns, queue):
    batch, core = client.BatchV1Api(kapi), client.CoreV1Api(kapi)
    custom = client.CustomObjectsApi(kapi)
    gpus = queue["gpus"]
    lq = queue["local_queue_name"]

    # The first Job takes the whole GPU quota; its pod stays Running.
    batch.create_namespaced_job(kns, queued_job("first", lq, pods=1, gpus_per_pod=gpus, hold=True))
    wait_until(lambda: is_true(workload_of(kapi, kns, "first"), "Admitted"), timeout=30, what="the first Workload to be admitted")
    pod = wait_until(
        lambda: [p for p in job_pods(core, kns, "first") if p.status.phase == "Running"], timeout=60, what="the first Job's pod to run"
    )[0]
    node = core.read_node(pod.spec.node_name)
    if (node.metadata.annotations or {}).get(KWOK_NODE_ANNOTATION) is None:
        pytest.skip("needs simulated (kwok) nodes: the test ends the first Job by writing its pod's status")

    # The second one does not fit beside it: its Workload waits, the Job stays suspended.
    batch.create_namespaced_job(kns, queued_job("second", lq, pods=1, gpus_per_pod=gpus))

    def pending() -> dict[str, Any] | None:
        wl = workload_of(kapi, kns, "second")
        c = condition(wl, "QuotaReserved")
        return wl if c is not None and c["status"] == "False" and c.get("reason") == "Pending" else None

    wl = wait_until(pending, timeout=30, what="the second Workload to be pending")
    assert "insufficient" in condition(wl, "QuotaReserved")["message"].lower(), condition(wl, "QuotaReserved")

    def queue_counts() -> bool:
        cq = custom.get_cluster_custom_object(kueue.GROUP, kueue.VERSION, "clusterqueues", queue["cluster_queue_name"])
        status = cq.get("status") or {}
        return status.get("admittedWorkloads") == 1 and status.get("pendingWorkloads") == 1

    # The ClusterQueue's status follows a moment later.
    wait_until(queue_counts, timeout=30, what="the ClusterQueue to count 1 admitted and 1 pending Workload")
    time.sleep(2)  # Kueue has had its chances; it must not have admitted it meanwhile.
    assert not is_true(workload_of(kapi, kns, "second"), "Admitted")
    assert batch.read_namespaced_job("second", kns).spec.suspend is True
    assert job_pods(core, kns, "second") == []

    # The first Job finishes: its quota goes to the second one, which runs and completes.
    finish(core, pod)
    wait_until(lambda: job_done(batch, kns, "first"), timeout=60, what="the first Job to complete")
    wait_until(lambda: is_true(workload_of(kapi, kns, "first"), "Finished"), timeout=30, what="the first Workload to be Finished")
    wait_until(lambda: is_true(workload_of(kapi, kns, "second"), "Admitted"), timeout=30, what="the second Workload to be admitted")
    wait_until(lambda: batch.read_namespaced_job("second", kns).spec.suspend is False, timeout=30, what="Kueue to unsuspend the second Job")
    wait_until(lambda: job_done(batch, kns, "second"), timeout=60, what="the second Job to complete")
