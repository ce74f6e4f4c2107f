"""A stand-in for llamaops.kube.Kube that records the calls of the admission pass (unit tests of the glue)."""

from __future__ import annotations

from typing import Any


class RecordingKube:
    """The calls the admission pass makes, recorded (no API server)."""

    def __init__(self, runs: dict[str, dict[str, Any]]) -> None:
        self.runs, self.created, self.applied, self.patches, self.events = runs, [], [], [], []

    async def get_finetune(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.runs.get(f"{namespace}/{name}")

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(manifest)
        return manifest

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        self.created.append(manifest)
        return None

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None = None) -> None:
        self.patches.append((f"{namespace}/{name}", status))

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], reason))
