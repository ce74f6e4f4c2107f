"""The control plane the operator is tested against.

Most tests hold for any cluster with at least one node offering
`nvidia.com/gpu` (see hack/kind-e2e.sh); those about the local launcher
itself skip when $KUBECONFIG names another cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubetest import wait_until

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
GPU = "nvidia.com/gpu"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
# Port offsets of the launcher tests' throwaway clusters, above the session
# cluster's $LLAMAOPS_TEST_PORT_OFFSET (default 100) so they never collide.
SESSION_OFFSET = int(os.environ.get("LLAMAOPS_TEST_PORT_OFFSET", "100"))
PORT_TAKEN_OFFSET = SESSION_OFFSET + 100
DYING_COMPONENT_OFFSET = SESSION_OFFSET + 200

def pinned_versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("\"'")
    return out


def local_only(cluster) -> None:
    if not cluster.local:
        pytest.skip("only for the local control plane ($KUBECONFIG names another cluster)")


def skip_if_foreign() -> None:
    if os.environ.get("KUBECONFIG"):
        pytest.skip("only for the local control plane ($KUBECONFIG names another cluster)")


def node_is_ready(node: client.V1Node) -> bool:
    conditions = node.status.conditions or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    taints = node.spec.taints or []
    return ready and not any(t.key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable") for t in taints)


def gpus(node: client.V1Node) -> int:
    return int((node.status.allocatable or {}).get(GPU, "0"))


def pod_manifest(name: str, gpu_count: int | None = None) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "10m", "memory": "16Mi"}}
    if gpu_count is not None:
        # Extended resources: the request defaults to the limit.
        resources["limits"] = {GPU: str(gpu_count)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "main", "image": PAUSE_IMAGE, "resources": resources}],
            "terminationGracePeriodSeconds": 0,
        },
    }


def pod_condition(pod: client.V1Pod, kind: str) -> client.V1PodCondition | None:
    return next((c for c in (pod.status.conditions or []) if c.type == kind), None)


# --------------------------------------------------------------- the cluster


def test_server_runs_the_pinned_kubernetes_version(cluster, k8s, kubectl):
    local_only(cluster)
    pinned = pinned_versions()["KUBERNETES_VERSION"]
    assert client.VersionApi(k8s).get_code().git_version == pinned
    version = json.loads(kubectl("version", "--client", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == pinned


def test_nodes_are_ready_and_offer_gpus(cluster, k8s):
    core = client.CoreV1Api(k8s)
    items = core.list_node().items
    assert items, "the cluster has no nodes"
    not_ready = [n.metadata.name for n in items if not node_is_ready(n)]
    assert not not_ready, f"nodes not Ready (or still tainted not-ready): {not_ready}"
    if not cluster.local:
        assert any(gpus(n) > 0 for n in items), f"no node has {GPU} allocatable"
        return

    from llamaops_dev.devcluster import nodes

    pools = cluster.config.nodes
    by_name = {n.metadata.name: n for n in items}
    expected = [m["metadata"]["name"] for m in nodes.manifests(pools)]
    assert sorted(by_name) == sorted(expected)
    for i in range(pools.gpu_nodes):
        node = by_name[nodes.gpu_node_name(i)]
        assert gpus(node) == pools.gpus_per_node
        assert int(node.status.capacity[GPU]) == pools.gpus_per_node
        labels = node.metadata.labels
        assert labels["nvidia.com/gpu.product"] == pools.gpu_product
        assert labels["nvidia.com/gpu.memory"] == str(pools.gpu_memory_mib)
        assert labels["nvidia.com/gpu.count"] == str(pools.gpus_per_node)
        assert labels["nvidia.com/gpu.present"] == "true"
        assert labels["kubernetes.io/hostname"] == node.metadata.name
        assert labels["type"] == "kwok"
        assert node.metadata.annotations["kwok.x-k8s.io/node"] == "fake"
    for i in range(pools.cpu_nodes):
        node = by_name[nodes.cpu_node_name(i)]
        assert gpus(node) == 0
        assert "nvidia.com/gpu.present" not in node.metadata.labels
    # Node health comes from the Leases kwok renews in place of a kubelet.
    leases = client.CoordinationV1Api(k8s).list_namespaced_lease("kube-node-lease").items
    assert sorted(lease.metadata.name for lease in leases) == sorted(expected)


# ---------------------------------------------------------- workloads and GC


def test_deployment_becomes_available(cluster, k8s, namespace):
    apps = client.AppsV1Api(k8s)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        body={
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": PAUSE_IMAGE}], "terminationGracePeriodSeconds": 0},
                },
            },
        },
    )

    def available():
        d = apps.read_namespaced_deployment("web", namespace)
        cond = next((c for c in d.status.conditions or [] if c.type == "Available"), None)
        return cond is not None and cond.status == "True" and d.status.available_replicas == 2

    wait_until(available, timeout=120, what="Deployment web to be Available with 2 replicas")


def test_job_completes(cluster, k8s, namespace):
    batch = client.BatchV1Api(k8s)
    batch.create_namespaced_job(
        namespace,
        body={
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"]}],
                    }
                },
            },
        },
    )

    def complete():
        job = batch.read_namespaced_job("once", namespace)
        failed = next((c for c in job.status.conditions or [] if c.type == "Failed" and c.status == "True"), None)
        assert failed is None, f"Job failed: {failed.reason}: {failed.message}"
        done = any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or [])
        return done and job.status.succeeded == 1

    wait_until(complete, timeout=120, what="Job once to complete")


def test_deleting_an_owner_garbage_collects_its_dependents(cluster, k8s, namespace):
    core = client.CoreV1Api(k8s)
    owner = core.create_namespaced_config_map(namespace, body={"metadata": {"name": "owner"}, "data": {"k": "v"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, body={"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    core.create_namespaced_config_map(namespace, body={"metadata": {"name": "bystander"}})

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def dependent_gone():
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_until(dependent_gone, timeout=60, what="the garbage collector to delete the dependent ConfigMap")
    assert core.read_namespaced_config_map("bystander", namespace).metadata.name == "bystander"


# --------------------------------------------------------------- scheduling


def test_pod_wanting_more_gpus_than_any_node_has_stays_pending(cluster, k8s, namespace):
    core = client.CoreV1Api(k8s)
    most = max(gpus(n) for n in core.list_node().items)
    core.create_namespaced_pod(namespace, body=pod_manifest("too-big", gpu_count=most + 1))

    def unschedulable():
        pod = core.read_namespaced_pod("too-big", namespace)
        cond = pod_condition(pod, "PodScheduled")
        return pod if cond is not None and cond.status == "False" and cond.reason == "Unschedulable" else None

    pod = wait_until(unschedulable, timeout=60, what="PodScheduled=False reason Unschedulable")
    assert pod.status.phase == "Pending"
    assert not pod.spec.node_name
    assert GPU in pod_condition(pod, "PodScheduled").message


def test_pod_wanting_a_gpu_is_scheduled_onto_a_gpu_node(cluster, k8s, namespace):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, body=pod_manifest("one-gpu", gpu_count=1))

    def scheduled():
        pod = core.read_namespaced_pod("one-gpu", namespace)
        cond = pod_condition(pod, "PodScheduled")
        return pod if cond is not None and cond.status == "True" and pod.spec.node_name else None

    pod = wait_until(scheduled, timeout=60, what="the pod to be scheduled")
    node = core.read_node(pod.spec.node_name)
    assert gpus(node) >= 1
    if cluster.local:
        assert node.metadata.labels.get("nvidia.com/gpu.present") == "true"
        wait_until(
            lambda: core.read_namespaced_pod("one-gpu", namespace).status.phase == "Running",
            timeout=60,
            what="kwok to run the pod",
        )


# ---------------------------------------------------------------- CRDs


def test_crd_with_cel_validation_and_status_subresource(cluster, k8s, namespace):
    ext = client.ApiextensionsV1Api(k8s)
    objects = client.CustomObjectsApi(k8s)
    group = f"t{secrets.token_hex(4)}.controlplane-tests.example.com"
    crd_name = f"widgets.{group}"
    rule_message = "replicas must not exceed maxReplicas"
    ext.create_custom_resource_definition(
        body={
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": crd_name},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}},
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "spec": {
                                        "type": "object",
                                        "required": ["replicas"],
                                        "properties": {
                                            "replicas": {"type": "integer", "minimum": 0},
                                            "maxReplicas": {"type": "integer", "minimum": 0},
                                        },
                                        "x-kubernetes-validations": [
                                            {"rule": "!has(self.maxReplicas) || self.replicas <= self.maxReplicas", "message": rule_message}
                                        ],
                                    },
                                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                                },
                            }
                        },
                    }
                ],
            },
        }
    )
    try:

        def established():
            crd = ext.read_custom_resource_definition(crd_name)
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

        wait_until(established, timeout=30, what=f"CRD {crd_name} to be Established")

        def widget(name: str, **spec: int) -> dict[str, Any]:
            return {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}

        def create_good():
            # The resource can lag a moment behind Established.
            try:
                return objects.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget("good", replicas=1, maxReplicas=3))
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        created = wait_until(create_good, timeout=30, what="the Widget resource to be served")
        assert created["metadata"]["generation"] == 1

        with pytest.raises(ApiException) as rejected:
            objects.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget("bad", replicas=5, maxReplicas=3))
        assert rejected.value.status == 422
        assert rule_message in rejected.value.body

        # The status subresource sets status, and does not bump the generation.
        current = objects.get_namespaced_custom_object(group, "v1", namespace, "widgets", "good")
        current["status"] = {"phase": "Ready"}
        after_status = objects.replace_namespaced_custom_object_status(group, "v1", namespace, "widgets", "good", current)
        assert after_status["status"] == {"phase": "Ready"}
        assert after_status["metadata"]["generation"] == 1

        # The main resource ignores status changes but takes spec changes.
        after_status["status"] = {"phase": "Tampered"}
        after_status["spec"]["replicas"] = 2
        updated = objects.replace_namespaced_custom_object(group, "v1", namespace, "widgets", "good", after_status)
        assert updated["status"] == {"phase": "Ready"}
        assert updated["spec"]["replicas"] == 2
        assert updated["metadata"]["generation"] == 2
    finally:
        ext.delete_custom_resource_definition(crd_name)


# ------------------------------------------------------------ the launcher


def llamaops_command() -> list[str]:
    script = Path(sys.executable).parent / "llamaops"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "llamaops_dev.devcluster"]


def run_launcher(*args: str, home: Path, bin_dir: Path, timeout: float = 90, **env: str) -> subprocess.CompletedProcess:
    command = llamaops_command()
    if command[-1] != "llamaops_dev.devcluster":
        command.append("dev-cluster")
    full_env = {**os.environ, "LLAMAOPS_HOME": str(home), "LLAMAOPS_BIN_DIR": str(bin_dir), **env}
    full_env.pop("KUBECONFIG", None)
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def test_second_up_reports_the_running_cluster(cluster):
    local_only(cluster)
    started = time.monotonic()
    proc = run_launcher("up", home=cluster.home, bin_dir=cluster.bin_dir, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(cluster.kubeconfig)
    assert time.monotonic() - started < 30


def test_status_lists_running_components(cluster):
    local_only(cluster)
    proc = run_launcher("status", home=cluster.home, bin_dir=cluster.bin_dir, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for component in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(component + " "))
        assert " running " in line, line
    assert f"kubeconfig: {cluster.kubeconfig}" in proc.stdout


def test_taken_port_is_named_in_a_quick_error(bin_dir, tmp_path):
    skip_if_foreign()
    from llamaops_dev.devcluster import Ports

    ports = Ports().shifted(PORT_TAKEN_OFFSET)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", ports.apiserver))
        holder.listen()
        started = time.monotonic()
        proc = run_launcher("up", "--port-offset", str(PORT_TAKEN_OFFSET), home=tmp_path, bin_dir=bin_dir, timeout=60)
        elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(ports.apiserver) in proc.stderr
    assert "kube-apiserver" in proc.stderr
    assert "already in use" in proc.stderr
    assert proc.stdout == ""
    assert elapsed < 30
    # Nothing was started.
    run_dir = tmp_path / "dev-cluster" / "run"
    assert not run_dir.exists() or not list(run_dir.glob("*.pid"))


def test_component_dying_at_start_up_shows_its_log(bin_dir, tmp_path):
    skip_if_foreign()
    from llamaops_dev.devcluster import Ports
    from llamaops_dev.devcluster.components import BINARIES
    from llamaops_dev.devcluster.net import port_in_use

    fake = tmp_path / "bin"
    fake.mkdir()
    for name in BINARIES:
        if name != "kube-apiserver":
            (fake / name).symlink_to(bin_dir / name)
    apiserver = fake / "kube-apiserver"
    apiserver.write_text("#!/bin/sh\necho 'Error: unknown flag: --frobnicate' >&2\nexit 1\n")
    apiserver.chmod(0o755)

    home = tmp_path / "home"
    started = time.monotonic()
    proc = run_launcher("up", "--port-offset", str(DYING_COMPONENT_OFFSET), home=home, bin_dir=fake, timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kube-apiserver exited with code 1" in proc.stderr
    assert "unknown flag: --frobnicate" in proc.stderr
    assert str(home / "dev-cluster" / "logs" / "kube-apiserver.log") in proc.stderr
    assert time.monotonic() - started < 60
    # etcd, started first, was stopped again.
    ports = Ports().shifted(DYING_COMPONENT_OFFSET)
    assert not port_in_use(ports.etcd)
    assert not list((home / "dev-cluster" / "run").glob("*.pid"))
