"""Creating and removing a run's workload, and the status transitions around it."""

from __future__ import annotations

import asyncio
from typing import Any

from llamaops.api import LlamaFineTune
from llamaops.builders.finetune import Names, Placement, workload
from llamaops.handlers.runtime import Runtime

PLURAL = "llamafinetunes"


def parse(body: Any) -> LlamaFineTune:
    """The object as our model (status left out: it is ours, and may lag the spec)."""
    meta = body["metadata"]
    return LlamaFineTune.model_validate({
        "apiVersion": body.get("apiVersion"), "kind": "LlamaFineTune",
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation", "creationTimestamp")},
        "spec": dict(body["spec"]),
    })


async def create_workload(rt: Runtime, lft: LlamaFineTune, placement: Placement) -> None:
    w = workload(lft, rt.settings, placement)
    # Everything the Job's pods use first (together), then the Job. The Job is created, not
    # applied: its pod template is immutable, and a changed spec gets a new Job.
    await asyncio.gather(*(rt.kube.apply(m) for m in w.in_creation_order() if m["kind"] != "Job"))
    await rt.kube.create(w.job)


async def remove_job(rt: Runtime, lft: LlamaFineTune) -> bool:
    """Delete the Job (its pods go with it); the rest of the workload is harmless and reused."""
    return await rt.kube.delete_job(lft.metadata.namespace or "default", Names.of(lft.metadata.name or "").job)


async def patch_status(rt: Runtime, lft: LlamaFineTune, status: dict[str, Any]) -> None:
    await rt.kube.patch_status(PLURAL, lft.metadata.namespace or "default", lft.metadata.name or "", status)
