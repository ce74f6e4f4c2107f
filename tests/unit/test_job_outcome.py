"""What a run's Job means for the run: the job-outcome decisions, as a table (state.finetune.job_outcome)."""

from __future__ import annotations

import pytest
from llamaops.api.constants import ANNOTATION_RUN_HASH
from llamaops.api.contract import EXIT_BAD_CONFIG, EXIT_BAD_DATA, EXIT_RETRYABLE
from llamaops.api.finetune import TrainingResources
from llamaops.state.finetune import JobView, RunSnapshot, Step, failing_trainer, job_outcome, lost_nodes

H = "hash-1"


def run(phase: str = "Running", restarts: int = 0, nodes: tuple[str, ...] = ("gpu-0",), **kw) -> RunSnapshot:
    return RunSnapshot(namespace="ml", name="r", phase=phase, run_hash=H, restarts=restarts, assigned_nodes=nodes,
                       resources=TrainingResources(nodes=len(nodes) or 1, gpus_per_node=8), **kw)


def failed(code: int | None, reason: str = "BackoffLimitExceeded") -> JobView:
    return JobView(failed=True, failed_reason=reason, exit_code=code, termination_message="boom")


def steps(outcomes) -> list[tuple[Step, str]]:
    return [(o.step, o.reason) for o in outcomes]


@pytest.mark.parametrize(("case", "r", "job", "external", "lost", "expected"), [
    ("bad config: no retry", run(), failed(EXIT_BAD_CONFIG, "PodFailurePolicy"), False, (),
     [(Step.FAIL, "TrainerError")]),
    ("bad data: no retry, even with restarts left", run(restarts=0), failed(EXIT_BAD_DATA, "PodFailurePolicy"),
     False, (), [(Step.FAIL, "TrainerError")]),
    ("exit 75: requeued to resume", run(), failed(EXIT_RETRYABLE), False, (), [(Step.REQUEUE, "Interrupted")]),
    ("exit 75 under Kueue: requeued too", run(nodes=()), failed(EXIT_RETRYABLE), True, (),
     [(Step.REQUEUE, "Interrupted")]),
    ("other exit: gang restart in place", run(), failed(1), False, (), [(Step.RESTART, "Restarting")]),
    ("killed (137): gang restart", run(restarts=2), failed(137), False, (), [(Step.RESTART, "Restarting")]),
    ("restarts used up", run(restarts=3), failed(1), False, (), [(Step.FAIL, "RestartsExhausted")]),
    ("restarts used up by a 75", run(restarts=3), failed(EXIT_RETRYABLE), False, (),
     [(Step.FAIL, "RestartsExhausted")]),
    ("deadline", run(), failed(None, "DeadlineExceeded"), False, (), [(Step.FAIL, "DeadlineExceeded")]),
    ("a failure seen again after the requeue", run(phase="Queued"), failed(EXIT_RETRYABLE), False, (), []),
    ("node lost: requeued onto other nodes", run(), JobView(ready=0), False, ("gpu-0",),
     [(Step.REQUEUE, "NodeLost")]),
    ("node lost, restarts used up", run(restarts=3), JobView(), False, ("gpu-0",),
     [(Step.FAIL, "RestartsExhausted")]),
    ("node lost while queued: nothing held", run(phase="Queued"), JobView(suspended=True), True, ("gpu-0",), []),
    ("Kueue eviction: back to Queued, the Job waits", run(nodes=()), JobView(suspended=True), True, (),
     [(Step.EVICT, "Evicted")]),
    ("Kueue has not admitted it yet", run(phase="Queued", nodes=()), JobView(suspended=True), True, (), []),
    ("Kueue admitted it", run(phase="Queued", nodes=()), JobView(), True, (), [(Step.ADMIT, "Admitted")]),
    ("Kueue admitted it and a pod is ready", run(phase="Queued", nodes=()), JobView(ready=1), True, (),
     [(Step.ADMIT, "Admitted"), (Step.START, "Started")]),
    ("built-in: unsuspended Job of a queued run is not an admission", run(phase="Queued"), JobView(), False, (),
     []),
    ("pods ready: Running", run(phase="Admitted"), JobView(ready=1), False, (), [(Step.START, "Started")]),
    ("complete: Succeeded", run(), JobView(complete=True), False, (), [(Step.SUCCEED, "Completed")]),
    ("complete again: nothing", run(phase="Succeeded"), JobView(complete=True), False, (), []),
    ("deleted while active: recreated", run(), JobView(deleted=True), False, (), [(Step.RECREATE, "")]),
    ("deleted after suspension: not recreated", run(phase="Suspended"), JobView(deleted=True), False, (), []),
    ("deleted while waiting in Kueue: recreated", run(phase="Queued", nodes=()), JobView(deleted=True), True, (),
     [(Step.RECREATE, "")]),
    ("deleted while waiting in the built-in queue: nothing", run(phase="Queued"), JobView(deleted=True), False, (),
     []),
    ("a Job of an older spec: ignored", run(), JobView(current=False, failed=True, exit_code=1), False, (), []),
], ids=lambda x: x if isinstance(x, str) else "")
def test_job_outcome_table(case: str, r: RunSnapshot, job: JobView, external: bool, lost: tuple[str, ...],
                           expected: list[tuple[Step, str]]) -> None:
    assert steps(job_outcome(r, job, max_restarts=3, external=external, lost=lost)) == expected


