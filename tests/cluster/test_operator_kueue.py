"""The operator in Kueue mode, against a real Kueue: Kueue admits, LlamaOps reflects it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import config as kube_config
from operator_fixtures import REPO, Cluster, OperatorProcess, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def kc(kueue_cluster, kubectl, tmp_path_factory) -> Iterator[tuple[object, str, Path]]:
    # The session's kubectl, pointed at the Kueue cluster.
    kubectl = type(kubectl)(kubectl.binary, kueue_cluster.kubeconfig, tmp_path_factory.mktemp("kueue-kubectl"))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/llamafinetunes.llamaops.io")
    ns = f"kq-{secrets.token_hex(3)}"
    kubectl("create", "namespace", ns)
    from llamaops_dev.devcluster import kueue

    api = kube_config.new_client_from_config(config_file=str(kueue_cluster.kubeconfig))
    # A quota of 8 GPUs: one 8-GPU run at a time.
    kueue.create_default_queues(api, ns, quota={"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": "8"},
                                cluster_queue_name=f"llamaops-{ns}", local_queue_name="team")
    yield kubectl, ns, kueue_cluster.kubeconfig
    kubectl("delete", "namespace", ns, "--wait=false")
    api.close()


@pytest.fixture(scope="module")
def kueue_operator(kc, tmp_path_factory) -> Iterator[OperatorProcess]:
    kubectl, ns, kubeconfig = kc
    proc = OperatorProcess(kubeconfig, tmp_path_factory.mktemp("kueue-operator") / "operator.log", {
        "LLAMAOPS_NAMESPACES": ns, "LLAMAOPS_QUEUE_MODE": "kueue"})
    proc.start()
    yield proc
    proc.stop()


def test_kueue_admits_runs_within_quota_and_llamaops_reflects_it(kc, kueue_operator, tmp_path: Path) -> None:
    kubectl, ns, _ = kc
    c = Cluster(kubectl, ns, tmp_path)
    c.volumes("training-data", "adapters")
    c.run("first", gpus=8, queue={"name": "team"})
    status = c.wait_phase("first", "Running", timeout=60)
    job = c.job("first")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"
    assert job["spec"]["suspend"] is False  # Kueue let it go
    assert status.get("assignedNodes") is None  # placement is Kueue's, not ours
    workloads = wait_until(lambda: [w for w in (c.get("workloads.kueue.x-k8s.io") or {}).get("items", [])
                                  if w["metadata"]["ownerReferences"][0]["name"] == "first-train"], "a Workload")
    assert any(x["type"] == "Admitted" and x["status"] == "True" for x in workloads[0]["status"]["conditions"])

    c.run("second", gpus=8, queue={"name": "team"})
    c.wait_phase("second", "Queued")
    wait_until(lambda: (c.job("second") or {}).get("spec", {}).get("suspend") is True, "a suspended Job for the second")
    assert c.status("second")["phase"] == "Queued"

    c.finish_pods("first")
    c.wait_phase("first", "Succeeded", timeout=30)
    c.wait_phase("second", "Running", timeout=60)
    assert c.job("second")["spec"]["suspend"] is False


def test_a_restarted_or_requeued_run_goes_through_kueue_again(kc, kueue_operator, tmp_path: Path) -> None:
    """Defect 2: the gang restart rebuilt the Job without the queue label and suspend, so after the first failure
    its pods ran outside the ClusterQueue's quota. Now every Job of the run is Kueue's to admit."""
    kubectl, ns, _ = kc
    c = Cluster(kubectl, ns, tmp_path)
    if c.get("pvc", "training-data") is None:  # the module's first test made them
        c.volumes("training-data", "adapters")
    c.reset("lft", "jobs")  # the quota is one 8-GPU run: the first test's runs go
    c.run("flaky", gpus=8, queue={"name": "team"}, maxRestarts=3)
    c.wait_phase("flaky", "Running", timeout=60)

    def workload_of(job_uid: str) -> dict | None:
        items = (c.get("workloads.kueue.x-k8s.io") or {}).get("items", [])
        return next((w for w in items if w["metadata"]["ownerReferences"][0]["uid"] == job_uid and any(
            x["type"] == "Admitted" and x["status"] == "True" for x in (w.get("status") or {}).get("conditions", []))),
            None)

    for exit_code in (1, 75):  # a gang restart in place, then a requeue
        before = c.job("flaky")["metadata"]["uid"]
        c.finish_pods("flaky", exit_code=exit_code, message="lost a rank")
        job = wait_until(lambda b=before: (lambda j: j if j and j["metadata"]["uid"] != b else None)(c.job("flaky")),
                         "a new Job")
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"
        wait_until(lambda j=job: workload_of(j["metadata"]["uid"]), "Kueue to admit the new Job", timeout=60)
        c.wait_phase("flaky", "Running", timeout=60)
    assert c.status("flaky")["restarts"] == 2
