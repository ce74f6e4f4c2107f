"""The watchdog: admitted runs that will never train give their GPUs back, without waiting for an event.

Every few seconds it reads the indexes (runs, nodes, training pods) and asks
state.finetune what each admitted run's situation means: a node of its
placement lost (deleted, or NotReady past LLAMAOPS_NODE_LOST_AFTER), pods that
cannot start or be scheduled past LLAMAOPS_STUCK_AFTER. What it decides is
carried out by the Job handler's code, under the run's lock, on the run read
afresh (and only if it is still the same admitted run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from llamaops import metrics
from llamaops.builders.naming import label_value
from llamaops.handlers.jobs import carry_out
from llamaops.handlers.runtime import Runtime, runtime
from llamaops.state.finetune import (
    ACTIVE,
    JobView,
    Outcome,
    PodView,
    RunSnapshot,
    job_outcome,
    lost_nodes,
    stuck_outcome,
)

log = logging.getLogger(__name__)


def decisions(runs: list[RunSnapshot], nodes: dict[str, dict[str, Any]], pods: list[dict[str, Any]], *,
              now: float, stuck_after: float, node_lost_after: float, external: bool) -> dict[str, list[Outcome]]:
    """What to do with each admitted run that will not train as it is (key -> outcomes)."""
    views: dict[tuple[str, str], list[PodView]] = {}
    for pod in pods:
        if pod.get("view") is not None:
            views.setdefault((pod["namespace"], pod["finetune"]), []).append(pod["view"])
    out: dict[str, list[Outcome]] = {}
    for run in runs:
        if run.phase not in ACTIVE or not run.in_scope:
            continue
        lost = lost_nodes(run.assigned_nodes, nodes, now, node_lost_after) if run.assigned_nodes else []
        if lost:
            outcomes = job_outcome(run, JobView(), max_restarts=run.max_restarts, external=external, lost=lost)
        else:
            outcomes = stuck_outcome(run, views.get((run.namespace, label_value(run.name)), []), run.admitted_at,
                                     now=now, grace=stuck_after, max_restarts=run.max_restarts)
        if outcomes:
            out[run.key] = outcomes
    return out


async def watch(rt: Runtime, finetunes: kopf.Index, nodes: kopf.Index, pods: kopf.Index) -> None:
    await rt.indexes_ready.wait()
    while True:
        await asyncio.sleep(max(rt.settings.admission_interval, 1.0))
        try:
            runs = [snap for store in list(finetunes.values()) for snap in store]
            node_map = {name: node for name, store in list(nodes.items()) for node in store}
            pod_list = [p for store in list(pods.values()) for p in store]
            todo = decisions(runs, node_map, pod_list, now=time.time(), stuck_after=rt.settings.stuck_after,
                             node_lost_after=rt.settings.node_lost_after, external=rt.policy.external)
            by_key = {r.key: r for r in runs}
            for key, outcomes in todo.items():
                run = by_key[key]
                log.info("watchdog: %s: %s", key, "; ".join(f"{o.step.value} {o.message}" for o in outcomes))
                await carry_out(rt, run.namespace, run.name, run.run_hash, outcomes)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watchdog pass failed; retrying")
            metrics.reconcile_error("watchdog")


@kopf.on.startup()
async def start_watchdog(memo: kopf.Memo, finetune_index: kopf.Index, node_index: kopf.Index,
                         gpu_pod_index: kopf.Index, **_: Any) -> None:
    memo["watchdog"] = asyncio.create_task(
        watch(runtime(memo), finetune_index, node_index, gpu_pod_index), name="watchdog")


@kopf.on.cleanup()
async def stop_watchdog(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("watchdog")
    if task is not None:
        task.cancel()
