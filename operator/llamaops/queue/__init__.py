"""The GPU queue: pure admission logic, no I/O.

`capacity` turns Nodes and Pods into free GPUs per node; `policy` is the seam
(QueuedRun in, Decision and Placement out, a registry by name); each policy
module registers itself when imported below: `priority` (the built-in
priority/age/gang/backfill queue) and `kueue` (Kueue admits).
"""

from llamaops.queue import kueue, priority  # noqa: F401  (registers the policies)
from llamaops.queue.capacity import NodeCapacity, free_capacity
from llamaops.queue.policy import Decision, Placement, PolicyConfig, QueuedRun, QueuePolicy, create, names, register
from llamaops.queue.priority import admit

__all__ = ["Decision", "NodeCapacity", "Placement", "PolicyConfig", "QueuePolicy", "QueuedRun", "admit", "create",
           "free_capacity", "names", "register"]
