"""What a run's Job (and the report its trainer left) means for the run: the job-outcome decisions, as a table
(state.finetune.job_outcome), and the checks on what a training pod reports."""

from __future__ import annotations

import json

import pytest
from api_cases import example
from llamaops.api import LlamaFineTune
from llamaops.api.constants import ANNOTATION_RUN_HASH
from llamaops.api.contract import EXIT_BAD_CONFIG, EXIT_BAD_DATA, EXIT_RETRYABLE, spec_hash
from llamaops.api.finetune import TrainingResources
from llamaops.state.finetune import (
    JobView,
    PodView,
    Report,
    RunSnapshot,
    Step,
    completed_adapter,
    failing_trainer,
    job_outcome,
    lost_nodes,
    stuck_outcome,
)

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
    assert lost_nodes(["ok", "blip", "dead", "deleted"], nodes, now=t0 + 60, grace=300) == ["dead", "deleted"]
    assert lost_nodes(["blip"], nodes, now=t0 + 301, grace=300) == ["blip"]


# ---------------------------------------------------------------- the trainer's report


def test_a_report_is_read_key_by_key_and_garbage_is_refused_with_why() -> None:
    good = Report.of({"progress": json.dumps({"step": 5, "totalSteps": 10, "loss": 1.5, "display": "5/10",
                                              "stepSeconds": 45.2, "updatedAt": "2026-01-01T00:00:00Z"}),
                      "adapter": json.dumps({"baseModel": "m", "r": 16})})
    assert good.progress_status() == {"step": 5, "totalSteps": 10, "loss": 1.5, "display": "5/10",
                                      "stepSeconds": 45.2, "updatedAt": "2026-01-01T00:00:00Z"}
    assert good.adapter is not None and good.adapter.r == 16 and good.problems == ()
    forged = Report.of({"progress": json.dumps({"step": -1, "phase": "Succeeded"}), "adapter": "not json"})
    assert forged.progress is None and forged.adapter is None and len(forged.problems) == 2
    assert Report.of({"progress": json.dumps({"step": 5, "stepSeconds": -1})}).progress is None
    assert Report.of(None) == Report()


def lft(output: dict, lora: dict | None = None) -> LlamaFineTune:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"].update(name="r", namespace="ml")
    doc["spec"]["output"] = output
    doc["spec"]["lora"].update(lora or {})
    return LlamaFineTune.model_validate(doc)


def report(run: LlamaFineTune, **adapter) -> Report:
    body = {"baseModel": run.spec.model.base_model, "r": 64, "specHash": spec_hash(run.spec), **adapter}
    return Report.of({"adapter": json.dumps(body)})


def test_the_adapter_of_a_pvc_output_is_where_the_operator_says() -> None:
    run = lft({"pvc": {"claimName": "adapters"}})
    adapter, why = completed_adapter(run, report(run, uri="s3://elsewhere/x"))
    assert why == "" and adapter["uri"] == "pvc://adapters/ml/r/adapter" and adapter["r"] == 64
    # Nothing reported: the rank the spec exports.
    adapter, _ = completed_adapter(run, Report())
    assert adapter["r"] == 32 and adapter["systemPrompt"] == run.spec.system_prompt
    # A report of an earlier spec is not this adapter's.
    adapter, _ = completed_adapter(run, report(run, specHash="an-earlier-spec"))
    assert adapter["r"] == 32


def test_the_adapter_of_an_s3_output_must_be_reported_under_its_prefix() -> None:
    run = lft({"s3": {"uri": "s3://team-a/adapters/r/"}}, {"init_lora_weights": "pissa"})
    adapter, why = completed_adapter(run, report(run, uri="s3://team-a/adapters/r/adapter", r=64))
    assert why == "" and adapter["uri"] == "s3://team-a/adapters/r/adapter" and adapter["r"] == 64
    assert completed_adapter(run, Report()) == (None, "the trainer reported no adapter location: the adapter "
                                                      "cannot be found")
    adapter, why = completed_adapter(run, report(run, uri="s3://team-b/stolen"))
    assert adapter is None and "s3://team-b/stolen is not under s3://team-a/adapters/r/" in why
    adapter, why = completed_adapter(run, report(run, uri="s3://team-a/adapters/r-other/adapter"))
    assert adapter is None


