"""What `llamaops watch`, `queue` and `logs` make of objects as the API server returns them (pure parts)."""

from __future__ import annotations

import datetime as dt

from llamaops.cli.logs import merge_by_time, prefixed_lines, training_pods
from llamaops.cli.queue import active_runs, gpu_use, queue_rows, render
from llamaops.cli.watch import Board, line, view
from rich.console import Console

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def lft(name: str, phase: str | None = None, ns: str = "team", **status) -> dict:
    obj = {"metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T11:00:00Z"},
           "spec": {"resources": {"gpusPerNode": 8, "nodes": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
                    "queue": {"priority": 0}},
           "status": {"phase": phase, **status} if phase else {}}
    return obj


def test_running_view_counts_the_eta_down_from_the_update() -> None:
    obj = lft("a", "Running", progress={"step": 10, "totalSteps": 40, "epoch": 0.25, "loss": 1.2345,
                                        "tokensPerSecond": 1500.4, "etaSeconds": 90,
                                        "updatedAt": "2026-01-01T11:59:30Z"})
    v = view(obj, NOW)
    assert (v.step, v.total_steps, v.eta_seconds) == (10, 40, 60)
    assert line(v) == "team/a Running step 10/40 epoch 0.25 loss 1.234 tok/s 1500 eta 1:00"


def test_queued_failed_succeeded_lines() -> None:
    queued = lft("q", "Queued", queuePosition=2, conditions=[
        {"type": "Queued", "status": "True", "reason": "Queued",
         "message": "position 2: waiting for 2 nodes with 8 free NVIDIA-H100-80GB-HBM3s"}])
    assert line(view(queued)) == "team/q Queued position 2: waiting for 2 nodes with 8 free NVIDIA-H100-80GB-HBM3s"
    failed = lft("f", "Failed", conditions=[
        {"type": "Failed", "status": "True", "reason": "BadData", "message": "spec.dataset: no assistant turn"}])
    assert line(view(failed)) == "team/f Failed: BadData: spec.dataset: no assistant turn"
    done = lft("s", "Succeeded", adapter={"uri": "pvc://adapters/team/s/adapter", "baseModel": "x", "r": 8})
    assert line(view(done)) == "team/s Succeeded: adapter pvc://adapters/team/s/adapter"
    assert line(view(lft("p"))) == "team/p Pending"


def test_board_renders_every_state() -> None:
    board = Board()
    board.objects = {o["metadata"]["name"]: o for o in [
        lft("run", "Running", progress={"step": 3, "totalSteps": 10, "loss": 2.0}),
        lft("wait", "Queued", queuePosition=1),
        lft("ok", "Succeeded", adapter={"uri": "s3://b/p", "baseModel": "x", "r": 8}),
        lft("bad", "Failed", conditions=[{"type": "Failed", "status": "True", "reason": "X", "message": "y"}])]}
    console = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(board)
    text = console.export_text()
    assert "3/10" in text and "queue position 1" in text and "adapter: s3://b/p" in text and "X: y" in text


def test_queue_rows_in_queue_order_with_the_reason() -> None:
    items = [
        lft("later", "Queued", queuePosition=2, conditions=[
            {"type": "Queued", "status": "True", "reason": "Queued", "lastTransitionTime": "2026-01-01T11:50:00Z",
             "message": "position 2: waiting for 2 node(s) with 8 free GPUs"}]),
        lft("first", "Queued", queuePosition=1),
        lft("running", "Running"),
        lft("new"),
    ]
    rows = queue_rows(items, NOW)
    assert [r.name for r in rows] == ["first", "later", "new"]
    later = rows[1]
    assert later.why == "waiting for 2 node(s) with 8 free GPUs"
    assert later.waiting_seconds == 600 and later.gpus == 16
    assert rows[2].why == "not yet seen by the operator"
    assert active_runs(items) == (1, 16)


