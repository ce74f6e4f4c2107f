"""Training Jobs: their progress and outcome become the LlamaFineTune's phase.

This module reads the run, its Job, the failing trainer's pods and the nodes,
asks state.finetune.job_outcome what that means, and carries out its answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from llamaops import metrics
from llamaops import status as st
from llamaops.api import LlamaFineTune
from llamaops.api.constants import (
    ANNOTATION_RUN_HASH,
    COMPONENT_TRAINER,
    FINETUNES,
    KIND_FINETUNE,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from llamaops.builders.finetune import CONTAINER, Names
from llamaops.builders.naming import controller_of
from llamaops.handlers.finetune import submit
from llamaops.handlers.runtime import Runtime, runtime
from llamaops.handlers.workload import create_workload, fail_conflict, parse, placement, read_run
from llamaops.kube import NotOwned
from llamaops.state.finetune import (
    ACTIVE,
    DONE,
    JobView,
    Outcome,
    Report,
    RunSnapshot,
    Step,
    completed_adapter,
    failing_trainer,
    job_outcome,
    lost_nodes,
)

log = logging.getLogger(__name__)


async def _job_view(rt: Runtime, job: kopf.Body, run: RunSnapshot, deleted: bool) -> JobView:
    view = JobView.of(job, run.run_hash, ANNOTATION_RUN_HASH, deleted=deleted)
    if view.failed and view.current:
        pods = await rt.kube.list_pods(run.namespace, f"batch.kubernetes.io/job-name={job['metadata']['name']}")
        view = view.with_failure(*failing_trainer(pods, CONTAINER))
    return view


def _nodes(node_index: kopf.Index) -> dict[str, dict[str, Any]]:
    return {name: node for name, store in node_index.items() for node in store}


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT_TRAINER})
@metrics.count_errors("job_event")
async def job_event(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,  # noqa: A002
                    node_index: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    rt = runtime(memo)
    owner = controller_of(body, KIND_FINETUNE)
    if owner is None or not rt.in_scope(namespace):
        return
    async with rt.lock(KIND_FINETUNE, namespace, owner):  # one writer per run: reconcile and admission wait
        await _job_changed(rt, type, body, namespace, owner, node_index, logger)


async def _job_changed(rt: Runtime, type: str, body: kopf.Body, namespace: str, owner: str,  # noqa: A002
                       node_index: kopf.Index, logger: logging.Logger) -> None:
    lft_body = await read_run(rt, namespace, owner)
    if lft_body is None:
        return  # the run is going away (a foreground deletion removes its Job first): nothing to restore
    run = RunSnapshot.of(lft_body)
    job = await _job_view(rt, body, run, deleted=type == "DELETED")
    if not job.current:
        return  # a Job of an older spec, on its way out
    lft = parse(lft_body)
    lost = lost_nodes(run.assigned_nodes, _nodes(node_index), time.time(), rt.settings.node_lost_after) \
        if run.assigned_nodes else []
    adapter, missing = None, ""
    if job.complete and run.phase not in DONE:
        # What the trainer reported, read now: its last write came before its pod ended.
        report = await rt.kube.get("ConfigMap", namespace, Names.of(run.name).report)
        adapter, missing = completed_adapter(lft, Report.of((report or {}).get("data")))
    outcomes = job_outcome(run, job, max_restarts=run.max_restarts, external=rt.policy.external, lost=lost,
                           adapter_missing=missing)
    if job.failed and not job.deleted and outcomes and not rt.first_failure(body["metadata"]["uid"]):
        return  # this Job's failure was acted on already (its FailureTarget, now its Failed condition)
    conditions = list(run.conditions)
    for outcome in outcomes:
        logger.info("training Job %s: %s %s", body["metadata"]["name"], outcome.step.value, outcome.message)
        conditions = await _carry_out(rt, outcome, lft, lft_body, run, body, conditions, adapter)


async def carry_out(rt: Runtime, namespace: str, name: str, run_hash: str | None, outcomes: list[Outcome]) -> None:
    """Outcomes decided from the indexes (the watchdog), carried out under the run's lock on the run read afresh,
    if it is still the same admitted run."""
    async with rt.lock(KIND_FINETUNE, namespace, name):
        lft_body = await read_run(rt, namespace, name)
        run = RunSnapshot.of(lft_body) if lft_body is not None else None
        if run is None or run.phase not in ACTIVE or run.run_hash != run_hash:
            return  # gone, or it moved on meanwhile
        lft, job = parse(lft_body), {"metadata": {"name": Names.of(name).job, "namespace": namespace}}
        conditions = list(run.conditions)
        for outcome in outcomes:
            conditions = await _carry_out(rt, outcome, lft, lft_body, run, job, conditions, None)


async def _carry_out(rt: Runtime, o: Outcome, lft: LlamaFineTune, lft_body: dict[str, Any], run: RunSnapshot,
                     job: kopf.Body, conditions: list[dict[str, Any]],
                     adapter: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One step of a job outcome; returns the conditions as they now are."""
    gen = lft_body["metadata"].get("generation")
    status = lft_body.get("status") or {}

    async def patch(new: dict[str, Any]) -> None:
        await rt.kube.patch_status(FINETUNES, run.namespace, run.name, new)

    if o.step is Step.RECREATE:  # a gang restart, or someone deleted it: the run goes on
        try:
            await create_workload(rt, lft, placement(rt, run))
        except NotOwned as exc:
            await fail_conflict(rt, lft_body, exc)
    elif o.step is Step.SUCCEED:
        assert adapter is not None  # completed_adapter found it, else the outcome is AdapterMissing
        conditions = st.set_condition(conditions, st.RUNNING, False, o.reason, "", gen)
        conditions = st.set_condition(conditions, st.SUCCEEDED, True, o.reason, f"adapter at {adapter['uri']}", gen)
        await patch({"phase": "Succeeded", "conditions": conditions, "adapter": adapter,
                     "completionTime": st.now(), "assignedNodes": None})
        metrics.finished(status, "Succeeded")
        await rt.kube.event(lft_body, "Normal", reason="Succeeded", message=f"adapter at {adapter['uri']}")
        rt.wake.set()
    elif o.step is Step.FAIL:
        conditions = st.set_condition(conditions, st.RUNNING, False, o.reason, o.message, gen)
        conditions = st.set_condition(conditions, st.FAILED, True, o.reason, o.message, gen)
        await patch({"phase": "Failed", "conditions": conditions, "completionTime": st.now(), "assignedNodes": None})
        if o.release:  # its pods still hold, or wait for, GPUs (a failed trainer's Job is kept, for its logs)
            await rt.kube.delete_owned("Job", run.namespace, job["metadata"]["name"], run.uid)
        metrics.finished(status, "Failed")
        await rt.kube.event(lft_body, "Warning", reason=o.reason, message=o.message[:1024])
        rt.wake.set()
    elif o.step is Step.RESTART:
        conditions = st.set_condition(conditions, st.RUNNING, False, o.reason, o.message, gen)
        # Same phase and run hash: the Job's deletion event recreates it.
        await patch({"restarts": o.restarts, "conditions": conditions})
        await rt.kube.event(lft_body, "Warning", reason=o.reason, message=f"restarting the gang: {o.message}"[:1024])
        await rt.kube.delete_owned("Job", run.namespace, job["metadata"]["name"], run.uid)
    elif o.step is Step.REQUEUE:
        # Queued first: the Job's deletion event must find the run no longer active.
        conditions = st.requeued(conditions, o.reason, o.message, gen)
        await patch({"phase": "Queued", "restarts": o.restarts, "conditions": conditions, "assignedNodes": None})
        await rt.kube.event(lft_body, "Warning", reason=o.reason, message=o.message[:1024])
        await rt.kube.delete_owned("Job", run.namespace, job["metadata"]["name"], run.uid)
        if rt.policy.external:
            try:
                await submit(rt, lft, lft_body, run.run_hash or "")
            except NotOwned as exc:
                await fail_conflict(rt, lft_body, exc)
        rt.wake.set()
    elif o.step is Step.EVICT:
        conditions = st.requeued(conditions, o.reason, o.message, gen)
        await patch({"phase": "Queued", "conditions": conditions})
        await rt.kube.event(lft_body, "Warning", reason=o.reason, message=o.message)
    elif o.step is Step.ADMIT:
        conditions = st.admitted(conditions, o.reason, o.message, gen)
        await patch({"phase": "Admitted", "conditions": conditions, "queuePosition": None})
        metrics.admitted(status, rt.policy.name)
    elif o.step is Step.START:
        conditions = st.set_condition(conditions, st.RUNNING, True, o.reason, o.message, gen)
        await patch({"phase": "Running", "conditions": conditions, "startTime": status.get("startTime") or st.now()})
        await rt.kube.event(lft_body, "Normal", reason="Running", message="training started")
    return conditions
