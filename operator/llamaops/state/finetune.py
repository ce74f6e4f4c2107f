"""What to do with a LlamaFineTune: pure decisions over typed views of the run and its Job.

    RunSnapshot    a run as the operator keeps it (kopf's index values), each field parsed once
    decide()       spec-driven transitions: Pending -> Queued -> Admitted -> Running -> Succeeded | Failed,
                   and Suspended; a change to what is trained or where it runs (the run hash: the spec less
                   `queue` and `suspend`) restarts the run cleanly; edits to `queue` only reorder the queue
    job_outcome()  what the run's Job (and its pods, and its nodes) mean for the run: succeed, fail, restart
                   the gang in place, requeue, follow an external queue's admission or eviction

No I/O: the handlers read the cluster, call these, and carry out the result.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llamaops import status as st
from llamaops.api import FineTuneSpec
from llamaops.api.contract import EXIT_RETRYABLE, digest
from llamaops.api.finetune import QueueSpec, TrainingResources
from llamaops.queue.policy import QueuedRun

ACTIVE = ("Admitted", "Running")
DONE = ("Succeeded",)
# A node NotReady this long is lost (Kubernetes' own taint-based eviction waits as long, 300 s by default).
NODE_LOST_AFTER_SECONDS = 300.0


def run_hash(spec: FineTuneSpec) -> str:
    """The spec less `queue` and `suspend`: what the workload is made from."""
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    wire.pop("queue", None)
    wire.pop("suspend", None)
    return digest(wire)[:16]


def _section(model: type[Any], value: Any) -> Any:
    """A spec section as its model; its defaults when it does not parse (the reconcile reports that spec)."""
    try:
        return model.model_validate(value or {})
    except ValidationError:
        return model()


def _timestamp(value: str | None) -> float:
    parsed = st.parse_time(value)
    return parsed.timestamp() if parsed else 0.0


@dataclass(frozen=True)
class RunSnapshot:
    """A LlamaFineTune as the operator keeps it: the values of its run index (handlers/finetune.py), read by
    the admission loop, the job-outcome decisions, metrics.RunsCollector and `llamaops queue`."""

    namespace: str
    name: str
    uid: str | None = None
    created: str | None = None  # metadata.creationTimestamp, as the server writes it
    phase: str | None = None
    suspend: bool = False
    in_scope: bool = True  # whether this operator manages the run's namespace
    resources: TrainingResources = field(default_factory=TrainingResources)
    queue: QueueSpec = field(default_factory=QueueSpec)
    assigned_nodes: tuple[str, ...] = ()
    run_hash: str | None = None
    restarts: int = 0
    conditions: tuple[Mapping[str, Any], ...] = ()
    progress: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, obj: Mapping[str, Any], in_scope: bool = True) -> RunSnapshot:
        """From the object as the API server returns it."""
        meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
        return cls(
            namespace=meta.get("namespace") or "default", name=meta.get("name") or "", uid=meta.get("uid"),
            created=meta.get("creationTimestamp"), phase=status.get("phase"), suspend=bool(spec.get("suspend")),
            in_scope=in_scope, resources=_section(TrainingResources, spec.get("resources")),
            queue=_section(QueueSpec, spec.get("queue")),
            assigned_nodes=tuple(status.get("assignedNodes") or ()), run_hash=status.get("runHash"),
            restarts=int(status.get("restarts") or 0), conditions=tuple(status.get("conditions") or ()),
            progress=dict(status.get("progress") or {}),
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def created_ts(self) -> float:
        return _timestamp(self.created)

    @property
    def gpus(self) -> int:
        return self.resources.total_gpus

    def queued(self, overtaken: int = 0, cpu_only: bool = False) -> QueuedRun:
        """The run as a queue policy sees it. `cpu_only` (demo mode, a dev node): it holds no GPUs."""
        res = self.resources
        if cpu_only:
            return QueuedRun(self.key, self.queue.priority, self.created_ts, res.nodes, 0, overtaken=overtaken,
                             queue_name=self.queue.name)
        tolerations = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in res.tolerations or []]
        return QueuedRun(self.key, self.queue.priority, self.created_ts, res.nodes, res.gpus_per_node,
                         res.gpu_product, dict(res.node_selector or {}), tolerations, overtaken, self.queue.name)


# ---------------------------------------------------------------- spec-driven transitions


class Action(enum.Enum):
    REJECT = "reject"  # invalid spec: Failed, no workload
    SUSPEND = "suspend"  # remove the workload, keep checkpoints, leave the queue
    QUEUE = "queue"  # (re)join the queue, removing a stale workload first
    ENSURE = "ensure"  # keep running; recreate missing children
    KEEP = "keep"  # nothing to do


@dataclass(frozen=True)
class State:
    phase: str | None
    valid: bool
    suspend: bool
    run_hash: str  # of the current spec
    status_run_hash: str | None  # of the spec the workload (or the finished run) was made from
    resumed: bool = False  # the operator restarted and is catching up


def decide(s: State) -> Action:
    if not s.valid:
        return Action.REJECT
    if s.suspend:
        return Action.KEEP if s.phase == "Suspended" else Action.SUSPEND
    same = s.status_run_hash == s.run_hash
    if s.phase in ACTIVE:
        return Action.ENSURE if same else Action.QUEUE
    if s.phase in DONE:
        return Action.KEEP if same else Action.QUEUE
    if s.phase == "Failed" and same and s.resumed:
        return Action.KEEP  # a restart of the operator retries nothing
    if s.phase == "Queued" and s.resumed:
        return Action.KEEP
    return Action.QUEUE


# ---------------------------------------------------------------- what the Job means for the run


@dataclass(frozen=True)
class JobView:
    """A run's training Job as the decisions read it (and, once it failed, its failing trainer)."""

    current: bool = True  # made from the run's current spec (its run-hash annotation is the run's)
    deleted: bool = False
    complete: bool = False
    failed: bool = False
    failed_reason: str = ""  # the Failed condition's reason: PodFailurePolicy, DeadlineExceeded, BackoffLimitExceeded
    failed_message: str = ""
    suspended: bool = False
    ready: int = 0  # pods ready
    exit_code: int | None = None  # the failing trainer's
    termination_message: str = ""  # the tail of its termination message

    @classmethod
    def of(cls, job: Mapping[str, Any], run_hash: str | None, annotation: str, deleted: bool = False) -> JobView:
        status = job.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        # FailureTarget comes first (Kubernetes 1.31+), Failed once every pod has terminated: a pod that cannot
        # terminate (its node is gone) must not hold the decision, so either one means the Job failed.
        failed = conditions.get("Failed") or conditions.get("FailureTarget") or {}
        return cls(
            current=((job.get("metadata") or {}).get("annotations") or {}).get(annotation) == run_hash,
            deleted=deleted, complete="Complete" in conditions, failed=bool(failed),
            failed_reason=failed.get("reason") or ("Failed" if failed else ""),
            failed_message=failed.get("message") or "", suspended=bool((job.get("spec") or {}).get("suspend")),
            ready=int(status.get("ready") or 0))

    def with_failure(self, exit_code: int | None, message: str) -> JobView:
        return JobView(**{**self.__dict__, "exit_code": exit_code, "termination_message": message})


