"""Progress reporting without a cluster: what is patched (the run's report ConfigMap, never the run), how often,
and that API failures never stop training."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from llamaops_trainer import progress
from trainer_helpers import manifest, run_in_process


class FakeCore:
    calls: list[dict[str, Any]] = []
    fail_first = 0

    def __init__(self, api_client: Any = None) -> None:
        pass

    def patch_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any],
                                    **kwargs: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        if FakeCore.fail_first > 0:
            FakeCore.fail_first -= 1
            raise ApiException(status=500, reason="Internal Server Error")
        FakeCore.calls.append({"target": (namespace, name), "body": body, **kwargs})
        return {}


def reported(call: dict[str, Any], key: str = "progress") -> dict[str, Any]:
    return json.loads(call["body"]["data"][key])


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeCore]:
    import kubernetes.client

    FakeCore.calls, FakeCore.fail_first = [], 0
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", FakeCore)
    monkeypatch.setattr(progress, "_api_client", lambda: object())
    return FakeCore


def test_reporter_coalesces_and_flushes(fake_api: type[FakeCore]) -> None:
    reporter = progress.Reporter("run-report", "ns", interval_s=0.5)
    start = time.monotonic()
    for step in range(1, 51):
        reporter.publish({"step": step})
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    reporter.publish({"step": 51}, final=True)
    reporter.close()
    steps = [reported(c)["step"] for c in fake_api.calls]
    assert steps[0] == 1 and steps[-1] == 51
    assert len(steps) <= elapsed / 0.5 + 2, steps  # one per interval, plus the final one
    call = fake_api.calls[0]
    assert call["target"] == ("ns", "run-report") and call["field_manager"] == "llamaops-trainer"
    assert reporter.report_adapter({"r": 16, "baseModel": "m"})
    assert reported(fake_api.calls[-1], "adapter") == {"r": 16, "baseModel": "m"}


def test_api_errors_are_logged_not_raised(fake_api: type[FakeCore], caplog: pytest.LogCaptureFixture) -> None:
    fake_api.fail_first = 2
    reporter = progress.Reporter("run-report", "ns", interval_s=0.0)
    for step in (1, 2, 3):
        reporter.publish({"step": step}, final=True)
        deadline = time.monotonic() + 10
        while reporter.failures + len(fake_api.calls) < step and time.monotonic() < deadline:
            time.sleep(0.01)  # one attempt per publish, however busy the machine
    reporter.close()
    assert reporter.failures == 2 and [reported(c)["step"] for c in fake_api.calls] == [3]
    assert "HTTP 500 Internal Server Error" in caplog.text


def test_training_patches_progress(fake_api: type[FakeCore], tmp_path: Path, trainer_env: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LLAMAOPS_NAME", "tiny")
    monkeypatch.setenv("LLAMAOPS_NAMESPACE", "team-a")
    monkeypatch.setenv("LLAMAOPS_REPORT", "tiny-report")
    fake_api.fail_first = 1  # the API server hiccups once: training goes on
    caplog.set_level(logging.INFO)
    code, out = run_in_process(manifest(training={"max_steps": 10, "logging_steps": 2}), tmp_path)
    assert code == 0
    bodies = [reported(c) for c in fake_api.calls if "progress" in c["body"]["data"]]
    assert all(c["target"] == ("team-a", "tiny-report") for c in fake_api.calls)
    # Last, the adapter as only the trainer knows it: its real rank (what vLLM's --max-lora-rank must cover).
    adapter = reported(fake_api.calls[-1], "adapter")
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == written["r"] and adapter["baseModel"] == written["base_model_name_or_path"]
    final = bodies[-1]
    assert final["step"] == 10 and final["totalSteps"] == 10 and final["display"] == "10/10"
    assert {"loss", "learningRate", "tokensPerSecond", "epoch", "updatedAt", "etaSeconds", "stepSeconds"} <= set(final)
    assert final["tokensPerSecond"] > 0 and final["etaSeconds"] == 0 and final["stepSeconds"] > 0
    assert "could not report progress" in caplog.text


def test_step_timer_reports_the_slowest_step_after_the_first() -> None:
    """The first step warms up (and a stop during it loses no finished step): left out once another is timed."""
    clock = iter([0.0, 9.0, 10.0, 12.0, 12.0, 15.0, 16.0, 17.0])
    timer = progress.StepTimer(clock=lambda: next(clock))
    assert timer.seconds is None
    timer.begin()
    timer.end()
    assert timer.seconds == 9.0  # the only one
    for _ in range(3):
        timer.begin()
        timer.end()
    assert timer.seconds == 3.0
