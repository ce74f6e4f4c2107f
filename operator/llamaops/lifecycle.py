"""What to do with a LlamaFineTune, decided from its spec and status alone (pure).

Phases: Pending -> Queued -> Admitted -> Running -> Succeeded | Failed, and
Suspended. Spec edits: a change to what is trained or where it runs (the
run hash: the spec less `queue` and `suspend`) restarts the run cleanly:
the Job is deleted and the run queues again; the trainer starts over when
the trained sections changed (spec hash) and resumes otherwise. Edits to
`queue` only reorder the queue.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamaops.api import FineTuneSpec
from llamaops.api.contract import digest

ACTIVE = ("Admitted", "Running")
DONE = ("Succeeded",)


class Action(enum.Enum):
    REJECT = "reject"  # invalid spec: Failed, no workload
    SUSPEND = "suspend"  # remove the workload, keep checkpoints, leave the queue
    QUEUE = "queue"  # (re)join the queue, removing a stale workload first
    ENSURE = "ensure"  # keep running; recreate missing children
    KEEP = "keep"  # nothing to do


def snapshot(obj: Mapping[str, Any], in_scope: bool = True) -> dict[str, Any]:
    """What the operator keeps of a LlamaFineTune (as an object from the API server): the values of its run
    index (handlers/finetune.py `finetune_index`), read by the admission loop, metrics.RunsCollector and
    `llamaops queue`. `in_scope`: whether this operator manages the run's namespace."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    res = spec.get("resources") or {}
    queue = spec.get("queue") or {}
    return {
        "uid": meta.get("uid"),
        "created": meta.get("creationTimestamp"),
        "phase": status.get("phase"),
        "suspend": bool(spec.get("suspend")),
        "in_scope": in_scope,
        "priority": int(queue.get("priority") or 0),
        "nodes": int(res.get("nodes") or 1),
        "gpus_per_node": int(res.get("gpusPerNode", 1)),
        "gpu_product": res.get("gpuProduct"),
        "node_selector": dict(res.get("nodeSelector") or {}),
        "tolerations": list(res.get("tolerations") or []),
        "assigned_nodes": list(status.get("assignedNodes") or []),
        "run_hash": status.get("runHash"),
        "conditions": list(status.get("conditions") or []),
        "progress": dict(status.get("progress") or {}),  # for metrics.py (loss, steps)
    }


def run_hash(spec: FineTuneSpec) -> str:
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    wire.pop("queue", None)
    wire.pop("suspend", None)
    return digest(wire)[:16]


@dataclass(frozen=True)
class State:
    phase: str | None
    valid: bool
    suspend: bool
    run_hash: str  # of the current spec
    status_run_hash: str | None  # of the spec the workload (or the finished run) was made from
    resumed: bool = False  # the operator restarted and is catching up


def decide(s: State) -> Action:
    if not s.valid:
        return Action.REJECT
    if s.suspend:
        return Action.KEEP if s.phase == "Suspended" else Action.SUSPEND
    same = s.status_run_hash == s.run_hash
    if s.phase in ACTIVE:
        return Action.ENSURE if same else Action.QUEUE
    if s.phase in DONE:
        return Action.KEEP if same else Action.QUEUE
    if s.phase == "Failed" and same and s.resumed:
        return Action.KEEP  # a restart of the operator retries nothing
    if s.phase == "Queued" and s.resumed:
        return Action.KEEP
    return Action.QUEUE
