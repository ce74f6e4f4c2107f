"""Progress: the run's report ConfigMap (rank 0) and <output>/metrics.jsonl.

The training pod may write one object: its run's report ConfigMap (contract.ENV_REPORT). Rank 0
puts the latest progress there, and the saved adapter at the end; the operator checks both and
is the only writer of the LlamaFineTune's status, so a pod can forge nothing the operator trusts.

Patches run on a background thread, coalesced to the newest values and sent at
most every few seconds (plus a final one), so a slow or unreachable API server
never stalls training. API errors are logged (status code and reason only,
never credentials) and otherwise ignored.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaops.api.constants import TRAINER_FIELD_MANAGER
from llamaops.api.contract import REPORT_ADAPTER, REPORT_PROGRESS, serviceaccount_dir
from transformers import TrainerCallback

log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_record(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"time": _now(), **record}, default=float) + "\n")


def _api_client() -> Any:
    from kubernetes import client, config
    from kubernetes.config.incluster_config import InClusterConfigLoader

    sa = Path(serviceaccount_dir())
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (sa / "token").is_file():
        # The pod's own ServiceAccount (its directory moves on the dev node: LLAMAOPS_SERVICEACCOUNT_DIR).
        configuration = client.Configuration()
        InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt")).load_and_set(
            configuration)
        return client.ApiClient(configuration)
    return config.new_client_from_config()  # $KUBECONFIG or ~/.kube/config


class Reporter:
    """Patches the progress in a run's report ConfigMap `name` from a daemon thread."""

    def __init__(self, name: str, namespace: str, interval_s: float = 5.0, timeout_s: float = 10.0) -> None:
        self.name, self.namespace = name, namespace
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._pending: dict[str, Any] | None = None
        self._flush = False
        self._closed = False
        self._last_sent = -math.inf
        self._cond = threading.Condition()
        self._api: Any = None
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="llamaops-status", daemon=True)
        self._thread.start()

    def publish(self, progress: dict[str, Any], final: bool = False) -> None:
        with self._cond:
            self._pending = progress
            self._flush = self._flush or final
            self._cond.notify()

    def close(self, timeout_s: float = 15.0) -> None:
        """Sends what is pending, then stops the thread (bounded: exit never waits long on the API)."""
        with self._cond:
            self._flush = True
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._pending is not None and (self._flush or
                                                      time.monotonic() - self._last_sent >= self.interval_s):
                        break
                    if self._closed:
                        return
                    wait = None if self._pending is None else self.interval_s - (time.monotonic() - self._last_sent)
                    self._cond.wait(wait)
                body, self._pending, self._flush = self._pending, None, False
                self._last_sent = time.monotonic()
            self._send(body)

    def _patch(self, api: Any, key: str, value: dict[str, Any]) -> None:
        api.patch_namespaced_config_map(self.name, self.namespace, {"data": {key: json.dumps(value)}},
                                        field_manager=TRAINER_FIELD_MANAGER, _request_timeout=self.timeout_s)

    def report_adapter(self, adapter: dict[str, Any], attempts: int = 3) -> bool:
        """The saved adapter, at the end: the operator checks it and completes it when the Job completes."""
        from kubernetes import client

        for attempt in range(attempts):
            try:
                self._patch(client.CoreV1Api(_api_client()), REPORT_ADAPTER, adapter)
                return True
            except Exception as exc:  # noqa: BLE001 - the adapter is saved; status is a courtesy
                log.warning("could not report the adapter of %s/%s (%s)", self.namespace, self.name,
                            type(exc).__name__)
                time.sleep(1 + attempt)
        return False

    def _send(self, progress: dict[str, Any]) -> None:
        try:
            from kubernetes import client

            if self._api is None:
                self._api = client.CoreV1Api(_api_client())
            self._patch(self._api, REPORT_PROGRESS, progress)
            self.sent += 1
        except Exception as exc:  # noqa: BLE001 - reporting must never stop training
            self.failures += 1
            status = getattr(exc, "status", None)
            what = f"HTTP {status} {getattr(exc, 'reason', '')}".strip() if status else type(exc).__name__
            if self.failures <= 3 or self.failures % 50 == 0:
                log.warning("could not report progress to %s/%s (%s); training goes on",
                            self.namespace, self.name, what)
            if status in (401, 403) or not status:
                self._api = None  # rebuild: credentials may have rotated


class StepTimer:
    """The slowest optimizer step of this process, in seconds: what a stop must wait for before it can save.

    The first step is left out once another is timed: it also warms up (kernels, allocator, first batch), and
    a stop during it loses no finished step.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started: float | None = None
        self._first: float | None = None
        self._slowest: float | None = None

    def begin(self) -> None:
        self._started = self._clock()

    def end(self) -> None:
        if self._started is None:
            return
        took, self._started = self._clock() - self._started, None
        if self._first is None:
            self._first = took
        else:
            self._slowest = max(self._slowest or 0.0, took)

    @property
    def seconds(self) -> float | None:
        return self._slowest if self._slowest is not None else self._first


class ProgressCallback(TrainerCallback):
    """On rank 0: each log record to metrics.jsonl, and progress to the status reporter."""

    def __init__(self, metrics_path: Path | None, reporter: Reporter | None) -> None:
        self.metrics_path = metrics_path
        self.reporter = reporter
        self.steps = StepTimer()
        self._t0 = time.monotonic()
        self._step0 = 0
        self._last: tuple[float, int] | None = None  # (time, tokens seen) at the previous log
        self.last_record: dict[str, Any] = {}
        self.last_progress: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0, self._step0 = time.monotonic(), state.global_step
        self._last = (self._t0, state.num_input_tokens_seen or 0)
        if state.is_world_process_zero:
            self._publish(state, {}, final=False)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.end()  # before any log, evaluation or save of this step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        record: dict[str, Any] = {"time": _now(), "step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if key in ("num_input_tokens_seen", "epoch"):
                continue
            record[key] = value
        if "loss" in logs and self._last is not None and now > self._last[0]:
            record["tokens_per_second"] = (tokens - self._last[1]) / (now - self._last[0])
            self._last = (now, tokens)
        record["num_tokens"] = tokens
        self._append(record)
        if "loss" in logs:
            self.last_record = record
            self._publish(state, record, final=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._publish(state, self.last_record, final=True)

    def _append(self, record: dict[str, Any]) -> None:
        if self.metrics_path is not None:
            append_record(self.metrics_path, record)

    def _publish(self, state: Any, record: dict[str, Any], final: bool) -> None:
        step, total = state.global_step, state.max_steps or None
        done = step - self._step0
        elapsed = time.monotonic() - self._t0
        progress: dict[str, Any] = {"step": step, "updatedAt": _now()}
        if total:
            progress["totalSteps"] = total
            progress["display"] = f"{step}/{total}"
            if done > 0:
                progress["etaSeconds"] = int(max(0, total - step) * elapsed / done)
        if state.epoch is not None:
            progress["epoch"] = round(float(state.epoch), 4)
        # The slowest step sizes the pods' stop grace when the operator makes the Job again (builders.finetune).
        values = {**record, "step_seconds": self.steps.seconds}
        for src, dst in (("loss", "loss"), ("learning_rate", "learningRate"), ("tokens_per_second", "tokensPerSecond"),
                         ("step_seconds", "stepSeconds")):
            value = values.get(src)
            if isinstance(value, (int, float)) and math.isfinite(value):
                # Four significant digits: what `kubectl get` shows, and all a status needs.
                progress[dst] = float(f"{value:.4g}")
        self.last_progress = progress
        if self.reporter is not None:
            self.reporter.publish(progress, final=final)
