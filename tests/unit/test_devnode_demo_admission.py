"""Demo mode in the built-in queue: runs are admitted without counting GPUs (the dev node trains on CPU)."""

from __future__ import annotations

from llamaops.handlers.admission import queued_run
from llamaops.queue import admit
from llamaops.queue.capacity import NodeCapacity

SNAPSHOT = {"priority": 0, "created": "2026-01-01T00:00:00Z", "nodes": 2, "gpus_per_node": 8,
            "gpu_product": "NVIDIA-H100-80GB-HBM3", "node_selector": {}, "tolerations": []}
NO_GPUS = [NodeCapacity("local-cpu", allocatable=0, free=0)]


def test_a_gpu_run_waits_without_gpus_but_is_admitted_in_demo_mode() -> None:
    normal = queued_run("ns/run", SNAPSHOT, 0)
    assert normal.gpus_per_node == 8 and normal.gpu_product == "NVIDIA-H100-80GB-HBM3"
    assert "ns/run" not in admit([normal], NO_GPUS).admitted
    demo = queued_run("ns/run", SNAPSHOT, 0, dev_node="local-cpu")
    assert demo.gpus_per_node == 0 and demo.nodes == 2 and demo.gpu_product is None
    assert admit([demo], NO_GPUS).admitted == {"ns/run": []}  # _admit then assigns the dev node
