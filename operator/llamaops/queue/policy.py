"""The queue-policy seam: what a policy is given, what it decides, and the registry of policies.

A policy turns the waiting runs and the free capacity into a `Decision`
(which runs start now, on which nodes; where the others stand and why), and
says what joining the queue creates (`submission`): nothing, when the
operator admits runs itself, or a `Placement` made at once when an external
controller admits them (Kueue unsuspends a Job that carries its queue label).

Adding a policy is one module that calls `register` at import, plus the line
that imports it in `llamaops/queue/__init__.py`; `LLAMAOPS_QUEUE_MODE` (the
chart's `queue.mode`) picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llamaops.queue.capacity import NodeCapacity


@dataclass(frozen=True)
class QueuedRun:
    """A waiting run, as every policy sees it."""

    key: str  # namespace/name
    priority: int
    created: float  # creation time, seconds since the epoch
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_product: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    overtaken: int = 0  # times later runs were admitted past it (the backfill bound)
    queue_name: str | None = None  # spec.queue.name

    def sort_key(self) -> tuple[int, float, str]:
        """Priority (higher first), then age (older first), then name."""
        return (-self.priority, self.created, self.key)


@dataclass(frozen=True)
class Placement:
    """Where a run's Job goes: the nodes admission counted its GPUs on, and what an external queue needs on the
    Job (its labels, created suspended so that the queue's controller starts it)."""

    nodes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    suspend: bool = False


@dataclass
class Decision:
    admitted: dict[str, list[str]] = field(default_factory=dict)  # key -> nodes it fits on
    positions: dict[str, int] = field(default_factory=dict)  # key -> 1-based place among the waiting
    reasons: dict[str, str] = field(default_factory=dict)  # key -> why it waits
    overtaken: dict[str, int] = field(default_factory=dict)  # key -> updated count, for the waiting
    reserved: dict[str, list[str]] = field(default_factory=dict)  # key -> nodes held for it
    unfit: set[str] = field(default_factory=set)  # keys that cannot fit the cluster as it is, however long they wait


@dataclass(frozen=True)
class PolicyConfig:
    """The operator settings policies read (llamaops.settings.Settings fills it in)."""

    backfill_limit: int = 3
    default_queue: str = "default"  # an external queue's name for runs that name none


@runtime_checkable
class QueuePolicy(Protocol):
    name: str
    # True: an external controller admits runs (submission() places every run, admit() is never called), so the
    # operator counts no capacity and may watch only the namespaces it serves.
    external: bool

    def submission(self, run: QueuedRun) -> Placement | None:
        """What joining the queue creates at once: None waits for `admit`; a Placement creates the workload."""
        ...

    def admit(self, queue: Sequence[QueuedRun], capacity: Sequence[NodeCapacity]) -> Decision:
        """Which waiting runs start now and where; the positions and reasons of the rest."""
        ...


PolicyFactory = Callable[[PolicyConfig], QueuePolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str, factory: PolicyFactory) -> None:
    """Make a policy selectable by name (LLAMAOPS_QUEUE_MODE)."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, config: PolicyConfig | None = None) -> QueuePolicy:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown queue policy {name!r}: use one of {', '.join(names())}") from None
    return factory(config or PolicyConfig())
