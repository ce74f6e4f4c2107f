"""Prometheus metrics of the operator (prometheus_client), served on LLAMAOPS_METRICS_PORT.

Two kinds:

- state, computed at scrape time from kopf's index of runs (handlers/finetune.py's
  `finetune_index`, kept current by kopf's watch): queue length, GPUs asked for by
  queued runs, runs by phase, and each run's latest loss and progress. A deleted
  run leaves the index, so its series vanish with it; nothing can go stale.
- events, recorded by one-line calls from the handlers: admissions, time in
  queue, run durations, reconcile errors.

/metrics is served from the operator's event loop (aiohttp, as kopf's own
/healthz), so scrapes read the index from the thread that writes it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from llamaops import status as st
from llamaops.state.finetune import RunSnapshot

log = logging.getLogger(__name__)
PHASES = ("Pending", "Queued", "Admitted", "Running", "Succeeded", "Failed", "Suspended")
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
RUN_DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 604800)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _since(timestamp: str | None, now: float | None = None) -> float | None:
    """Seconds from an RFC 3339 timestamp to now (None when there is none)."""
    then = st.parse_time(timestamp)
    if then is None:
        return None
    return max((time.time() if now is None else now) - then.timestamp(), 0.0)


def _condition_time(status: Mapping[str, Any], type_: str) -> str | None:
    """When the condition became True (None when it is not True)."""
    c = st.condition(status.get("conditions"), type_)
    return c.get("lastTransitionTime") if c and c.get("status") == "True" else None


class RunsCollector(Collector):
    """State metrics from run snapshots (finetune_index's values, state.finetune.RunSnapshot)."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[RunSnapshot]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue_length = GaugeMetricFamily("llamaops_queue_length", "LlamaFineTunes waiting in the queue (phase Queued, "
                                         "not suspended).")
        queue_gpus = GaugeMetricFamily("llamaops_queue_gpus_requested", "GPUs the queued LlamaFineTunes ask for "
                                       "(nodes x gpusPerNode).")
        phases = GaugeMetricFamily("llamaops_finetunes", "LlamaFineTunes by phase (no phase yet counts as Pending).",
                                   labels=["phase"])
        loss = GaugeMetricFamily("llamaops_finetune_loss", "The latest training loss a run reported.",
                                 labels=["namespace", "name"])
        step = GaugeMetricFamily("llamaops_finetune_step", "Optimizer steps a run has done.",
                                 labels=["namespace", "name"])
        ratio = GaugeMetricFamily("llamaops_finetune_progress_ratio", "Steps done / total steps (0..1).",
                                  labels=["namespace", "name"])
        counts = dict.fromkeys(PHASES, 0)
        queued = gpus = 0
        for run in (self.source() if self.source else ()):
            if not run.in_scope:
                continue
            phase = run.phase or "Pending"
            counts[phase] = counts.get(phase, 0) + 1
            if phase == "Queued" and not run.suspend:
                queued += 1
                gpus += run.gpus
            progress = run.progress
            labels = [run.namespace, run.name]
            if progress.get("loss") is not None:
                loss.add_metric(labels, float(progress["loss"]))
            if progress.get("step") is not None:
                step.add_metric(labels, float(progress["step"]))
                if progress.get("totalSteps"):
                    ratio.add_metric(labels, min(float(progress["step"]) / float(progress["totalSteps"]), 1.0))
        queue_length.add_metric([], queued)
        queue_gpus.add_metric([], gpus)
        for phase, n in counts.items():
            phases.add_metric([phase], n)
        yield from (queue_length, queue_gpus, phases, loss, step, ratio)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.admissions = Counter("llamaops_admissions", "LlamaFineTunes admitted onto GPUs.", ["queue_mode"],
                                  registry=registry)
        self.queue_wait = Histogram("llamaops_queue_wait_seconds", "Time from Queued to Admitted.",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.run_duration = Histogram("llamaops_run_duration_seconds", "Time from Running (else admission) to "
                                      "Succeeded or Failed.", ["outcome"], buckets=RUN_DURATION_BUCKETS,
                                      registry=registry)
        self.reconcile_errors = Counter("llamaops_reconcile_errors", "Handler or admission-pass failures "
                                        "(each is retried).", ["handler"], registry=registry)
        self.runs = RunsCollector()
        registry.register(self.runs)

    # ---- state

    def track(self, index: Mapping[Any, Iterable[RunSnapshot]]) -> None:
        """Read run state from kopf's finetune index (key (namespace, name) -> its snapshot)."""
        def snapshots() -> Iterator[RunSnapshot]:
            for store in list(index.values()):
                yield from store
        self.runs.source = snapshots

    # ---- events

    def admitted(self, status: Mapping[str, Any] | None, queue_mode: str) -> None:
        """A run was admitted; `status` is its status while it was still Queued."""
        self.admissions.labels(queue_mode).inc()
        waited = _since(_condition_time(status or {}, st.QUEUED))
        if waited is not None:
            self.queue_wait.observe(waited)

    def finished(self, status: Mapping[str, Any] | None, outcome: str) -> None:
        """A run reached Succeeded or Failed; `status` is its status just before."""
        status = status or {}
        took = _since(status.get("startTime") or _condition_time(status, st.ADMITTED))
        if took is not None:
            self.run_duration.labels(outcome).observe(took)

    def reconcile_error(self, handler: str) -> None:
        self.reconcile_errors.labels(handler).inc()

    def count_errors(self, handler: str) -> Callable[[F], F]:
        """Decorate an async handler: every exception it raises is counted, then re-raised (kopf retries)."""
        def wrap(fn: F) -> F:
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except Exception:
                    self.reconcile_error(handler)
                    raise
            return wrapper  # type: ignore[return-value]
        return wrap

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# The operator's metrics, in the default registry (with the process and GC collectors).
default = Metrics(REGISTRY)
track = default.track
admitted = default.admitted
finished = default.finished
reconcile_error = default.reconcile_error
count_errors = default.count_errors


async def serve(port: int, metrics: Metrics = default, host: str = "0.0.0.0") -> Any:  # noqa: S104
    """Serve /metrics on the running event loop; returns the aiohttp runner (await runner.cleanup() to stop)."""
    from aiohttp import web

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
