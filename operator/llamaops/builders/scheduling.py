"""Where a pod may run and what it asks for, from the SchedulingSpec that training and serving share; and the
Secret-backed environment both pod kinds use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamaops.api.constants import DEV_NODE_LABEL, GPU_PRODUCT_LABEL, HOSTNAME_LABEL
from llamaops.api.constants import GPU_RESOURCE as GPU
from llamaops.api.finetune import SchedulingSpec

# GPU nodes are commonly tainted so that only GPU pods land there.
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
# Demo mode (Settings.dev_node): the dev node's taint (llamaops_dev.devnode registers it).
DEV_NODE_KEY = DEV_NODE_LABEL
DEV_NODE_TOLERATION = {"key": DEV_NODE_KEY, "operator": "Exists", "effect": "NoSchedule"}


def node_placement(res: SchedulingSpec, gpus: int, dev_node: str | None) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(nodeSelector, tolerations) of a pod. With a dev node (demo mode) a pod without GPUs runs there, as a
    local process: nothing GPU-shaped would schedule on it."""
    if dev_node and not gpus:
        return {HOSTNAME_LABEL: dev_node}, tolerations(res, gpus=False) + [DEV_NODE_TOLERATION]
    return node_selector(res), tolerations(res, gpus=gpus > 0)


def node_selector(res: SchedulingSpec) -> dict[str, str]:
    """The spec's node labels, plus the GPU product (the GPU feature discovery label) when set."""
    selector = dict(res.node_selector or {})
    if res.gpu_product:
        selector[GPU_PRODUCT_LABEL] = res.gpu_product
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


def pod_options(res: SchedulingSpec, image_pull_secrets: Sequence[Any] | None) -> dict[str, Any]:
    """The pod spec's priority class and image pull secrets, where the spec sets them."""
    out: dict[str, Any] = {}
    if res.priority_class_name:
        out["priorityClassName"] = res.priority_class_name
    if image_pull_secrets:
        out["imagePullSecrets"] = [{"name": s.name} for s in image_pull_secrets]
    return out


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """An environment variable from a key of a Secret (credentials never appear in a manifest's values)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
