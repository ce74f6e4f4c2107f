"""LlamaFineTune: validation, queueing, suspension and spec edits."""

from __future__ import annotations

import logging
from typing import Any, cast

import kopf

from llamaops import metrics
from llamaops import status as st
from llamaops.api import LlamaFineTune
from llamaops.api.constants import FINETUNES, GROUP, KIND_FINETUNE, VERSION
from llamaops.api.validation import validate_finetune
from llamaops.builders.finetune import Names
from llamaops.handlers.runtime import Runtime, in_scope, runtime
from llamaops.handlers.workload import (
    create_workload,
    fail_conflict,
    manifest,
    patch_status,
    placement,
    read_run,
    remove_job,
    remove_report,
)
from llamaops.kube import NotOwned
from llamaops.state.finetune import Action, RunSnapshot, State, decide, run_hash


@kopf.index(GROUP, VERSION, FINETUNES)
def finetune_index(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                   **_: Any) -> dict[tuple[str, str], RunSnapshot]:
    """What the admission loop needs of every run, kept current by kopf's watch."""
    rt = runtime(memo)
    rt.wake.set()
    return {(namespace, name): RunSnapshot.of(body, rt.in_scope(namespace))}


@kopf.on.create(GROUP, VERSION, FINETUNES, when=in_scope)
@kopf.on.update(GROUP, VERSION, FINETUNES, field="spec", when=in_scope)
@kopf.on.resume(GROUP, VERSION, FINETUNES, when=in_scope)
@metrics.count_errors("reconcile")
async def reconcile(meta: kopf.Meta, reason: kopf.Reason, logger: logging.Logger, memo: kopf.Memo,
                    **_: Any) -> None:
    rt = runtime(memo)
    rt.indexes_ready.set()
    # One writer per run: admission and the Job handler take the same lock, and all read the run afresh
    # under it, so none acts on a status another has just changed.
    async with rt.lock(KIND_FINETUNE, meta["namespace"], meta["name"]):
        body = await read_run(rt, meta["namespace"], meta["name"])
        if body is None:
            return
        try:
            await _reconcile(rt, body, reason == kopf.Reason.RESUME, logger)
        except NotOwned as exc:
            await fail_conflict(rt, body, exc)


async def _reconcile(rt: Runtime, body: dict[str, Any], resumed: bool, logger: logging.Logger) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    generation = meta.get("generation")
    conditions = list(status.get("conditions") or [])
    result = validate_finetune(manifest(body))
    lft = cast(LlamaFineTune, result.obj) if result.ok else None
    # A valid spec may still ask for what the platform does not allow (an image, a priority class, a priority).
    refused = rt.settings.spec_policy().finetune(lft) if lft is not None else []
    problems, why = (result.errors, "InvalidSpec") if not result.ok else (refused, "PolicyViolation")
    lft = lft if not refused else None
    state = State(
        phase=status.get("phase"), valid=lft is not None, suspend=bool(body["spec"].get("suspend")),
        run_hash=run_hash(lft.spec) if lft else "", status_run_hash=status.get("runHash"), resumed=resumed,
    )
    action = decide(state)
    logger.debug("phase %s -> %s", state.phase, action.value)

    if action is Action.REJECT:
        errors = "; ".join(str(p) for p in problems)
        conditions = st.set_condition(conditions, st.VALID, False, why, errors, generation)
        conditions = st.set_condition(conditions, st.FAILED, True, why, errors, generation)
        await rt.kube.patch_status(FINETUNES, meta["namespace"], meta["name"], {
            "phase": "Failed", "conditions": conditions, "observedGeneration": generation,
            "queuePosition": None, "runHash": None, "assignedNodes": None})
        await rt.kube.delete_owned("Job", meta["namespace"], Names.of(meta["name"]).job, meta.get("uid"))
        await rt.kube.event(body, "Warning", reason=why, message=errors)
        return
    assert lft is not None
    warnings = "; ".join(str(p) for p in result.warnings)
    conditions = st.set_condition(conditions, st.VALID, True, "Validated", warnings, generation)
    conditions = st.clear_condition(conditions, st.CONFLICT, "Resolved", generation)

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
        await create_workload(rt, lft, placement(rt, RunSnapshot.of(body)))
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
    # The adapter of an earlier spec is not this spec's: nothing of it may be merged into the next completion.
    new_status: dict[str, Any] = {"phase": "Queued", "conditions": conditions, "observedGeneration": generation,
                                  "runHash": None, "assignedNodes": None, "jobName": None, "adapter": None}
    if state.status_run_hash != state.run_hash:
        new_status["restarts"] = 0
    await patch_status(rt, lft, new_status)
    if state.status_run_hash and state.status_run_hash != state.run_hash:
        await remove_report(rt, lft)  # what the trainer reported of the earlier spec goes with it
    if await remove_job(rt, lft):
        await rt.kube.event(body, "Normal", reason="SpecChanged", message="the spec changed: the run restarts with the new spec")
    await submit(rt, lft, body, state.run_hash)
    rt.wake.set()


async def submit(rt: Runtime, lft: LlamaFineTune, body: Any, hash_: str) -> None:
    """The run has joined the queue: the policy's submission (an external queue gets its Job at once), or a
    wait for the admission loop."""
    where = rt.policy.submission(RunSnapshot.of(body).queued())
    if where is None:
        await rt.kube.event(body, "Normal", reason="Queued", message="waiting in the GPU queue")
        return
    await create_workload(rt, lft, where)
    await patch_status(rt, lft, {"runHash": hash_, "jobName": Names.of(lft.metadata.name or "").job})
    queues = ", ".join(f"{k}={v}" for k, v in where.labels.items())
    await rt.kube.event(body, "Normal", reason="Queued", message=f"submitted to the {rt.policy.name} queue ({queues})")
