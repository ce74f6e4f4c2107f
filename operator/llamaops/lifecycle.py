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
from dataclasses import dataclass

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