def test_runs_without_a_position_wait_in_the_queues_own_order() -> None:
    """Runs the operator has given no position yet: priority, then creation (not when they were queued), then
    namespace/name, as the operator's queue orders them (QueuedRun.sort_key)."""
    from llamaops.queue import QueuedRun

    def waiting(name: str, created: str, queued: str, priority: int = 0, ns: str = "team") -> dict:
        obj = lft(name, "Queued", ns=ns, conditions=[{"type": "Queued", "status": "True", "reason": "Queued",
                                                      "message": "waiting for GPUs", "lastTransitionTime": queued}])
        obj["metadata"]["creationTimestamp"] = created
        obj["spec"]["queue"]["priority"] = priority
        return obj

    items = [
        waiting("young", "2026-01-01T11:30:00Z", "2026-01-01T11:30:01Z"),
        waiting("edited", "2026-01-01T10:00:00Z", "2026-01-01T11:59:00Z"),  # queued again after a spec edit
        waiting("urgent", "2026-01-01T11:50:00Z", "2026-01-01T11:50:00Z", priority=10),
        waiting("twin", "2026-01-01T11:40:00Z", "2026-01-01T11:40:00Z", ns="team-b"),
        waiting("twin", "2026-01-01T11:40:00Z", "2026-01-01T11:40:00Z"),
        lft("placed", "Queued", queuePosition=1),
    ]
    rows = queue_rows(items, NOW)
    assert [f"{r.namespace}/{r.name}" for r in rows] == [
        "team/placed", "team/urgent", "team/edited", "team/young", "team-b/twin", "team/twin"]
    queue = sorted((QueuedRun(f"{r.namespace}/{r.name}", r.priority,
                              dt.datetime.fromisoformat(o["metadata"]["creationTimestamp"]).timestamp())
                    for r, o in zip(rows[1:], [items[2], items[1], items[0], items[3], items[4]], strict=True)),
                   key=QueuedRun.sort_key)
    assert [q.key for q in queue] == [f"{r.namespace}/{r.name}" for r in rows[1:]]
    edited = rows[2]
    assert edited.waiting_since == "2026-01-01T11:59:00Z" and edited.waiting_seconds == 60  # since it queued


def _node(name: str, gpus: int, product: str | None) -> dict:
    labels = {"nvidia.com/gpu.product": product} if product else {}
    return {"metadata": {"name": name, "labels": labels}, "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}, "conditions": [{"type": "Ready", "status": "True"}]}}


def _pod(node: str, gpus: int, phase: str = "Running") -> dict:
    return {"spec": {"nodeName": node, "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": phase}}


def test_gpu_use_per_product() -> None:
    nodes = [_node("h1", 8, "H100"), _node("h2", 8, "H100"), _node("l1", 4, "L4"), _node("cpu", 0, None)]
    pods = [_pod("h1", 8), _pod("h2", 2), _pod("h2", 4, "Succeeded"), _pod("l1", 1)]
    use = {u.product: (u.nodes, u.gpus, u.used, u.free) for u in gpu_use(nodes, pods)}
    assert use == {"H100": (2, 16, 10, 6), "L4": (1, 4, 1, 3)}
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for part in render(queue_rows([lft("w", "Queued", queuePosition=1)], NOW), gpu_use(nodes, pods), (1, 10)):
        console.print(part)
    text = console.export_text()
    assert "team/w" in text and "2x8 H100-80GB-HBM3" in text and "H100" in text


def _tpod(name: str, index: str | None, created: str) -> dict:
    ann = {"batch.kubernetes.io/job-completion-index": index} if index is not None else {}
    return {"metadata": {"name": name, "annotations": ann, "creationTimestamp": created}, "status": {"phase": "Running"}}


def test_logs_pick_the_newest_pod_per_rank_in_rank_order() -> None:
    pods = [_tpod("j-1-old", "1", "2026-01-01T10:00:00Z"), _tpod("j-0-a", "0", "2026-01-01T11:00:00Z"),
            _tpod("j-1-new", "1", "2026-01-01T11:00:00Z")]
    assert [(p.name, p.rank) for p in training_pods(pods)] == [("j-0-a", 0), ("j-1-new", 1)]


def test_logs_are_rank_prefixed_and_merged_by_time() -> None:
    assert prefixed_lines(3, "a\nb\n") == ["[rank 3] a", "[rank 3] b"]
    rank0 = "2026-01-01T00:00:01.000000000Z start\n2026-01-01T00:00:03.000000000Z step 1\n"
    rank1 = "2026-01-01T00:00:02.000000000Z start\ncontinued line\n2026-01-01T00:00:04.000000000Z step 1\n"
    assert merge_by_time([(0, rank0), (1, rank1)]) == [
        "[rank 0] start", "[rank 1] start", "[rank 1] continued line", "[rank 0] step 1", "[rank 1] step 1"]
    assert merge_by_time([(0, rank0)], keep_timestamps=True)[0] == "[rank 0] 2026-01-01T00:00:01.000000000Z start"
