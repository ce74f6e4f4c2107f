from __future__ import annotations

from llamaops_dev.devcluster import NodePools, nodes


def test_default_nodes():
    manifests = nodes.manifests(NodePools())
    assert [m["metadata"]["name"] for m in manifests] == ["gpu-node-0", "gpu-node-1", "cpu-node-0"]
    for m in manifests:
        assert m["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
        assert m["metadata"]["labels"]["kubernetes.io/hostname"] == m["metadata"]["name"]
        assert m["metadata"]["labels"]["type"] == "kwok"
        assert not m["spec"].get("taints")
        assert m["status"]["capacity"] == m["status"]["allocatable"]
    gpu = manifests[0]
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert gpu["status"]["allocatable"]["cpu"] == "96"
    assert {
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.present": "true",
    }.items() <= gpu["metadata"]["labels"].items()
    cpu = manifests[2]
    assert "nvidia.com/gpu" not in cpu["status"]["allocatable"]
    assert not any(k.startswith("nvidia.com/") for k in cpu["metadata"]["labels"])


def test_custom_pools():
    pools = NodePools(gpu_nodes=3, gpus_per_node=4, gpu_product="NVIDIA-A100-SXM4-40GB", gpu_memory_mib=40960, cpu_nodes=0)
    manifests = nodes.manifests(pools)
    assert [m["metadata"]["name"] for m in manifests] == ["gpu-node-0", "gpu-node-1", "gpu-node-2"]
    labels = manifests[2]["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels["nvidia.com/gpu.memory"] == "40960"
    assert labels["nvidia.com/gpu.count"] == "4"
    assert manifests[2]["status"]["capacity"]["nvidia.com/gpu"] == "4"


def test_node_ready():
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}, "spec": {}}
    assert nodes.node_ready(ready)
    tainted = {**ready, "spec": {"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}}
    assert not nodes.node_ready(tainted)
    assert not nodes.node_ready({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    assert not nodes.node_ready({})
