"""Reading our objects as models, and creating and removing a run's workload."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError

from llamaops import status as st
from llamaops.api import LlamaFineTune
from llamaops.api.constants import ANNOTATION_PLACEMENT, ANNOTATION_RUN_HASH, FINETUNES
from llamaops.api.finetune import FineTuneStatus, Progress
from llamaops.builders.finetune import Names, workload
from llamaops.handlers.runtime import Runtime
from llamaops.kube import NotOwned
from llamaops.queue import Placement
from llamaops.state.finetune import RunSnapshot

# The metadata our models read; the server's bookkeeping (managedFields, resourceVersion...) is left out.
METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp")


def manifest(body: Any, with_status: bool = False) -> dict[str, Any]:
    """An object of ours as read from the API server, as a manifest our models and validators read.

    The status is left out unless asked for (it is ours, and may lag the spec); kopf's
    bookkeeping in it is always left out.
    """
    meta = body["metadata"]
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {k: meta.get(k) for k in METADATA}, "spec": dict(body["spec"])}
    if with_status:
        doc["status"] = {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"} or None
    return doc


def parse(body: Any) -> LlamaFineTune:
    """The object as our model. Of its status only the trainer's last progress is kept (its step time sizes the
    Job's termination grace period); the rest is ours, and may lag the spec."""
    lft = LlamaFineTune.model_validate(manifest(body))
    progress = (body.get("status") or {}).get("progress")
    if progress:
        try:
            lft.status = FineTuneStatus(progress=Progress.model_validate(progress, strict=False))
        except ValidationError:
            pass  # written by an operator of another version: the Job gets the default grace period
    return lft


def placement(rt: Runtime, run: RunSnapshot) -> Placement:
    """Where an active run's Job goes when it is made again: an external queue's placement (Kueue admits it
    anew, within its quota), else the nodes admission assigned."""
    if rt.policy.external:
        return rt.policy.submission(run.queued()) or Placement()
    return Placement(nodes=run.assigned_nodes)


async def create_workload(rt: Runtime, lft: LlamaFineTune, where: Placement) -> None:
    """Everything the Job's pods use first (together), then the Job.

    The Job is created, not applied: its pod template is immutable, and a changed spec gets a new Job. A Job
    already there is taken only when it is this spec's for this placement (its run hash, and the nodes admission
    counted its GPUs on); another, left by a crash between its creation and the status that records it, is
    deleted and made again (kept, its pods would hold GPUs the status says are elsewhere). Raises kube.NotOwned
    when a name is taken by an object the run does not control (never adopted)."""
    w = workload(lft, rt.settings, where)
    await asyncio.gather(*(rt.kube.apply(m) for m in w.in_creation_order() if m["kind"] != "Job"))
    existing = await rt.kube.create(w.job)
    if existing is not None and _made_for(existing) != _made_for(w.job):
        await rt.kube.delete_owned("Job", existing["metadata"]["namespace"], existing["metadata"]["name"],
                                   lft.metadata.uid)
        if await rt.kube.create(w.job) is not None:
            raise RuntimeError(f"Job {w.job['metadata']['name']} of an earlier spec is still being deleted")


def _made_for(job: dict[str, Any]) -> tuple[str | None, str | None]:
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_RUN_HASH), annotations.get(ANNOTATION_PLACEMENT)


async def read_run(rt: Runtime, namespace: str, name: str) -> dict[str, Any] | None:
    """The run as the server has it now; None when it is gone or going (its children go with it)."""
    body = await rt.kube.get_finetune(namespace, name)
    return None if body is None or body["metadata"].get("deletionTimestamp") else body


async def fail_conflict(rt: Runtime, body: Any, exc: NotOwned) -> None:
    """The run cannot get its workload: Failed, with a Conflict condition and Event naming the object."""
    meta = body["metadata"]
    conditions = st.set_condition((body.get("status") or {}).get("conditions"), st.CONFLICT, True, "NotOwned",
                                  str(exc), meta.get("generation"))
    conditions = st.set_condition(conditions, st.FAILED, True, "Conflict", str(exc), meta.get("generation"))
    await rt.kube.patch_status(FINETUNES, meta["namespace"], meta["name"], {
        "phase": "Failed", "conditions": conditions, "queuePosition": None, "assignedNodes": None})
    await rt.kube.event(body, "Warning", reason="Conflict", message=str(exc))


async def remove_job(rt: Runtime, lft: LlamaFineTune) -> bool:
    """Delete the run's Job (its pods go with it); the rest of the workload is harmless and reused."""
    return await rt.kube.delete_owned("Job", lft.metadata.namespace or "default",
                                      Names.of(lft.metadata.name or "").job, lft.metadata.uid)


async def remove_report(rt: Runtime, lft: LlamaFineTune) -> None:
    """Delete the report ConfigMap (admission makes a fresh one for the next Job)."""
    await rt.kube.delete_owned("ConfigMap", lft.metadata.namespace or "default",
                               Names.of(lft.metadata.name or "").report, lft.metadata.uid)


async def patch_status(rt: Runtime, lft: LlamaFineTune, status: dict[str, Any]) -> None:
    await rt.kube.patch_status(FINETUNES, lft.metadata.namespace or "default", lft.metadata.name or "", status)