def failing_trainer(pods: Iterable[Mapping[str, Any]], container: str, tail: int = 2048) -> tuple[int | None, str]:
    """The first failed trainer container (by pod name): its exit code and the tail of its termination message."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if cs.get("name") == container and term.get("exitCode"):
                message = (term.get("message") or term.get("reason") or "").strip()
                return term["exitCode"], message[-tail:]
    return None, ""


def lost_nodes(assigned: Sequence[str], nodes: Mapping[str, Mapping[str, Any]], now: float,
               grace: float = NODE_LOST_AFTER_SECONDS) -> list[str]:
    """The assigned nodes that are gone: deleted, or NotReady for longer than `grace` seconds.

    `nodes`: name -> Node as the API server returns it (its Ready condition is all that is read).
    """
    lost = []
    for name in assigned:
        node = nodes.get(name)
        if node is None:
            lost.append(name)
            continue
        ready = st.condition((node.get("status") or {}).get("conditions"), "Ready") or {}
        if ready.get("status") != "True" and now - _timestamp(ready.get("lastTransitionTime")) >= grace:
            lost.append(name)
    return lost


class Step(enum.Enum):
    RECREATE = "recreate"  # the current Job is gone while the run is active: create it again
    SUCCEED = "succeed"  # the adapter is there
    FAIL = "fail"  # for good: no retry
    RESTART = "restart"  # delete the Job; its deletion recreates it on the same placement (restarts + 1)
    REQUEUE = "requeue"  # delete the Job; the run queues again and resumes from its newest checkpoint (restarts + 1)
    ADMIT = "admit"  # an external queue unsuspended the Job
    START = "start"  # pods are ready: Running
    EVICT = "evict"  # an external queue suspended the Job again: Queued, until it is re-admitted


@dataclass(frozen=True)
class Outcome:
    step: Step
    reason: str = ""
    message: str = ""
    restarts: int | None = None  # the run's new restart count, when it changes


def job_outcome(run: RunSnapshot, job: JobView, *, max_restarts: int, external: bool,
                lost: Sequence[str] = ()) -> list[Outcome]:
    """What to do, in order, after the run's Job changed.

    `external`: an external queue (Kueue) admits the run's Jobs. `lost`: the run's assigned nodes that are
    gone (`lost_nodes`).

        Job                                           run
        of an older spec                              nothing (on its way out)
        deleted while the run is active               recreate it (a gang restart, or deleted by hand)
        deleted while it waits in an external queue   recreate it, suspended (it waits as that Job)
        Complete                                      Succeeded
        Failed: exit 64/65 (podFailurePolicy)         Failed, TrainerError, no retry
        Failed: activeDeadlineSeconds                 Failed, DeadlineExceeded
        Failed, restarts used up                      Failed, RestartsExhausted
        Failed: exit 75 (the trainer checkpointed)    requeue; resumes from its checkpoint
        Failed: any other exit                        restart the gang in place
        a node of its placement lost                  requeue onto other nodes
        unsuspended by the external queue             Admitted (and Running once a pod is ready)
        suspended again by the external queue         evicted: Queued until re-admitted
        pods ready                                    Running
    """
    if not job.current:
        return []
    phase = run.phase
    if job.deleted:
        # An active run goes on; under an external queue a waiting run waits as its suspended Job.
        waits_as_job = external and phase == "Queued" and not run.suspend
        return [Outcome(Step.RECREATE)] if phase in ACTIVE or waits_as_job else []
    if job.complete:
        return [] if phase in DONE else [Outcome(Step.SUCCEED, "Completed")]
    if job.failed:
        if phase not in ACTIVE:
            return []  # already failed, requeued or suspended
        detail = (f"exit code {job.exit_code}: {job.termination_message}" if job.exit_code is not None
                  else job.failed_message or job.failed_reason)
        if job.failed_reason == "PodFailurePolicy":
            return [Outcome(Step.FAIL, "TrainerError", detail)]
        if job.failed_reason == "DeadlineExceeded":
            return [Outcome(Step.FAIL, "DeadlineExceeded", detail)]
        if run.restarts >= max_restarts:
            return [Outcome(Step.FAIL, "RestartsExhausted", detail)]
        count = f"{run.restarts + 1}/{max_restarts}"
        if job.exit_code == EXIT_RETRYABLE:
            return [Outcome(Step.REQUEUE, "Interrupted", f"requeued ({count}), resumes from its checkpoint after "
                                                         f"{detail}", run.restarts + 1)]
        return [Outcome(Step.RESTART, "Restarting", f"restart {count} after {detail}", run.restarts + 1)]
    if phase in ACTIVE and lost:
        if run.restarts >= max_restarts:
            return [Outcome(Step.FAIL, "RestartsExhausted", f"node(s) {', '.join(lost)} lost")]
        return [Outcome(Step.REQUEUE, "NodeLost", f"node(s) {', '.join(lost)} lost: requeued "
                                                  f"({run.restarts + 1}/{max_restarts}), resumes from its checkpoint",
                        run.restarts + 1)]
    out: list[Outcome] = []
    if external and job.suspended:
        if phase in ACTIVE:
            out.append(Outcome(Step.EVICT, "Evicted", "evicted by the queue: waiting to be admitted again"))
        return out
    if external and phase == "Queued" and not run.suspend:
        out.append(Outcome(Step.ADMIT, "Admitted", "admitted by the queue"))
        phase = "Admitted"
    if phase == "Admitted" and job.ready > 0:
        out.append(Outcome(Step.START, "Started", f"{job.ready} of {run.resources.nodes} pod(s) ready"))
    return out
