"""Demo mode in the built-in queue: runs are admitted without counting GPUs (the dev node trains on CPU)."""

from __future__ import annotations

from llamaops.queue import admit
from llamaops.queue.capacity import NodeCapacity
from llamaops.state.finetune import RunSnapshot

SNAPSHOT = RunSnapshot.of({
    "metadata": {"namespace": "ns", "name": "run", "creationTimestamp": "2026-01-01T00:00:00Z"},
    "spec": {"queue": {"priority": 0}, "resources": {"nodes": 2, "gpusPerNode": 8,
                                                     "gpuProduct": "NVIDIA-H100-80GB-HBM3"}}})
NO_GPUS = [NodeCapacity("local-cpu", allocatable=0, free=0)]


def test_a_gpu_run_waits_without_gpus_but_is_admitted_in_demo_mode() -> None:
    normal = SNAPSHOT.queued(0)
    assert normal.gpus_per_node == 8 and normal.gpu_product == "NVIDIA-H100-80GB-HBM3"
    assert "ns/run" not in admit([normal], NO_GPUS).admitted
    demo = SNAPSHOT.queued(0, cpu_only=True)
    assert demo.gpus_per_node == 0 and demo.nodes == 2 and demo.gpu_product is None
    assert admit([demo], NO_GPUS).admitted == {"ns/run": []}  # _admit then assigns the dev node
