"""The admission loop of a queue policy the operator runs itself: capacity from kopf indexes, the decision from
the policy (llamaops.queue), carried out here. A policy whose admission is external (Kueue) runs no loop."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from llamaops import metrics
from llamaops import status as st
from llamaops.api.constants import COMPONENT_TRAINER, FINETUNES, LABEL_COMPONENT, LABEL_FINETUNE
from llamaops.builders.finetune import Names
from llamaops.handlers.runtime import Runtime, runtime
from llamaops.handlers.workload import create_workload, parse
from llamaops.queue import Placement, free_capacity
from llamaops.queue.capacity import pod_gpu_request
from llamaops.state.finetune import ACTIVE, RunSnapshot, run_hash

log = logging.getLogger(__name__)
# Concurrent API writes of one admission pass: a wave of admissions or queue
# position updates goes out together instead of one round trip at a time.
PARALLEL_WRITES = 16
EXACT_POSITIONS = 10
POSITION_REFRESH = 5.0


@kopf.index("nodes")
def node_index(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[str, dict[str, Any]]:
    runtime(memo).wake.set()
    status = body.get("status") or {}
    return {name: {
        "metadata": {"name": name, "labels": dict(body["metadata"].get("labels") or {})},
        "spec": {"taints": list(body.get("spec", {}).get("taints") or []),
                 "unschedulable": bool(body.get("spec", {}).get("unschedulable"))},
        "status": {"allocatable": dict(status.get("allocatable") or {}),
                   "conditions": [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]},
    }}


def _gpu_pod(body: kopf.Body, **_: Any) -> bool:
    return pod_gpu_request(body) > 0


@kopf.index("pods", when=_gpu_pod)
def gpu_pod_index(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                  **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every pod holding GPUs, ours and everyone else's."""
    runtime(memo).wake.set()
    labels = body["metadata"].get("labels") or {}
    return {(namespace, name): {
        "namespace": namespace,
        "finetune": labels.get(LABEL_FINETUNE) if labels.get(LABEL_COMPONENT) == COMPONENT_TRAINER else None,
        "spec": {"nodeName": body.get("spec", {}).get("nodeName"),
                 "containers": [{"resources": c.get("resources") or {}} for c in body["spec"].get("containers", [])],
                 "initContainers": [{"resources": c.get("resources") or {}}
                                    for c in body["spec"].get("initContainers") or []]},
        "status": {"phase": (body.get("status") or {}).get("phase")},
    }}


def _values(index: kopf.Index) -> list[Any]:
    return [v for store in index.values() for v in store]


