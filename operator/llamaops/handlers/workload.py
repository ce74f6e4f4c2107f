"""Reading our objects as models, and creating and removing a run's workload."""

from __future__ import annotations

import asyncio
from typing import Any

from llamaops.api import LlamaFineTune
from llamaops.api.constants import FINETUNES
from llamaops.builders.finetune import Names, workload
from llamaops.handlers.runtime import Runtime
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
    """The object as our model (status left out: it is ours, and may lag the spec)."""
    return LlamaFineTune.model_validate(manifest(body))


def placement(rt: Runtime, run: RunSnapshot) -> Placement:
    """Where an active run's Job goes when it is made again: an external queue's placement (Kueue admits it
    anew, within its quota), else the nodes admission assigned."""
    if rt.policy.external:
        return rt.policy.submission(run.queued()) or Placement()
    return Placement(nodes=run.assigned_nodes)


async def create_workload(rt: Runtime, lft: LlamaFineTune, where: Placement) -> None:
    w = workload(lft, rt.settings, where)
    # Everything the Job's pods use first (together), then the Job. The Job is created, not
    # applied: its pod template is immutable, and a changed spec gets a new Job.
    await asyncio.gather(*(rt.kube.apply(m) for m in w.in_creation_order() if m["kind"] != "Job"))
    await rt.kube.create(w.job)


async def remove_job(rt: Runtime, lft: LlamaFineTune) -> bool:
    """Delete the Job (its pods go with it); the rest of the workload is harmless and reused."""
    return await rt.kube.delete_job(lft.metadata.namespace or "default", Names.of(lft.metadata.name or "").job)


async def patch_status(rt: Runtime, lft: LlamaFineTune, status: dict[str, Any]) -> None:
    await rt.kube.patch_status(FINETUNES, lft.metadata.namespace or "default", lft.metadata.name or "", status)
