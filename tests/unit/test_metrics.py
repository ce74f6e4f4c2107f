"""The operator's Prometheus metrics: state from the run index, events from the handlers, /metrics over HTTP."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from datetime import UTC, datetime

import pytest
from llamaops import metrics
from llamaops.api.finetune import TrainingResources
from llamaops.state.finetune import RunSnapshot
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families


def _ago(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _samples(m: metrics.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _snap(key: tuple[str, str], phase: str | None, *, nodes: int = 1, gpus: int = 1, suspend: bool = False,
          in_scope: bool = True, progress: dict | None = None) -> RunSnapshot:
    return RunSnapshot(namespace=key[0], name=key[1], phase=phase, suspend=suspend, in_scope=in_scope,
                       resources=TrainingResources(nodes=nodes, gpus_per_node=gpus), progress=progress or {})


@pytest.fixture
def m() -> metrics.Metrics:
    return metrics.Metrics(CollectorRegistry())


def test_state_comes_from_the_index_and_deleted_runs_vanish(m: metrics.Metrics) -> None:
    snaps = [
        _snap(("a", "queued-big"), "Queued", nodes=2, gpus=8),
        _snap(("a", "queued-small"), "Queued", gpus=1),
        _snap(("a", "suspended"), "Queued", gpus=4, suspend=True),
        _snap(("b", "running"), "Running", progress={"step": 25, "totalSteps": 100, "loss": 1.25}),
        _snap(("b", "new"), None),
        _snap(("other", "not-ours"), "Queued", gpus=8, in_scope=False),
    ]
    index = {(s.namespace, s.name): [s] for s in snaps}
    m.track(index)
    s = _samples(m)
    assert s[("llamaops_queue_length", ())] == 3 - 1  # the suspended one waits for nothing
    assert s[("llamaops_queue_gpus_requested", ())] == 2 * 8 + 1
    assert s[("llamaops_finetunes", (("phase", "Queued"),))] == 3
    assert s[("llamaops_finetunes", (("phase", "Running"),))] == 1
    assert s[("llamaops_finetunes", (("phase", "Pending"),))] == 1
    assert s[("llamaops_finetunes", (("phase", "Succeeded"),))] == 0
    run = (("name", "running"), ("namespace", "b"))
    assert s[("llamaops_finetune_loss", run)] == 1.25
    assert s[("llamaops_finetune_step", run)] == 25
    assert s[("llamaops_finetune_progress_ratio", run)] == 0.25
    assert not [k for k in s if k[0] == "llamaops_finetune_loss" and k != ("llamaops_finetune_loss", run)]

    del index[("b", "running")]  # kopf drops a deleted run from its index
    s = _samples(m)
    assert ("llamaops_finetune_loss", run) not in s
    assert ("llamaops_finetune_step", run) not in s
    assert s[("llamaops_finetunes", (("phase", "Running"),))] == 0


def test_state_from_the_snapshots_the_index_keeps_of_objects(m: metrics.Metrics) -> None:
    def lft(key: str, phase: str, nodes: int, gpus: int, **status) -> dict:
        namespace, name = key.split("/")
        return {"metadata": {"name": name, "namespace": namespace, "creationTimestamp": _ago(60)},
                "spec": {"resources": {"nodes": nodes, "gpusPerNode": gpus}}, "status": {"phase": phase, **status}}

    m.track({("a", "waits"): [RunSnapshot.of(lft("a/waits", "Queued", 2, 8))],
             ("a", "trains"): [RunSnapshot.of(lft("a/trains", "Running", 1, 1,
                                                  progress={"step": 3, "totalSteps": 6, "loss": 0.5}))],
             ("b", "not-ours"): [RunSnapshot.of(lft("b/not-ours", "Queued", 1, 8), in_scope=False)]})
    s = _samples(m)
    assert s[("llamaops_queue_length", ())] == 1
    assert s[("llamaops_queue_gpus_requested", ())] == 2 * 8
    assert s[("llamaops_finetune_progress_ratio", (("name", "trains"), ("namespace", "a")))] == 0.5
    assert s[("llamaops_finetune_loss", (("name", "trains"), ("namespace", "a")))] == 0.5


def test_malformed_timestamps_measure_nothing(m: metrics.Metrics) -> None:
    m.admitted({"conditions": [{"type": "Queued", "status": "True", "lastTransitionTime": "yesterday"}]}, "builtin")
    m.finished({"startTime": "", "conditions": [{"type": "Admitted", "status": "False",
                                                  "lastTransitionTime": _ago(10)}]}, "Failed")
    s = _samples(m)
    assert s[("llamaops_admissions_total", (("queue_mode", "builtin"),))] == 1
    assert s[("llamaops_queue_wait_seconds_count", ())] == 0
    assert ("llamaops_run_duration_seconds_count", (("outcome", "Failed"),)) not in s  # Admitted is not True


def test_no_index_yet_exports_zeroes(m: metrics.Metrics) -> None:
    s = _samples(m)
    assert s[("llamaops_queue_length", ())] == 0
    assert s[("llamaops_finetunes", (("phase", "Queued"),))] == 0


def test_admissions_and_time_in_queue(m: metrics.Metrics) -> None:
    queued = {"conditions": [{"type": "Queued", "status": "True", "lastTransitionTime": _ago(120)}]}
    m.admitted(queued, "builtin")
    m.admitted({}, "kueue")  # no Queued condition: counted, no wait observed
    s = _samples(m)
    assert s[("llamaops_admissions_total", (("queue_mode", "builtin"),))] == 1
    assert s[("llamaops_admissions_total", (("queue_mode", "kueue"),))] == 1
    assert s[("llamaops_queue_wait_seconds_count", ())] == 1
    assert 119 <= s[("llamaops_queue_wait_seconds_sum", ())] <= 130
    assert s[("llamaops_queue_wait_seconds_bucket", (("le", "60.0"),))] == 0
    assert s[("llamaops_queue_wait_seconds_bucket", (("le", "300.0"),))] == 1


def test_run_duration_from_start_time_else_admission(m: metrics.Metrics) -> None:
    m.finished({"startTime": _ago(3600)}, "Succeeded")
    m.finished({"conditions": [{"type": "Admitted", "status": "True", "lastTransitionTime": _ago(10)}]}, "Failed")
    m.finished(None, "Failed")  # nothing to measure from
    s = _samples(m)
    assert s[("llamaops_run_duration_seconds_count", (("outcome", "Succeeded"),))] == 1
    assert 3599 <= s[("llamaops_run_duration_seconds_sum", (("outcome", "Succeeded"),))] <= 3700
    assert s[("llamaops_run_duration_seconds_count", (("outcome", "Failed"),))] == 1


def test_count_errors_counts_and_reraises_keeping_the_handler_id(m: metrics.Metrics) -> None:
    @m.count_errors("reconcile")
    async def handler(fail: bool = False) -> str:
        if fail:
            raise RuntimeError("boom")
        return "ok"

    assert asyncio.run(handler()) == "ok"
    with pytest.raises(RuntimeError):
        asyncio.run(handler(fail=True))
    m.reconcile_error("admission")
    s = _samples(m)
    assert s[("llamaops_reconcile_errors_total", (("handler", "reconcile"),))] == 1
    assert s[("llamaops_reconcile_errors_total", (("handler", "admission"),))] == 1
    # kopf names handlers (and keeps their progress in status.kopf) after the wrapped function.
    from kopf._core.intents.registries import get_callable_id

    assert get_callable_id(handler).endswith("handler")
    assert asyncio.iscoroutinefunction(handler)


def test_serve_answers_metrics_over_http(m: metrics.Metrics) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    m.admitted({}, "builtin")

    async def scrape() -> str:
        runner = await metrics.serve(port, m, host="127.0.0.1")
        try:
            def get() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    assert resp.headers["Content-Type"].startswith("text/plain")
                    return resp.read().decode()
            return await asyncio.to_thread(get)
        finally:
            await runner.cleanup()

    text = asyncio.run(scrape())
    assert 'llamaops_admissions_total{queue_mode="builtin"} 1.0' in text
    assert "llamaops_queue_length 0.0" in text


def test_metrics_port_setting_defaults_to_off() -> None:
    from llamaops.settings import Settings

    assert Settings.from_env({}).metrics_port == 0
    assert Settings.from_env({"LLAMAOPS_METRICS_PORT": ""}).metrics_port == 0
    assert Settings.from_env({"LLAMAOPS_METRICS_PORT": "9090"}).metrics_port == 9090
