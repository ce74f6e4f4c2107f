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
from llamaops.api.constants import (
    API_VERSION,
    COMPONENT_TRAINER,
    FINETUNES,
    KIND_FINETUNE,
    LABEL_COMPONENT,
    LABEL_FINETUNE,
)
from llamaops.builders.finetune import CONTAINER, Names
from llamaops.builders.naming import label_value
from llamaops.handlers.runtime import Runtime, runtime
from llamaops.handlers.workload import create_workload, fail_conflict, parse, read_run, remove_job
from llamaops.kube import NotOwned, Stale
from llamaops.queue import Placement, free_capacity
from llamaops.queue.capacity import pod_gpu_request
from llamaops.state.finetune import ACTIVE, PodView, RunSnapshot, run_hash

log = logging.getLogger(__name__)
# Concurrent API writes of one admission pass: a wave of admissions or queue
# position updates goes out together instead of one round trip at a time.
PARALLEL_WRITES = 16
EXACT_POSITIONS = 10
ADMIT_BACKOFF_MAX = 300  # seconds between admission attempts of a run whose admission keeps failing
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


def _trainer(body: kopf.Body) -> bool:
    labels = body["metadata"].get("labels") or {}
    return labels.get(LABEL_COMPONENT) == COMPONENT_TRAINER and LABEL_FINETUNE in labels


def _indexed_pod(body: kopf.Body, **_: Any) -> bool:
    return pod_gpu_request(body) > 0 or _trainer(body)


