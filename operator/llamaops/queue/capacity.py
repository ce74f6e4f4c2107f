"""Free GPUs per node: allocatable minus the requests of every non-terminal pod bound there.

Pods LlamaOps did not create count the same as ours: the queue must never
admit a run onto GPUs someone else is using.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llamaops.api.constants import GPU_PRODUCT_LABEL, GPU_RESOURCE

TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str | None
    effect: str


@dataclass
class NodeCapacity:
    name: str
    allocatable: int
    free: int
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    schedulable: bool = True

    @property
    def product(self) -> str | None:
        return self.labels.get(GPU_PRODUCT_LABEL)


def _int(quantity: Any) -> int:
    try:
        return int(str(quantity or 0))
    except ValueError:
        return 0


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: the sum over its containers, or its largest init container if larger."""
    spec = pod.get("spec") or {}

    def gpus(container: Mapping[str, Any]) -> int:
        res = container.get("resources") or {}
        # Extended resources must have requests == limits; either may be given alone.
        return _int((res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE))

    regular = sum(gpus(c) for c in spec.get("containers") or [])
    init = max((gpus(c) for c in spec.get("initContainers") or []), default=0)
    return max(regular, init)


def _ready(node: Mapping[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def free_capacity(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> list[NodeCapacity]:
    """Nodes (as API dicts) with their free GPUs after the given pods' requests."""
    used: dict[str, int] = {}
    for pod in pods:
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name or (pod.get("status") or {}).get("phase") in TERMINAL_PHASES:
            continue
        used[node_name] = used.get(node_name, 0) + pod_gpu_request(pod)
    out = []
    for node in nodes:
        meta, spec = node.get("metadata") or {}, node.get("spec") or {}
        alloc = _int(((node.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE))
        taints = tuple(Taint(t.get("key", ""), t.get("value"), t.get("effect", ""))
                       for t in spec.get("taints") or [])
        out.append(NodeCapacity(
            name=meta["name"], allocatable=alloc, free=max(alloc - used.get(meta["name"], 0), 0),
            labels=dict(meta.get("labels") or {}), taints=taints,
            schedulable=not spec.get("unschedulable") and _ready(node),
        ))
    return out
