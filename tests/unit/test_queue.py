"""The built-in GPU queue: capacity accounting and admission decisions."""

from __future__ import annotations

from llamaops.queue import NodeCapacity, QueuedRun, admit, free_capacity
from llamaops.queue.capacity import Taint, pod_gpu_request

H100 = "NVIDIA-H100-80GB-HBM3"
GPU_TAINT_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def node(name: str, free: int, alloc: int = 8, product: str = H100, **kw) -> NodeCapacity:
    return NodeCapacity(name, alloc, free, {"nvidia.com/gpu.product": product, **kw.pop("labels", {})}, **kw)


def run(key: str, priority: int = 0, created: float = 0, nodes: int = 1, gpus: int = 1, **kw) -> QueuedRun:
    return QueuedRun(key, priority, created, nodes, gpus, **kw)


def test_priority_then_age_orders_the_queue() -> None:
    d = admit([run("old-low", 0, 1), run("new-high", 5, 9), run("old-high", 5, 2), run("mid", 1, 3)], [])
    assert list(d.positions) == ["old-high", "new-high", "mid", "old-low"]
    assert d.positions["old-high"] == 1 and d.positions["old-low"] == 4


def test_gang_needs_all_nodes_at_once() -> None:
    runs = [run("big", nodes=2, gpus=8)]
    assert admit(runs, [node("a", 8), node("b", 7)]).admitted == {}
    assert admit(runs, [node("a", 8), node("b", 8)]).admitted == {"big": ["a", "b"]}
    # two pods of one gang never share a node
    assert admit([run("two", nodes=2, gpus=4)], [node("a", 8)]).admitted == {}


def test_capacity_is_consumed_within_one_decision() -> None:
    d = admit([run("x", created=1, gpus=6), run("y", created=2, gpus=6), run("z", created=3, gpus=2)],
              [node("a", 8), node("b", 8)])
    assert d.admitted == {"x": ["a"], "y": ["b"], "z": ["a"]}
    assert d.positions == {}


def test_best_fit_keeps_whole_nodes_for_big_gangs() -> None:
    d = admit([run("small", created=1, gpus=2), run("whole", created=2, gpus=8)], [node("a", 8), node("b", 3)])
    assert d.admitted == {"small": ["b"], "whole": ["a"]}


def test_product_selector_and_taints_filter_nodes() -> None:
    nodes = [node("a100", 8, product="NVIDIA-A100-SXM4-80GB"),
             node("tainted", 8, taints=(Taint("nvidia.com/gpu", None, "NoSchedule"),)),
             node("plain", 8, labels={"zone": "b"})]
    assert admit([run("r", gpu_product=H100, node_selector={"zone": "b"})], nodes).admitted == {"r": ["plain"]}
    assert admit([run("r", gpu_product="NVIDIA-A100-SXM4-80GB")], nodes).admitted == {"r": ["a100"]}
    only_tainted = [nodes[1]]
    assert admit([run("r")], only_tainted).admitted == {}
    assert admit([run("r", tolerations=[GPU_TAINT_TOLERATION])], only_tainted).admitted == {"r": ["tainted"]}


def test_unschedulable_nodes_are_skipped() -> None:
    assert admit([run("r")], [node("cordoned", 8, schedulable=False)]).admitted == {}


def test_backfill_is_bounded_and_then_reserves() -> None:
    nodes = [node("a", 4), node("b", 4)]
    head = run("head", created=1, nodes=1, gpus=8)
    small = run("small", created=2, gpus=4)
    d = admit([head, small], nodes)
    assert d.admitted == {"small": ["a"]}  # backfilled past the head ...
    assert d.overtaken == {"head": 1} and d.positions == {"head": 1}
    assert "waiting for 1 node with 8 free" in d.reasons["head"]
    # ... until the head has been overtaken backfill_limit times: then it holds the node closest to fitting
    starving = run("head", created=1, nodes=1, gpus=8, overtaken=3)
    d = admit([starving, small], [node("a", 4), node("b", 6)], backfill_limit=3)
    assert d.reserved == {"head": ["b"]}
    assert d.admitted == {"small": ["a"]}  # the other node is still open
    d = admit([starving, run("small", created=2, gpus=6)], [node("a", 4), node("b", 6)], backfill_limit=3)
    assert d.admitted == {} and d.positions == {"head": 1, "small": 2}


def test_run_that_can_never_fit_blocks_nobody() -> None:
    d = admit([run("huge", created=1, nodes=3, gpus=8, overtaken=99), run("ok", created=2, gpus=8)],
              [node("a", 8), node("b", 8)])
    assert d.admitted == {"ok": ["a"]}
    assert "cannot fit this cluster" in d.reasons["huge"] and d.reserved == {}


def test_cpu_runs_need_no_gpus() -> None:
    assert admit([run("cpu", gpus=0)], []).admitted == {"cpu": []}


POD = {"spec": {"nodeName": "a", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "3"}}},
                                                 {"resources": {"requests": {"nvidia.com/gpu": 1}}}]},
       "status": {"phase": "Running"}}


def test_pod_requests_count_containers_and_init_containers() -> None:
    assert pod_gpu_request(POD) == 4
    init = {"spec": {"initContainers": [{"resources": {"limits": {"nvidia.com/gpu": "6"}}}], "containers": []}}
    assert pod_gpu_request(init) == 6


def test_free_capacity_counts_every_live_pod() -> None:
    nodes = [{"metadata": {"name": "a", "labels": {"nvidia.com/gpu.product": H100}},
              "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]},
              "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}},
             {"metadata": {"name": "b"}, "spec": {"unschedulable": True},
              "status": {"allocatable": {}, "conditions": [{"type": "Ready", "status": "True"}]}}]
    done = {**POD, "status": {"phase": "Succeeded"}}
    pending = {"spec": {"containers": POD["spec"]["containers"]}, "status": {"phase": "Pending"}}
    cap = {n.name: n for n in free_capacity(nodes, [POD, done, pending])}
    assert cap["a"].free == 4 and cap["a"].allocatable == 8 and cap["a"].product == H100
    assert cap["a"].taints == (Taint("k", None, "NoSchedule"),)
    assert cap["b"].free == 0 and not cap["b"].schedulable
