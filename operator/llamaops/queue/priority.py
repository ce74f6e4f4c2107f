"""The built-in queue policy ("builtin"): admission onto free GPUs as a pure function of (queue, capacity).

Order: priority (higher first), then creation time (older first), then name.
Gang: a run is admitted only when all of its `nodes` fit at once, on distinct
nodes that each have `gpusPerNode` free GPUs of the requested product and
match its node selector and tolerations.

Backfill: when the head of the queue does not fit, later runs that do fit
may start ahead of it, but only a bounded number of times. Each time a later
run is admitted past a waiting run, that run's `overtaken` count grows; once
it reaches `backfill_limit` the run reserves the nodes closest to fitting it,
and nothing after it may be placed there, so the freed GPUs accumulate for it.
A run that could never fit the cluster (too few matching nodes) reserves
nothing and blocks nobody.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from llamaops.api.constants import GPU_PRODUCT_LABEL
from llamaops.queue.capacity import NodeCapacity, Taint
from llamaops.queue.policy import Decision, Placement, PolicyConfig, QueuedRun, register

DEFAULT_BACKFILL_LIMIT = PolicyConfig.backfill_limit


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Taint) -> bool:
    """core/v1 toleration matching (PreferNoSchedule never blocks)."""
    if taint.effect == "PreferNoSchedule":
        return True
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.effect:
            continue
        op = tol.get("operator") or "Equal"
        if op == "Exists" and (not tol.get("key") or tol["key"] == taint.key):
            return True
        if op == "Equal" and tol.get("key") == taint.key and (tol.get("value") or "") == (taint.value or ""):
            return True
    return False


def eligible(node: NodeCapacity, run: QueuedRun) -> bool:
    """Could this node host one of the run's pods, capacity aside?"""
    if not node.schedulable or node.allocatable < run.gpus_per_node:
        return False
    if run.gpu_product and node.labels.get(GPU_PRODUCT_LABEL) != run.gpu_product:
        return False
    if any(node.labels.get(k) != v for k, v in run.node_selector.items()):
        return False
    return all(tolerates(run.tolerations, t) for t in node.taints)


def shape(nodes: Sequence[NodeCapacity]) -> str:
    """The cluster's GPU nodes in a few words: "2 nodes of NVIDIA-H100-80GB-HBM3 with 8 GPUs"."""
    groups: dict[tuple[str, int], int] = {}
    for n in nodes:
        if n.schedulable and n.allocatable > 0:
            key = (n.labels.get(GPU_PRODUCT_LABEL) or "unlabelled GPUs", n.allocatable)
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return "the cluster has no schedulable GPU node"
    parts = [f"{count} node{'s' if count != 1 else ''} of {product} with {gpus} GPUs"
             for (product, gpus), count in sorted(groups.items())]
    return "the cluster has " + ", ".join(parts)


def _place(run: QueuedRun, candidates: list[NodeCapacity], free: dict[str, int]) -> list[str] | None:
    """Best fit: the fullest nodes that still have room, so large holes stay open for large gangs."""
    fitting = sorted((n for n in candidates if free[n.name] >= run.gpus_per_node),
                     key=lambda n: (free[n.name], n.name))
    if len(fitting) < run.nodes:
        return None
    return [n.name for n in fitting[: run.nodes]]


def _why(run: QueuedRun, candidates: list[NodeCapacity], free: dict[str, int]) -> str:
    what = f"{run.gpus_per_node} free {run.gpu_product or 'GPU'}{'s' if run.gpus_per_node != 1 else ''}"
    need = f"{run.nodes} node{'s' if run.nodes != 1 else ''} with {what}"
    best = sorted((free[n.name] for n in candidates), reverse=True)[: run.nodes]
    have = ", ".join(str(b) for b in best) or "none"
    return f"waiting for {need} (most free on matching nodes: {have})"


def admit(queue: Iterable[QueuedRun], nodes: Iterable[NodeCapacity],
          backfill_limit: int = DEFAULT_BACKFILL_LIMIT) -> Decision:
    nodes = list(nodes)
    free = {n.name: n.free for n in nodes}
    decision = Decision()
    reserved_nodes: set[str] = set()
    waiting: list[QueuedRun] = []
    overtaken: dict[str, int] = {}

    for run in sorted(queue, key=QueuedRun.sort_key):
        matching = [n for n in nodes if eligible(n, run)]
        if run.gpus_per_node == 0:
            placement: list[str] | None = []  # CPU runs hold no GPUs
        elif len(matching) < run.nodes:
            decision.reasons[run.key] = (
                f"cannot fit this cluster: it needs {run.nodes} node(s) with {run.gpus_per_node} "
                f"{run.gpu_product or 'GPU'}s matching its selectors and tolerations, there are {len(matching)} "
                f"({shape(nodes)})")
            decision.unfit.add(run.key)
            waiting.append(run)
            continue
        else:
            placement = _place(run, [n for n in matching if n.name not in reserved_nodes], free)
        if placement is not None:
            for name in placement:
                free[name] -= run.gpus_per_node
            decision.admitted[run.key] = placement
            for blocked in waiting:  # this run overtook every fitting-in-principle run still waiting
                if blocked.key in overtaken:
                    overtaken[blocked.key] += 1
            continue
        waiting.append(run)
        overtaken[run.key] = run.overtaken
        decision.reasons[run.key] = _why(run, matching, free)
        if run.overtaken >= backfill_limit:
            open_nodes = sorted((n for n in matching if n.name not in reserved_nodes),
                                key=lambda n: (-free[n.name], n.name))[: run.nodes]
            hold = [n.name for n in open_nodes]
            reserved_nodes.update(hold)
            decision.reserved[run.key] = hold
            decision.reasons[run.key] += f"; holding {', '.join(hold)} for it (overtaken {run.overtaken} times)"

    decision.positions = {run.key: i for i, run in enumerate(waiting, start=1)}
    decision.overtaken = overtaken
    return decision


class PriorityPolicy:
    """Priority, then age; gangs all at once; bounded backfill (`admit`)."""

    name = "builtin"
    external = False

    def __init__(self, config: PolicyConfig) -> None:
        self.backfill_limit = config.backfill_limit

    def submission(self, run: QueuedRun) -> Placement | None:
        return None  # the admission loop places it

    def admit(self, queue: Sequence[QueuedRun], capacity: Sequence[NodeCapacity]) -> Decision:
        return admit(queue, capacity, self.backfill_limit)


register(PriorityPolicy.name, PriorityPolicy)
