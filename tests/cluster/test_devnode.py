"""The dev node on the local control plane: a Node whose pods run as local processes."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from devnode_fixtures import NODE, PLACEMENT, DevNodeProcess
from kubetest import wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def devnode(cluster, kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevNodeProcess]:
    if not cluster.local:
        pytest.skip("the dev node registers a Node: only on the local control plane")
    agent = DevNodeProcess(kubectl, cluster.kubeconfig, tmp_path_factory.mktemp("devnode"))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def _apply(kubectl, namespace: str, *docs: dict) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


def _pod(kubectl, namespace: str, name: str) -> dict | None:
    out = kubectl("get", "pod", "-n", namespace, name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_the_node_is_registered_tainted_and_heartbeating(devnode: DevNodeProcess, kubectl) -> None:
    node = json.loads(kubectl("get", "node", NODE, "-o", "json").stdout)
    assert {"key": "llamaops.io/dev-node", "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["metadata"]["labels"]["llamaops.io/dev-node"] == "true"
    assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})  # kwok leaves it alone
    assert node["status"]["allocatable"]["cpu"] == "8"
    lease = json.loads(kubectl("get", "lease", "-n", "kube-node-lease", NODE, "-o", "json").stdout)
    renewed = dt.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
    assert lease["spec"]["holderIdentity"] == NODE
    assert (dt.datetime.now(dt.UTC) - renewed).total_seconds() < 30


# Run in the pod: env from a ConfigMap, a ConfigMap volume file (its path translated), the pod's own
# ServiceAccount token against the API server (SelfSubjectReview), a termination message, exit 3.
SCRIPT = r"""
import os, sys
from kubernetes import client
from kubernetes.config.incluster_config import InClusterConfigLoader
print("greeting:", os.environ["GREETING"], "index:", os.environ["INDEX"])
print("file:", open(sys.argv[1]).read())
sa = os.environ["LLAMAOPS_SERVICEACCOUNT_DIR"]
conf = client.Configuration()
InClusterConfigLoader(token_filename=sa + "/token", cert_filename=sa + "/ca.crt").load_and_set(conf)
review = client.AuthenticationV1Api(client.ApiClient(conf)).create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
print("user:", review.status.user_info.username)
print("kubeconfig:", os.environ.get("KUBECONFIG"))
open(sys.argv[2], "w").write("done, exiting 3")
sys.exit(3)
"""


def test_a_pod_runs_as_a_process_and_reports_its_exit(devnode: DevNodeProcess, kubectl, namespace: str) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
          "data": {"greeting": "hello", "file.txt": "from the volume"}}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "echo", "annotations": {"batch.kubernetes.io/job-completion-index": "7"}},
           "spec": {**PLACEMENT, "restartPolicy": "Never", "serviceAccountName": "runner",
                    "containers": [{
                        "name": "main", "image": "python:3.12",
                        "command": ["python", "-c", SCRIPT],
                        "args": ["/etc/cfg/file.txt", "/dev/termination-log"],
                        "env": [
                            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                            {"name": "INDEX", "valueFrom": {"fieldRef": {
                                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]}],
                    "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]}}
    _apply(kubectl, namespace, cm, sa, pod)
    done = wait_until(lambda: (p := _pod(kubectl, namespace, "echo")) and p["status"].get("phase") == "Failed" and p,
                      f"pod echo to fail with exit 3\n{devnode.tail()}", timeout=90)
    assert done["spec"]["nodeName"] == NODE
    assert done["status"]["podIP"].startswith("127.77.")  # a loopback address of its own
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3, devnode.container_log(namespace, "echo", "main")
    assert term["message"] == "done, exiting 3"
    log = devnode.container_log(namespace, "echo", "main")
    assert "greeting: hello index: 7" in log
    assert "file: from the volume" in log
    assert f"user: system:serviceaccount:{namespace}:runner" in log  # TokenRequest for the pod's own account
    assert "kubeconfig: None" in log
    record = devnode.record(namespace, "echo", "main")
    assert record["argv"][:2] == ["python", "-c"] and record["argv"][3:] == ["/etc/cfg/file.txt", "/dev/termination-log"]
    events = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    assert any(e["reason"] == "Started" and "echo" == e["involvedObject"]["name"] for e in events)


def test_deleting_a_pod_kills_its_process(devnode: DevNodeProcess, kubectl, namespace: str) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
           "spec": {**PLACEMENT, "restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "600"]}]}}
    _apply(kubectl, namespace, pod)
    wait_until(lambda: ((_pod(kubectl, namespace, "sleeper") or {}).get("status") or {}).get("phase") == "Running",
               f"pod sleeper Running\n{devnode.tail()}", timeout=60)
    pid = devnode.record(namespace, "sleeper", "main")["pid"]
    os.kill(pid, 0)
    started = time.monotonic()
    kubectl("delete", "pod", "-n", namespace, "sleeper", "--wait=false")
    wait_until(lambda: _pod(kubectl, namespace, "sleeper") is None, f"pod sleeper gone\n{devnode.tail()}",
               timeout=30)
    assert time.monotonic() - started < 10  # sleep dies on SIGTERM: no need to wait out the grace period
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] in "ZX"