class Admitter:
    """One pass of admission: read the indexes, decide, act."""

    def __init__(self, rt: Runtime, finetunes: kopf.Index, nodes: kopf.Index, pods: kopf.Index) -> None:
        self.rt, self.finetunes, self.nodes, self.pods = rt, finetunes, nodes, pods
        # Admissions whose status change the index has not shown yet: key -> (nodes, gpus per node).
        self.in_flight: dict[str, tuple[list[str], int]] = {}
        self.positions: dict[str, tuple[int, str, float]] = {}  # key -> (position, reason, when) last written

    async def run_pass(self) -> None:
        runs: dict[str, RunSnapshot] = {snap.key: snap for store in self.finetunes.values() for snap in store}
        for key in list(self.in_flight):
            if key not in runs or runs[key].phase != "Queued":
                del self.in_flight[key]
        queued, held = [], {}
        for key, r in runs.items():
            if r.phase in ACTIVE and r.assigned_nodes:
                held[key] = (list(r.assigned_nodes), r.resources.gpus_per_node)
            elif r.phase == "Queued" and not r.suspend and r.in_scope and key not in self.in_flight:
                # Demo mode (a dev node): a run holds no GPUs, like a CPU run.
                queued.append(r.queued(self.rt.overtaken.get(key, 0), cpu_only=bool(self.rt.settings.dev_node)))
        held.update(self.in_flight)
        # Pods of admitted runs are counted through their reservation (they may not be bound yet);
        # every other GPU pod (leftovers of our stopped runs included) through its requests.
        pods = [p for p in _values(self.pods)
                if not (p["finetune"] and f"{p['namespace']}/{p['finetune']}" in held)]
        capacity = free_capacity(_values(self.nodes), pods)
        by_name = {n.name: n for n in capacity}
        for nodes, gpus in held.values():
            for n in nodes:
                if n in by_name:
                    by_name[n].free = max(by_name[n].free - gpus, 0)
        decision = self.rt.policy.admit(queued, capacity)
        self.rt.overtaken = decision.overtaken
        gate = asyncio.Semaphore(PARALLEL_WRITES)
        gpus_per_node = {q.key: q.gpus_per_node for q in queued}

        async def admit_one(key: str, nodes: list[str]) -> None:
            self.in_flight[key] = (nodes, gpus_per_node[key])
            async with gate:
                try:
                    await self._admit(key, nodes)
                except Exception:  # one bad run must not stop the queue
                    log.exception("admitting %s failed", key)
                    metrics.reconcile_error("admit")
                    self.in_flight.pop(key, None)

        async def report_position(key: str, position: int, reason: str) -> None:
            ns, name = key.split("/", 1)
            conditions = st.set_condition(list(runs[key].conditions), st.QUEUED, True, "Queued",
                                          f"position {position}: {reason}")
            async with gate:
                try:
                    await self.rt.kube.patch_status(FINETUNES, ns, name,
                                                    {"queuePosition": position, "conditions": conditions})
                except Exception:  # noqa: BLE001  (retried on the next pass)
                    log.exception("reporting the queue position of %s failed", key)
                    self.positions.pop(key, None)

        writes = [admit_one(key, nodes) for key, nodes in decision.admitted.items()]
        now = time.monotonic()
        for key, position in decision.positions.items():
            reason = decision.reasons.get(key, "")
            last = self.positions.get(key)
            if last is None or last[:2] != (position, reason):
                # Every admission moves everyone behind it: near the head positions are exact,
                # further back they are refreshed at most every POSITION_REFRESH seconds.
                due = last is None or position <= EXACT_POSITIONS or now - last[2] >= POSITION_REFRESH
                if due and key in runs and runs[key].phase == "Queued":
                    self.positions[key] = (position, reason, now)
                    writes.append(report_position(key, position, reason))
        for key in list(self.positions):
            if key not in decision.positions:
                del self.positions[key]
        await asyncio.gather(*writes)

    async def _admit(self, key: str, nodes: list[str]) -> None:
        ns, name = key.split("/", 1)
        body = await self.rt.kube.get_finetune(ns, name)
        if (body is None or body["metadata"].get("deletionTimestamp")
                or (body.get("status") or {}).get("phase") != "Queued" or body["spec"].get("suspend")):
            self.in_flight.pop(key, None)
            return
        lft = parse(body)
        if not nodes and self.rt.settings.dev_node:
            nodes = [self.rt.settings.dev_node]  # demo mode: the dev node runs the whole gang
        await create_workload(self.rt, lft, Placement(nodes=tuple(nodes)))
        gen = body["metadata"].get("generation")
        conditions = list((body.get("status") or {}).get("conditions") or [])
        where = ", ".join(nodes) if nodes else "CPU"
        conditions = st.set_condition(conditions, st.QUEUED, False, "Admitted", f"admitted onto {where}", gen)
        conditions = st.set_condition(conditions, st.ADMITTED, True, "Admitted", f"admitted onto {where}", gen)
        await self.rt.kube.patch_status(FINETUNES, ns, name, {
            "phase": "Admitted", "queuePosition": None, "assignedNodes": nodes, "conditions": conditions,
            "runHash": run_hash(lft.spec), "jobName": Names.of(name).job})
        await self.rt.kube.event(body, "Normal", reason="Admitted", message=f"all {len(nodes) or 1} node(s) fit: {where}")
        metrics.admitted(body.get("status"), self.rt.policy.name)


async def admission_loop(rt: Runtime, admitter: Admitter) -> None:
    await rt.indexes_ready.wait()
    while True:
        try:
            await asyncio.wait_for(rt.wake.wait(), timeout=rt.settings.admission_interval)
        except TimeoutError:
            pass
        rt.wake.clear()
        try:
            await admitter.run_pass()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admission pass failed; retrying")
            metrics.reconcile_error("admission")
            await asyncio.sleep(1)


@kopf.on.startup()
async def start_admission(memo: kopf.Memo, finetune_index: kopf.Index, node_index: kopf.Index,
                          gpu_pod_index: kopf.Index, **_: Any) -> None:
    rt = runtime(memo)
    metrics.track(finetune_index)
    if rt.policy.external:
        return  # an external controller admits
    memo["admission"] = asyncio.create_task(
        admission_loop(rt, Admitter(rt, finetune_index, node_index, gpu_pod_index)), name="admission")


@kopf.on.cleanup()
async def stop_admission(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("admission")
    if task is not None:
        task.cancel()

