"""The Kueue queue policy ("kueue"): Kueue admits, within its ClusterQueues' quota.

Every run that joins the queue gets its Job at once, suspended and labelled
with its LocalQueue (spec.queue.name, else the operator's default); Kueue
creates a Workload for it and unsuspends the Job when it fits. The operator
counts no capacity itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from llamaops.api.constants import KUEUE_QUEUE_LABEL
from llamaops.queue.capacity import NodeCapacity
from llamaops.queue.policy import Decision, Placement, PolicyConfig, QueuedRun, register


class KueuePolicy:
    name = "kueue"
    external = True

    def __init__(self, config: PolicyConfig) -> None:
        self.default_queue = config.default_queue

    def submission(self, run: QueuedRun) -> Placement:
        return Placement(labels={KUEUE_QUEUE_LABEL: run.queue_name or self.default_queue}, suspend=True)

    def admit(self, queue: Sequence[QueuedRun], capacity: Sequence[NodeCapacity]) -> Decision:
        return Decision()  # Kueue decides


register(KueuePolicy.name, KueuePolicy)
