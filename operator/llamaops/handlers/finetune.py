"""LlamaFineTune: validation, queueing, suspension and spec edits."""

from __future__ import annotations

import logging
from typing import Any, cast

import kopf

from llamaops import metrics
from llamaops import status as st
from llamaops.api import LlamaFineTune
from llamaops.api.validation import validate_finetune
from llamaops.builders.finetune import Names, Placement
from llamaops.handlers.runtime import runtime
from llamaops.handlers.workload import create_workload, manifest, patch_status, remove_job
from llamaops.lifecycle import Action, State, decide, run_hash, snapshot

GROUP, VERSION, PLURAL = "llamaops.io", "v1alpha1", "llamafinetunes"


def in_scope(namespace: str | None, **_: Any) -> bool:
    return runtime().in_scope(namespace)


@kopf.index(GROUP, VERSION, PLURAL)
def finetune_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """What the admission loop needs of every run, kept current by kopf's watch."""
    rt = runtime()
    rt.wake.set()
    return {(namespace, name): snapshot(body, rt.in_scope(namespace))}


@kopf.on.create(GROUP, VERSION, PLURAL, when=in_scope)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", when=in_scope)
@kopf.on.resume(GROUP, VERSION, PLURAL, when=in_scope)
@metrics.count_errors("reconcile")
async def reconcile(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, reason: kopf.Reason,
                    logger: logging.Logger, **_: Any) -> None:
    rt = runtime()
    rt.indexes_ready.set()
    generation = meta.get("generation")
    conditions = list(status.get("conditions") or [])
    result = validate_finetune(manifest(body))
    lft = cast(LlamaFineTune, result.obj) if result.ok else None
    state = State(
        phase=status.get("phase"), valid=result.ok, suspend=bool(body["spec"].get("suspend")),
        run_hash=run_hash(lft.spec) if lft else "", status_run_hash=status.get("runHash"),
        resumed=reason == kopf.Reason.RESUME,
    )
    action = decide(state)
    logger.debug("phase %s -> %s", state.phase, action.value)

    if action is Action.REJECT:
        errors = "; ".join(str(p) for p in result.errors)
        conditions = st.set_condition(conditions, st.VALID, False, "InvalidSpec", errors, generation)
        conditions = st.set_condition(conditions, st.FAILED, True, "InvalidSpec", errors, generation)
        await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], {
            "phase": "Failed", "conditions": conditions, "observedGeneration": generation,
            "queuePosition": None, "runHash": None, "assignedNodes": None})
        await rt.kube.delete_job(meta["namespace"], Names.of(meta["name"]).job)
        await rt.kube.event(body, "Warning", reason="InvalidSpec", message=errors)
        return
    assert lft is not None
    warnings = "; ".join(str(p) for p in result.warnings)
    conditions = st.set_condition(conditions, st.VALID, True, "Validated", warnings, generation)

    if action is Action.SUSPEND:
        # Status first: the Job's deletion event must find the run no longer active.
        conditions = st.set_condition(conditions, st.SUSPENDED, True, "Suspended", "spec.suspend is true",
                                      generation)
        await patch_status(rt, lft, {"phase": "Suspended", "conditions": conditions, "queuePosition": None,
                                     "runHash": None, "assignedNodes": None, "observedGeneration": generation})
        if await remove_job(rt, lft):
            await rt.kube.event(body, "Normal", reason="Suspended", message="training pods removed; checkpoints are kept")
        rt.wake.set()
        return

    if action is Action.ENSURE:
        placement = Placement(nodes=tuple(status.get("assignedNodes") or ()))
        await create_workload(rt, lft, placement)
        await patch_status(rt, lft, {"conditions": conditions, "observedGeneration": generation})
        return

    if action is Action.KEEP:
        await patch_status(rt, lft, {"conditions": conditions, "observedGeneration": generation})
        rt.wake.set()
        return

    # QUEUE: (re)join the queue; a workload of an older spec goes first.
    conditions = st.clear_condition(conditions, st.SUSPENDED, "Resumed", generation)
    conditions = st.clear_condition(conditions, st.FAILED, "Requeued", generation)
    conditions = st.set_condition(conditions, st.ADMITTED, False, "Queued", "waiting for admission", generation)
    conditions = st.set_condition(conditions, st.QUEUED, True, "Queued", "waiting for GPUs", generation)
    new_status: dict[str, Any] = {"phase": "Queued", "conditions": conditions, "observedGeneration": generation,
                                  "runHash": None, "assignedNodes": None, "jobName": None}
    if state.status_run_hash != state.run_hash:
        new_status["restarts"] = 0
    await patch_status(rt, lft, new_status)
    if await remove_job(rt, lft):
        await rt.kube.event(body, "Normal", reason="SpecChanged", message="the spec changed: the run restarts with the new spec")
    if rt.settings.queue_mode == "kueue":
        queue = lft.spec.queue.name or rt.settings.kueue_default_queue
        await create_workload(rt, lft, Placement(kueue_queue=queue))
        await patch_status(rt, lft, {"runHash": state.run_hash, "jobName": Names.of(lft.metadata.name or "").job})
        await rt.kube.event(body, "Normal", reason="Queued", message=f"submitted to Kueue LocalQueue {queue}")
    else:
        await rt.kube.event(body, "Normal", reason="Queued", message="waiting in the GPU queue")
    rt.wake.set()
