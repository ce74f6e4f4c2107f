"""The admission pass's glue, with the calls recorded: a failing admission backs off and says why, a long-named run's
pods are not counted twice, and an admission is never written over a change made since the run was read."""

from __future__ import annotations

import asyncio
from typing import Any

from api_cases import example
from llamaops.builders.naming import label_value
from llamaops.handlers.admission import Admitter
from llamaops.handlers.runtime import Runtime
from llamaops.kube import Stale
from llamaops.settings import Settings
from llamaops.state.finetune import RunSnapshot
from recording_kube import RecordingKube


def node(name: str, gpus: int = 8) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}, "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def finetune(name: str, phase: str = "Queued", gpus: int = 8, **status: Any) -> dict[str, Any]:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"].update(name=name, namespace="ml", uid=f"uid-{name}", generation=1, resourceVersion="7",
                           creationTimestamp="2026-01-01T00:00:00Z")
    doc["spec"]["resources"]["gpusPerNode"] = gpus
    doc["status"] = {"phase": phase, **status}
    return doc


def admitter(kube: RecordingKube, bodies: list[dict[str, Any]], nodes: list[str],
             pods: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> Admitter:
    index = {("ml", b["metadata"]["name"]): [RunSnapshot.of(b)] for b in bodies}
    return Admitter(Runtime.start(Settings(), kube), index, {n: [node(n)] for n in nodes}, pods or {})


class FailingCreate(RecordingKube):
    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        raise RuntimeError("Job.batch is invalid: spec.template...")


def test_a_failing_admission_backs_off_and_says_why() -> None:
    body = finetune("broken")
    kube = FailingCreate({"ml/broken": body})
    a = admitter(kube, [body], ["gpu-0"])
    asyncio.run(a.run_pass())
    count, _ = a.failures["ml/broken"]
    (patch,) = [s for key, s in kube.patches if key == "ml/broken"]
    queued = next(c for c in patch["conditions"] if c["type"] == "Queued")
    assert count == 1 and queued["reason"] == "AdmissionFailed" and "spec.template" in queued["message"]
    assert ("broken", "AdmissionFailed") in kube.events
    asyncio.run(a.run_pass())  # within its back-off: not tried again, nothing written
    assert a.failures["ml/broken"][0] == 1 and len(kube.patches) == 1


def test_a_long_named_runs_pods_are_counted_once() -> None:
    """Pods carry a run's name as a label value, hashed past 63 characters: they must still be known as the
    admitted run's, or its GPUs are counted twice (once reserved, once as another's pods)."""
    long = "a-fine-tune-with-a-name-long-enough-to-be-hashed-into-its-label-value"
    held = finetune(long, "Running", gpus=4, assignedNodes=["gpu-0"])
    waiting = finetune("next", gpus=4)
    pod = {"namespace": "ml", "finetune": label_value(long), "view": None,
           "spec": {"nodeName": "gpu-0", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}}]},
           "status": {"phase": "Running"}}
    kube = RecordingKube({"ml/next": waiting})
    asyncio.run(admitter(kube, [held, waiting], ["gpu-0"], {("ml", "p"): [pod]}).run_pass())
    assert [m["metadata"]["name"] for m in kube.created] == ["next-train"]


class EditedMeanwhile(RecordingKube):
    """The user suspends the run while it is being admitted: the status write made from the older read fails."""

    def __init__(self, runs: dict[str, dict[str, Any]]) -> None:
        super().__init__(runs)
        self.deleted: list[str] = []

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None = None) -> None:
        body = self.runs[f"{namespace}/{name}"]
        if resource_version is not None and resource_version != body["metadata"]["resourceVersion"]:
            raise Stale(name)
        await super().patch_status(plural, namespace, name, status, resource_version)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        await super().create(manifest)
        self.runs["ml/run"] = {**self.runs["ml/run"], "spec": {**self.runs["ml/run"]["spec"], "suspend": True},
                               "metadata": {**self.runs["ml/run"]["metadata"], "resourceVersion": "8"}}
        return None

    async def delete_owned(self, kind: str, namespace: str, name: str, owner_uid: str | None) -> bool:
        self.deleted.append(name)
        return True


def test_an_admission_is_never_written_over_a_change_made_since() -> None:
    body = finetune("run")
    kube = EditedMeanwhile({"ml/run": body})
    a = admitter(kube, [body], ["gpu-0"])
    asyncio.run(a.run_pass())
    assert kube.deleted == ["run-train"]  # what was made for it goes
    assert not [s for _, s in kube.patches if s.get("phase") == "Admitted"]
    assert "ml/run" not in a.in_flight
