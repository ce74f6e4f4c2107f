"""Training Jobs: their progress and outcome become the LlamaFineTune's phase.

A failed Job is a failed gang. Exit codes the trainer reserves for bad
configuration or data fail the run at once (the Job's podFailurePolicy stops
it); anything else restarts the whole gang, up to spec.maxRestarts, and the
trainer resumes from its newest checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from llamaops import metrics
from llamaops import status as st
from llamaops.builders.finetune import CONTAINER, Placement, adapter_uri
from llamaops.builders.naming import ANNOTATION_RUN_HASH, LABEL_COMPONENT, MANAGED_BY, controller_of
from llamaops.handlers.runtime import runtime
from llamaops.handlers.workload import PLURAL, create_workload, parse
from llamaops.lifecycle import ACTIVE

TAIL = 2048
log = logging.getLogger(__name__)


def _job_condition(job: kopf.Body, type_: str) -> dict[str, Any] | None:
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == type_ and c.get("status") == "True"), None)


async def _failure_tail(namespace: str, job_name: str) -> tuple[int | None, str]:
    """The failing trainer's exit code and the tail of its termination message."""
    pods = await runtime().kube.list_pods(namespace, f"batch.kubernetes.io/job-name={job_name}")
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if cs.get("name") == CONTAINER and term.get("exitCode"):
                message = (term.get("message") or term.get("reason") or "").strip()
                return term["exitCode"], message[-TAIL:]
    return None, ""


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_COMPONENT: "trainer"})
@metrics.count_errors("job_event")
async def job_event(type: str, body: kopf.Body, namespace: str, logger: logging.Logger, **_: Any) -> None:  # noqa: A002
    rt = runtime()
    owner = controller_of(body, "LlamaFineTune")
    if owner is None or not rt.in_scope(namespace):
        return
    lft_body = await rt.kube.get_finetune(namespace, owner)
    if lft_body is None or lft_body["metadata"].get("deletionTimestamp"):
        return  # the run is going away (a foreground deletion removes its Job first): nothing to restore
    status = lft_body.get("status") or {}
    phase, gen = status.get("phase"), lft_body["metadata"].get("generation")
    current = body["metadata"].get("annotations", {}).get(ANNOTATION_RUN_HASH) == status.get("runHash")
    if not current:
        return  # a Job of an older spec, on its way out
    lft = parse(lft_body)
    conditions = list(status.get("conditions") or [])

    async def patch(new: dict[str, Any]) -> None:
        await rt.kube.patch_status(PLURAL, namespace, owner, new)

    if type == "DELETED":
        if phase in ACTIVE:  # a gang restart, or someone deleted it: the run goes on
            await create_workload(rt, lft, Placement(nodes=tuple(status.get("assignedNodes") or ())))
        return

    if _job_condition(body, "Complete"):
        if phase == "Succeeded":
            return
        # The trainer reports what only it knows (the adapter's real rank, an S3 location);
        # the operator fills in the rest.
        reported = status.get("adapter") or {}
        adapter = {"baseModel": lft.spec.model.base_model, "r": lft.spec.lora.r, "loraAlpha": lft.spec.lora.lora_alpha,
                   **reported, "uri": reported.get("uri") or adapter_uri(lft) or ""}
        if lft.spec.system_prompt:
            adapter["systemPrompt"] = lft.spec.system_prompt
        conditions = st.set_condition(conditions, st.RUNNING, False, "Completed", "", gen)
        conditions = st.set_condition(conditions, st.SUCCEEDED, True, "Completed", f"adapter at {adapter['uri']}", gen)
        await patch({"phase": "Succeeded", "conditions": conditions, "adapter": adapter,
                     "completionTime": st.now(), "assignedNodes": None})
        metrics.finished(status, "Succeeded")
        await rt.kube.event(lft_body, "Normal", reason="Succeeded", message=f"adapter at {adapter['uri']}")
        rt.wake.set()
        return

    failed = _job_condition(body, "Failed")
    if failed:
        if phase == "Failed":
            return
        code, tail = await _failure_tail(namespace, body["metadata"]["name"])
        restarts = int(status.get("restarts") or 0)
        why = failed.get("reason", "Failed")
        retryable = why not in ("PodFailurePolicy", "DeadlineExceeded") and restarts < lft.spec.max_restarts
        detail = f"exit code {code}: {tail}" if code is not None else (failed.get("message") or why)
        if retryable:
            conditions = st.set_condition(conditions, st.RUNNING, False, "Restarting",
                                          f"restart {restarts + 1}/{lft.spec.max_restarts} after {detail}", gen)
            # Same phase and run hash: the Job's deletion event recreates it.
            await patch({"restarts": restarts + 1, "conditions": conditions})
            await rt.kube.event(lft_body, "Warning", reason="Restarting",
                      message=f"restarting the gang ({restarts + 1}/{lft.spec.max_restarts}): {detail}"[:1024])
            await rt.kube.delete_job(namespace, body["metadata"]["name"])
            return
        reason = {"PodFailurePolicy": "TrainerError", "DeadlineExceeded": "DeadlineExceeded"}.get(
            why, "RestartsExhausted")
        conditions = st.set_condition(conditions, st.RUNNING, False, reason, detail, gen)
        conditions = st.set_condition(conditions, st.FAILED, True, reason, detail, gen)
        await patch({"phase": "Failed", "conditions": conditions, "completionTime": st.now(),
                     "assignedNodes": None})
        metrics.finished(status, "Failed")
        await rt.kube.event(lft_body, "Warning", reason=reason, message=detail[:1024])
        rt.wake.set()
        return

    job_status = body.get("status") or {}
    if body["spec"].get("suspend"):
        return  # Kueue has not admitted it yet
    if phase == "Queued" and rt.settings.queue_mode == "kueue":
        conditions = st.set_condition(conditions, st.QUEUED, False, "Admitted", "admitted by Kueue", gen)
        conditions = st.set_condition(conditions, st.ADMITTED, True, "Admitted", "admitted by Kueue", gen)
        await patch({"phase": "Admitted", "conditions": conditions, "queuePosition": None})
        metrics.admitted(status, "kueue")
        phase = "Admitted"
    if phase == "Admitted" and (job_status.get("ready") or 0) > 0:
        conditions = st.set_condition(conditions, st.RUNNING, True, "Started",
                                      f"{job_status.get('ready')} of {lft.spec.resources.nodes} pod(s) ready", gen)
        await patch({"phase": "Running", "conditions": conditions, "startTime": status.get("startTime") or st.now()})
        await rt.kube.event(lft_body, "Normal", reason="Running", message="training started")