def test_retries_count_and_say_why() -> None:
    (requeue,) = job_outcome(run(restarts=1), failed(EXIT_RETRYABLE), max_restarts=3, external=False)
    assert requeue.restarts == 2 and "requeued (2/3)" in requeue.message and "exit code 75: boom" in requeue.message
    (restart,) = job_outcome(run(restarts=0), failed(1), max_restarts=3, external=False)
    assert restart.restarts == 1 and restart.message == "restart 1/3 after exit code 1: boom"
    (fail,) = job_outcome(run(), failed(EXIT_BAD_DATA, "PodFailurePolicy"), max_restarts=3, external=False)
    assert fail.restarts is None and fail.message == "exit code 65: boom"


def test_job_view_reads_the_job_as_the_server_returns_it() -> None:
    job = {"metadata": {"name": "r-train", "annotations": {ANNOTATION_RUN_HASH: H}},
           "spec": {"suspend": False},
           "status": {"ready": 2, "conditions": [
               {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"},
               {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "rule 0"}]}}
    view = JobView.of(job, H, ANNOTATION_RUN_HASH)
    assert (view.current, view.failed, view.failed_reason, view.complete, view.ready) == (
        True, True, "PodFailurePolicy", False, 2)
    assert not JobView.of(job, "another-hash", ANNOTATION_RUN_HASH).current
    # Failing, not yet Failed (a pod still terminating, maybe on a lost node): decided already.
    job["status"]["conditions"] = job["status"]["conditions"][:1]
    failing = JobView.of(job, H, ANNOTATION_RUN_HASH)
    assert failing.failed and failing.failed_reason == "PodFailurePolicy"
    assert JobView.of({"spec": {"suspend": True}}, H, ANNOTATION_RUN_HASH).suspended


def test_failing_trainer_is_the_first_failed_pod_by_name() -> None:
    def pod(name: str, code: int, message: str = "") -> dict:
        term = {"exitCode": code, "message": message, "reason": "Error"}
        return {"metadata": {"name": name}, "status": {"containerStatuses": [
            {"name": "sidecar", "state": {"terminated": {"exitCode": 2}}},
            {"name": "trainer", "state": {"terminated": term}}]}}

    pods = [pod("r-train-1", 75, "rank 1 lost its peer"), pod("r-train-0", 65, "  line 3: no assistant turn  ")]
    assert failing_trainer(pods, "trainer") == (65, "line 3: no assistant turn")
    assert failing_trainer([pod("r-train-0", 0)], "trainer") == (None, "")


def test_a_node_is_lost_when_deleted_or_not_ready_past_the_grace() -> None:
    def node(ready: str, since: str) -> dict:
        return {"status": {"conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": since}]}}

    t0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    nodes = {"ok": node("True", "2026-01-01T00:00:00Z"), "blip": node("Unknown", "2026-01-01T00:00:00Z"),
             "dead": node("False", "2025-12-31T23:50:00Z")}
    assert lost_nodes(["ok", "blip", "dead", "deleted"], nodes, now=t0 + 60) == ["dead", "deleted"]
    assert lost_nodes(["blip"], nodes, now=t0 + 301) == ["blip"]
