"""What the handlers share at run time: settings, the client, the admission trigger."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from llamaops.kube import Kube
from llamaops.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    # Set whenever something that may change an admission happens: a run queued
    # or gone, a GPU pod finished, a node changed.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # kopf runs resource handlers only once its indexes are complete; the first
    # one to run opens the admission loop, so it never sees half-listed capacity.
    indexes_ready: asyncio.Event = field(default_factory=asyncio.Event)
    overtaken: dict[str, int] = field(default_factory=dict)

    def in_scope(self, namespace: str | None) -> bool:
        return not self.settings.namespaces or namespace in self.settings.namespaces


_current: Runtime | None = None


def set_runtime(rt: Runtime) -> None:
    global _current
    _current = rt


def runtime() -> Runtime:
    if _current is None:
        raise RuntimeError("the operator runtime is not started")
    return _current