@kopf.index("pods", when=_indexed_pod)
def gpu_pod_index(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                  **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every pod holding GPUs, ours and everyone else's (free capacity); and every training pod of ours, with what
    the watchdog reads of it (handlers/watchdog.py)."""
    runtime(memo).wake.set()
    trainer = _trainer(body)
    return {(namespace, name): {
        "namespace": namespace,
        "finetune": body["metadata"]["labels"][LABEL_FINETUNE] if trainer else None,
        "view": PodView.of(body, CONTAINER) if trainer else None,
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
        # Runs whose admission failed: key -> (failures in a row, not before): retried with a growing back-off.
        self.failures: dict[str, tuple[int, float]] = {}
        self.unfit: dict[str, int] = {}  # key -> the spec generation it was told it cannot fit the cluster for

    async def run_pass(self) -> None:
        runs: dict[str, RunSnapshot] = {snap.key: snap for store in self.finetunes.values() for snap in store}
        for waiting in (self.in_flight, self.failures, self.unfit):
            for key in list(waiting):
                if key not in runs or runs[key].phase != "Queued":
                    del waiting[key]
        queued, held = [], {}
        for key, r in runs.items():
            if r.phase in ACTIVE and r.assigned_nodes:
                held[key] = (list(r.assigned_nodes), r.resources.gpus_per_node)
            elif (r.phase == "Queued" and not r.suspend and r.in_scope and key not in self.in_flight
                  and self.failures.get(key, (0, 0.0))[1] <= time.monotonic()):
                # Demo mode (a dev node): a run holds no GPUs, like a CPU run.
                queued.append(r.queued(self.rt.overtaken.get(key, 0), cpu_only=bool(self.rt.settings.dev_node)))
        held.update(self.in_flight)
        # Pods of admitted runs are counted through their reservation (they may not be bound yet);
        # every other GPU pod (leftovers of our stopped runs included) through its requests.
        # (A pod carries its run's name as a label value, shortened with a hash past 63 characters.)
        held_labels = {(runs[k].namespace, label_value(runs[k].name)) for k in held if k in runs}
        pods = [p for p in _values(self.pods) if not (p["finetune"] and (p["namespace"], p["finetune"]) in held_labels)]
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
                    self.failures.pop(key, None)
                except Exception as exc:  # one bad run must not stop the queue
                    log.exception("admitting %s failed", key)
                    metrics.reconcile_error("admit")
                    self.in_flight.pop(key, None)
                    await self._failed(key, runs.get(key), exc)

        async def report_position(key: str, position: int, reason: str) -> None:
            ns, name = key.split("/", 1)
            conditions = st.set_condition(list(runs[key].conditions), st.QUEUED, True, "Queued",
                                          f"position {position}: {reason}")
            async with gate:
                try:
                    # Conditions read from the index may lag: written only onto the version they were read from.
                    await self.rt.kube.patch_status(FINETUNES, ns, name,
                                                    {"queuePosition": position, "conditions": conditions},
                                                    resource_version=runs[key].resource_version)
                except Stale:
                    self.positions.pop(key, None)  # the next pass writes it onto the run as it now is
                except Exception:  # noqa: BLE001  (retried on the next pass)
                    log.exception("reporting the queue position of %s failed", key)
                    self.positions.pop(key, None)

        async def tell_unfit(key: str) -> None:
            run = runs[key]
            if self.unfit.get(key) == run.generation:
                return  # said once, for this spec
            self.unfit[key] = run.generation
            await self.rt.kube.event(_ref(run), "Warning", reason="CannotFit", message=decision.reasons[key])

        writes = [admit_one(key, nodes) for key, nodes in decision.admitted.items()]
        writes += [tell_unfit(key) for key in decision.unfit if key in runs]
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

    async def _failed(self, key: str, run: RunSnapshot | None, exc: Exception) -> None:
        """Admission failed: back off (2, 4, 8... s, at most ADMIT_BACKOFF_MAX) and say why on the run."""
        count = self.failures.get(key, (0, 0.0))[0] + 1
        delay = min(2 ** count, ADMIT_BACKOFF_MAX)
        self.failures[key] = (count, time.monotonic() + delay)
        if run is None:
            return
        why = " ".join(str(exc).split())[:500] or type(exc).__name__
        message = f"admission failed {count} time(s): {why}; retrying in {delay}s"
        conditions = st.set_condition(list(run.conditions), st.QUEUED, True, "AdmissionFailed", message)
        try:
            await self.rt.kube.patch_status(FINETUNES, run.namespace, run.name, {"conditions": conditions})
            if count == 1:
                await self.rt.kube.event(_ref(run), "Warning", reason="AdmissionFailed", message=message)
        except Exception:  # noqa: BLE001 - the next failure says it again
            log.exception("reporting the admission failure of %s failed", key)

    async def _admit(self, key: str, nodes: list[str]) -> None:
        ns, name = key.split("/", 1)
        async with self.rt.lock(KIND_FINETUNE, ns, name):  # one writer per run: reconcile and Job events wait
            body = await read_run(self.rt, ns, name)
            lft = parse(body) if _admissible(body) else None
            if lft is None:
                self.in_flight.pop(key, None)
                return
            if not nodes and self.rt.settings.dev_node:
                nodes = [self.rt.settings.dev_node]  # demo mode: the dev node runs the whole gang
            try:
                await create_workload(self.rt, lft, Placement(nodes=tuple(nodes)))
            except NotOwned as exc:
                self.in_flight.pop(key, None)
                await fail_conflict(self.rt, body, exc)
                return
            where = ", ".join(nodes) if nodes else "CPU"
            for _attempt in range(3):
                conditions = st.admitted((body.get("status") or {}).get("conditions"), "Admitted",
                                         f"admitted onto {where}", body["metadata"].get("generation"))
                try:
                    # Only onto the run as it was read: an edit or a suspend since then wins over this admission.
                    await self.rt.kube.patch_status(FINETUNES, ns, name, {
                        "phase": "Admitted", "queuePosition": None, "assignedNodes": nodes, "conditions": conditions,
                        "runHash": run_hash(lft.spec), "jobName": Names.of(name).job},
                        resource_version=body["metadata"].get("resourceVersion"))
                    break
                except Stale:
                    body = await read_run(self.rt, ns, name)
                    fresh = parse(body) if _admissible(body) else None
                    if fresh is None or run_hash(fresh.spec) != run_hash(lft.spec):
                        # Suspended, edited or gone meanwhile: what was made for it goes; the next pass decides.
                        await remove_job(self.rt, lft)
                        self.in_flight.pop(key, None)
                        return
            else:
                raise RuntimeError(f"{key} kept changing while it was admitted")
            await self.rt.kube.event(body, "Normal", reason="Admitted",
                                     message=f"all {len(nodes) or 1} node(s) fit: {where}")
            metrics.admitted(body.get("status"), self.rt.policy.name)


def _ref(run: RunSnapshot) -> dict[str, Any]:
    """The run as an Event's involved object."""
    return {"apiVersion": API_VERSION, "kind": KIND_FINETUNE,
            "metadata": {"name": run.name, "namespace": run.namespace, "uid": run.uid}}


def _admissible(body: dict[str, Any] | None) -> bool:
    """A run (read_run) admission may start: there, Queued and not suspended."""
    return body is not None and (body.get("status") or {}).get("phase") == "Queued" and not body["spec"].get("suspend")


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

