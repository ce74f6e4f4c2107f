"""What the operator does with a run, from its spec and status alone."""

from __future__ import annotations

import pytest
from api_cases import example
from llamaops.api import LlamaFineTune
from llamaops.state.finetune import Action, State, decide, run_hash
from llamaops.status import is_true, set_condition

H = "hash-1"


@pytest.mark.parametrize(("state", "action"), [
    (State(None, False, False, H, None), Action.REJECT),
    (State("Running", False, False, H, H), Action.REJECT),
    (State(None, True, False, H, None), Action.QUEUE),
    (State("Queued", True, False, H, None), Action.QUEUE),
    (State("Queued", True, False, H, None, resumed=True), Action.KEEP),
    (State("Running", True, False, H, H), Action.ENSURE),
    (State("Running", True, False, H, "old"), Action.QUEUE),
    (State("Admitted", True, False, H, H, resumed=True), Action.ENSURE),
    (State("Running", True, True, H, H), Action.SUSPEND),
    (State("Suspended", True, True, H, None), Action.KEEP),
    (State("Suspended", True, False, H, None), Action.QUEUE),
    (State("Succeeded", True, False, H, H), Action.KEEP),
    (State("Succeeded", True, False, H, "old"), Action.QUEUE),
    (State("Failed", True, False, H, H, resumed=True), Action.KEEP),
    (State("Failed", True, False, H, H), Action.QUEUE),
], ids=lambda x: x.value if isinstance(x, Action) else f"{x.phase}-{x.valid}-{x.suspend}-{x.resumed}")
def test_decide(state: State, action: Action) -> None:
    assert decide(state) is action


def test_run_hash_ignores_queue_and_suspend_only() -> None:
    base = LlamaFineTune.model_validate(example("llama-3.1-8b-lora.yaml")).spec
    moved = base.model_copy(deep=True)
    moved.queue.priority = 7
    moved.suspend = True
    assert run_hash(moved) == run_hash(base)
    changed = base.model_copy(deep=True)
    changed.resources.gpus_per_node = 2
    assert run_hash(changed) != run_hash(base)


def test_condition_transition_time_moves_only_on_flips() -> None:
    c = set_condition(None, "Queued", True, "Queued", "pos 2", 1, at="t1")
    c = set_condition(c, "Queued", True, "Queued", "pos 1", 2, at="t2")
    assert c == [{"type": "Queued", "status": "True", "reason": "Queued", "message": "pos 1",
                  "lastTransitionTime": "t1", "observedGeneration": 2}]
    c = set_condition(c, "Queued", False, "Admitted", "", 2, at="t3")
    assert c[0]["lastTransitionTime"] == "t3" and not is_true(c, "Queued")
