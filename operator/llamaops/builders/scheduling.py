"""Where a pod may run and what it asks for, from the SchedulingSpec that training and serving share."""

from __future__ import annotations

from typing import Any

from llamaops.api.finetune import SchedulingSpec

GPU = "nvidia.com/gpu"
# GPU nodes are commonly tainted so that only GPU pods land there.
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}


def node_selector(res: SchedulingSpec) -> dict[str, str]:
    """The spec's node labels, plus the GPU product (the GPU feature discovery label) when set."""
    selector = dict(res.node_selector or {})
    if res.gpu_product:
        selector["nvidia.com/gpu.product"] = res.gpu_product
    return selector


def tolerations(res: SchedulingSpec, gpus: bool) -> list[dict[str, Any]]:
    """The spec's tolerations, plus the GPU taint's when the pod asks for GPUs."""
    out = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in res.tolerations or []]
    if gpus and GPU_TOLERATION not in out:
        out.append(GPU_TOLERATION)
    return out


def cpu_memory(res: SchedulingSpec) -> dict[str, Any]:
    """CPU and memory amounts of one pod (each is both its request and its limit)."""
    return {k: v for k, v in (("cpu", res.cpu), ("memory", res.memory)) if v}
