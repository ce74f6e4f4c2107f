"""The built-in GPU queue: pure admission logic, no I/O.

`capacity` turns Nodes and Pods into free GPUs per node; `admission` decides,
from the queue and that capacity, which runs start now and where the others
stand. The handlers feed both from the cluster and act on the decision.
"""

from llamaops.queue.admission import Decision, QueuedRun, admit
from llamaops.queue.capacity import NodeCapacity, free_capacity

__all__ = ["Decision", "NodeCapacity", "QueuedRun", "admit", "free_capacity"]
