"""Manifests of the simulated nodes.

Each node carries the annotation kwok is told to manage, so nodes without it
(for example a node whose pods run as local processes) are left alone. The
status is set at creation; kwok's node-initialize stage keeps the capacity
and allocatable and adds the Ready condition. No taints: ordinary pods
schedule onto these nodes.
"""

from __future__ import annotations

from typing import Any

from llamaops.api.constants import GPU_PRODUCT_LABEL, GPU_RESOURCE

from llamaops_dev.devcluster.config import NodePools

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
KWOK_NODE_SELECTOR = f"{KWOK_ANNOTATION}={KWOK_ANNOTATION_VALUE}"

GPU_NODE_RESOURCES = {"cpu": "96", "memory": "1Ti", "ephemeral-storage": "2Ti", "pods": "110"}
CPU_NODE_RESOURCES = {"cpu": "32", "memory": "128Gi", "ephemeral-storage": "500Gi", "pods": "110"}


def gpu_node_name(i: int) -> str:
    return f"gpu-node-{i}"


def cpu_node_name(i: int) -> str:
    return f"cpu-node-{i}"


def _node(name: str, labels: dict[str, str], resources: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "type": "kwok",
                **labels,
            },
        },
        "spec": {},
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
        },
    }


def gpu_node(i: int, pools: NodePools) -> dict[str, Any]:
    labels = {
        "nvidia.com/gpu.present": "true",
        GPU_PRODUCT_LABEL: pools.gpu_product,
        "nvidia.com/gpu.memory": str(pools.gpu_memory_mib),
        "nvidia.com/gpu.count": str(pools.gpus_per_node),
    }
    return _node(gpu_node_name(i), labels, {**GPU_NODE_RESOURCES, GPU_RESOURCE: str(pools.gpus_per_node)})


def cpu_node(i: int) -> dict[str, Any]:
    return _node(cpu_node_name(i), {}, CPU_NODE_RESOURCES)


def manifests(pools: NodePools) -> list[dict[str, Any]]:
    """All simulated nodes: the GPU nodes first, then the CPU-only ones."""
    return [gpu_node(i, pools) for i in range(pools.gpu_nodes)] + [cpu_node(i) for i in range(pools.cpu_nodes)]


def node_ready(node: dict[str, Any]) -> bool:
    """Ready=True and no not-ready/unreachable taint left."""
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    taints = (node.get("spec") or {}).get("taints") or []
    blocked = any(t.get("key") in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable") for t in taints)
    return ready and not blocked
