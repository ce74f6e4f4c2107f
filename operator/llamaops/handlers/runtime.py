"""What the handlers share at run time, kept in kopf's memo (`memo.runtime`), never in module globals.

The operator puts one Runtime into the memo it starts kopf with; kopf hands
every handler, index and filter a shallow copy of that memo, so all of them
see this one object.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from llamaops.kube import Kube
from llamaops.queue import QueuePolicy
from llamaops.settings import Settings

FAILED_JOBS_KEPT = 4096


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    policy: QueuePolicy
    # Set whenever something that may change an admission happens: a run queued
    # or gone, a GPU pod finished, a node changed.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # kopf runs resource handlers only once its indexes are complete; the first
    # one to run opens the admission loop, so it never sees half-listed capacity.
    indexes_ready: asyncio.Event = field(default_factory=asyncio.Event)
    overtaken: dict[str, int] = field(default_factory=dict)
    # One writer per object at a time (a run's reconcile, admission, Job and watchdog handlers; a serve's
    # triggers): a lock per (kind, namespace, name), dropped once nobody holds or waits for it.
    _locks: weakref.WeakValueDictionary[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary)
    # What a referenced run last looked like ((phase, adapter, completion) by (namespace, name)): its
    # events re-reconcile the serves that use it only when that changes, not on every progress patch.
    seen_runs: dict[tuple[str, str], Any] = field(default_factory=dict)
    # uids of the failed training Jobs already acted on (restarted, requeued or failed): a Job reports its failure
    # twice (FailureTarget, then Failed), and a restart must be counted once.
    failed_jobs: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def first_failure(self, job_uid: str) -> bool:
        """True the first time a Job's failure is seen (remembers the last FAILED_JOBS_KEPT of them)."""
        if job_uid in self.failed_jobs:
            return False
        self.failed_jobs[job_uid] = None
        while len(self.failed_jobs) > FAILED_JOBS_KEPT:
            self.failed_jobs.popitem(last=False)
        return True

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        """The object's lock: `async with rt.lock(...)` around reading it, deciding and writing."""
        key = (kind, namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    @classmethod
    def start(cls, settings: Settings, kube: Kube) -> Runtime:
        return cls(settings=settings, kube=kube, policy=settings.queue_policy())

    def in_scope(self, namespace: str | None) -> bool:
        return not self.settings.namespaces or namespace in self.settings.namespaces


def runtime(memo: Any) -> Runtime:
    """The Runtime in a handler's memo."""
    rt = getattr(memo, "runtime", None)
    if rt is None:
        raise RuntimeError("the operator runtime is not in kopf's memo (start it with llamaops.operator.run)")
    return rt


def in_scope(namespace: str | None, memo: Any, **_: Any) -> bool:
    """kopf filter: the object's namespace is one this operator manages."""
    return runtime(memo).in_scope(namespace)
