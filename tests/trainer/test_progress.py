"""Status reporting without a cluster: what is patched, how often, and that API failures never stop training."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from llamaops_trainer import progress
from trainer_helpers import manifest, run_in_process


class FakeCustomObjects:
    calls: list[dict[str, Any]] = []
    fail_first = 0

    def __init__(self, api_client: Any = None) -> None:
        pass

    def patch_namespaced_custom_object_status(self, group: str, version: str, namespace: str, plural: str,
                                              name: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        if FakeCustomObjects.fail_first > 0:
            FakeCustomObjects.fail_first -= 1
            raise ApiException(status=500, reason="Internal Server Error")
        FakeCustomObjects.calls.append({"target": (group, version, namespace, plural, name), "body": body, **kwargs})
        return {}


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeCustomObjects]:
    import kubernetes.client

    FakeCustomObjects.calls, FakeCustomObjects.fail_first = [], 0
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", FakeCustomObjects)
    monkeypatch.setattr(progress, "_api_client", lambda: object())
    return FakeCustomObjects


def test_reporter_coalesces_and_flushes(fake_api: type[FakeCustomObjects]) -> None:
    reporter = progress.StatusReporter("run", "ns", interval_s=0.5)
    start = time.monotonic()
    for step in range(1, 51):
        reporter.publish({"step": step})
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    reporter.publish({"step": 51}, final=True)
    reporter.close()
    steps = [c["body"]["status"]["progress"]["step"] for c in fake_api.calls]
    assert steps[0] == 1 and steps[-1] == 51
    assert len(steps) <= elapsed / 0.5 + 2, steps  # one per interval, plus the final one
    call = fake_api.calls[0]
    assert call["target"] == ("llamaops.io", "v1alpha1", "ns", "llamafinetunes", "run")
    assert call["_content_type"] == "application/merge-patch+json"


def test_api_errors_are_logged_not_raised(fake_api: type[FakeCustomObjects], caplog: pytest.LogCaptureFixture) -> None:
    fake_api.fail_first = 2
    reporter = progress.StatusReporter("run", "ns", interval_s=0.0)
    for step in (1, 2, 3):
        reporter.publish({"step": step}, final=True)
        deadline = time.monotonic() + 10
        while reporter.failures + len(fake_api.calls) < step and time.monotonic() < deadline:
            time.sleep(0.01)  # one attempt per publish, however busy the machine
    reporter.close()
    assert reporter.failures == 2 and [c["body"]["status"]["progress"]["step"] for c in fake_api.calls] == [3]
    assert "HTTP 500 Internal Server Error" in caplog.text


def test_training_patches_progress(fake_api: type[FakeCustomObjects], tmp_path: Path, trainer_env: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LLAMAOPS_NAME", "tiny")
    monkeypatch.setenv("LLAMAOPS_NAMESPACE", "team-a")
    fake_api.fail_first = 1  # the API server hiccups once: training goes on
    caplog.set_level(logging.INFO)
    code, out = run_in_process(manifest(training={"max_steps": 10, "logging_steps": 2}), tmp_path)
    assert code == 0
    bodies = [c["body"]["status"]["progress"] for c in fake_api.calls if "progress" in c["body"]["status"]]
    assert all(c["target"][2:] == ("team-a", "llamafinetunes", "tiny") for c in fake_api.calls)
    # Last, the adapter as only the trainer knows it: its real rank (what vLLM's --max-lora-rank must cover).
    adapter = fake_api.calls[-1]["body"]["status"]["adapter"]
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == written["r"] and adapter["baseModel"] == written["base_model_name_or_path"]
    final = bodies[-1]
    assert final["step"] == 10 and final["totalSteps"] == 10 and final["display"] == "10/10"
    assert {"loss", "learningRate", "tokensPerSecond", "epoch", "updatedAt", "etaSeconds"} <= set(final)
    assert final["tokensPerSecond"] > 0 and final["etaSeconds"] == 0
    assert "could not update status" in caplog.text