def test_a_completed_job_without_its_adapter_fails_the_run() -> None:
    outcome = job_outcome(run(), JobView(complete=True), max_restarts=3, external=False,
                          adapter_missing="the trainer reported no adapter location")
    assert steps(outcome) == [(Step.FAIL, "AdapterMissing")]


# ---------------------------------------------------------------- pods that will never train


def pod_view(name: str = "r-train-0", **status) -> PodView:
    pod = {"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": status}
    return PodView.of(pod, "trainer")


T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
UNSCHEDULABLE = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "lastTransitionTime": "2026-01-01T00:00:00Z",
                                 "message": "0/3 nodes are available: 2 Insufficient cpu."}]}


def test_pod_view_reads_the_scheduler_and_the_kubelet() -> None:
    view = pod_view(**UNSCHEDULABLE)
    assert view.unschedulable_since == T0 and "Insufficient cpu" in view.unschedulable
    pulling = pod_view(containerStatuses=[{"name": "trainer", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image \"registry/nope:1\""}}}])
    assert (pulling.waiting_reason, pulling.unschedulable_since) == ("ImagePullBackOff", None)


@pytest.mark.parametrize(("pods", "job_created", "now", "expected"), [
    ([pod_view(**UNSCHEDULABLE)], T0, T0 + 10, []),  # within the grace
    ([pod_view(**UNSCHEDULABLE)], T0, T0 + 60, [(Step.REQUEUE, "Unschedulable")]),
    ([pod_view(containerStatuses=[{"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull"}}}])],
     T0, T0 + 60, [(Step.FAIL, "ImagePullFailed")]),
    ([pod_view(containerStatuses=[{"name": "trainer", "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": "secret \"hf-token\" not found"}}}])],
     T0, T0 + 60, [(Step.FAIL, "ContainerConfigError")]),
    ([pod_view(containerStatuses=[{"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}])],
     T0, T0 + 600, []),
    ([], T0, T0 + 60, [(Step.FAIL, "PodsNotCreated")]),
    ([], T0, T0 + 10, []),
    ([pod_view(phase="Running")], T0, T0 + 6000, []),
], ids=["young", "unschedulable", "image", "config", "creating", "no-pods", "no-pods-young", "healthy"])
def test_stuck_runs_give_their_gpus_back(pods: list[PodView], job_created: float, now: float,
                                         expected: list[tuple[Step, str]]) -> None:
    outcomes = stuck_outcome(run(), pods, job_created, now=now, grace=30, max_restarts=3)
    assert steps(outcomes) == expected
    assert all(o.release for o in outcomes if o.step is Step.FAIL)


def test_an_unschedulable_run_out_of_restarts_fails_with_the_schedulers_message() -> None:
    (fail,) = stuck_outcome(run(restarts=3), [pod_view(**UNSCHEDULABLE)], T0, now=T0 + 60, grace=30, max_restarts=3)
    assert (fail.step, fail.reason, fail.release) == (Step.FAIL, "Unschedulable", True)
    assert "0/3 nodes are available: 2 Insufficient cpu." in fail.message
    assert stuck_outcome(run(phase="Queued"), [pod_view(**UNSCHEDULABLE)], T0, now=T0 + 60, grace=30,
                         max_restarts=3) == []


def test_the_watchdog_finds_lost_nodes_and_stuck_pods_from_the_indexes() -> None:
    from llamaops.handlers.watchdog import decisions

    admitted = ({"type": "Admitted", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},)
    lost = run(nodes=("gone",), conditions=admitted)
    stuck = RunSnapshot(namespace="ml", name="s", phase="Admitted", run_hash=H, assigned_nodes=("ok",),
                        conditions=admitted)
    fine = RunSnapshot(namespace="ml", name="f", phase="Running", run_hash=H, assigned_nodes=("ok",),
                       conditions=admitted)
    nodes = {"ok": {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}}
    pods = [{"namespace": "ml", "finetune": "s", "view": pod_view("s-train-0", **UNSCHEDULABLE)},
            {"namespace": "ml", "finetune": "f", "view": pod_view("f-train-0", phase="Running")},
            {"namespace": "other", "finetune": None, "view": None}]
    out = decisions([lost, stuck, fine], nodes, pods, now=T0 + 60, stuck_after=30, node_lost_after=30,
                    external=False)
    assert {k: steps(v) for k, v in out.items()} == {"ml/r": [(Step.REQUEUE, "NodeLost")],
                                                     "ml/s": [(Step.REQUEUE, "Unschedulable")]}
