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
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from llamaops import status as st
from llamaops.api import FineTuneSpec, LlamaFineTune
from llamaops.api.contract import EXIT_RETRYABLE, REPORT_ADAPTER, REPORT_PROGRESS, digest, spec_hash
from llamaops.api.finetune import AdapterReport, Progress, QueueSpec, TrainingResources
from llamaops.queue.policy import QueuedRun

ACTIVE = ("Admitted", "Running")
DONE = ("Succeeded",)


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
    resource_version: str | None = None  # of the object read: status writes made from it are conditional on it
    generation: int = 0  # of its spec
    created: str | None = None  # metadata.creationTimestamp, as the server writes it
    phase: str | None = None
    suspend: bool = False
    in_scope: bool = True  # whether this operator manages the run's namespace
    resources: TrainingResources = field(default_factory=TrainingResources)
    queue: QueueSpec = field(default_factory=QueueSpec)
    assigned_nodes: tuple[str, ...] = ()
    run_hash: str | None = None
    restarts: int = 0
    max_restarts: int = FineTuneSpec.model_fields["max_restarts"].default
    conditions: tuple[Mapping[str, Any], ...] = ()
    progress: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, obj: Mapping[str, Any], in_scope: bool = True) -> RunSnapshot:
        """From the object as the API server returns it."""
        meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
        return cls(
            namespace=meta.get("namespace") or "default", name=meta.get("name") or "", uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"), generation=int(meta.get("generation") or 0),
            created=meta.get("creationTimestamp"), phase=status.get("phase"), suspend=bool(spec.get("suspend")),
            in_scope=in_scope, resources=_section(TrainingResources, spec.get("resources")),
            queue=_section(QueueSpec, spec.get("queue")),
            assigned_nodes=tuple(status.get("assignedNodes") or ()), run_hash=status.get("runHash"),
            restarts=int(status.get("restarts") or 0), conditions=tuple(status.get("conditions") or ()),
            max_restarts=int(spec.get("maxRestarts", cls.max_restarts)),
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

    @property
    def admitted_at(self) -> float | None:
        """When it was admitted (its Job made, or unsuspended by an external queue), if it is."""
        admitted = st.condition(list(self.conditions), "Admitted") or {}
        return _timestamp(admitted.get("lastTransitionTime")) if admitted.get("status") == "True" else None

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
               grace: float) -> list[str]:
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
    release: bool = False  # a FAIL that must also delete the Job: its pods still hold (or wait for) GPUs


def job_outcome(run: RunSnapshot, job: JobView, *, max_restarts: int, external: bool,
                lost: Sequence[str] = (), adapter_missing: str = "") -> list[Outcome]:
    """What to do, in order, after the run's Job changed.

    `external`: an external queue (Kueue) admits the run's Jobs. `lost`: the run's assigned nodes that are
    gone (`lost_nodes`). `adapter_missing`: why a completed Job's adapter cannot be found (`completed_adapter`).

        Job                                           run
        of an older spec                              nothing (on its way out)
        deleted while the run is active               recreate it (a gang restart, or deleted by hand)
        deleted while it waits in an external queue   recreate it, suspended (it waits as that Job)
        Complete                                      Succeeded
        Complete, but the adapter cannot be found     Failed, AdapterMissing
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
        if phase in DONE or phase == "Failed":
            return []
        if adapter_missing:
            return [Outcome(Step.FAIL, "AdapterMissing", adapter_missing)]
        return [Outcome(Step.SUCCEED, "Completed")]
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
            return [Outcome(Step.FAIL, "RestartsExhausted", f"node(s) {', '.join(lost)} lost", release=True)]
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


# ---------------------------------------------------------------- what the trainer reports


@dataclass(frozen=True)
class Report:
    """The run's report ConfigMap, checked: what a training pod may tell the operator, and nothing else."""

    progress: Progress | None = None
    adapter: AdapterReport | None = None
    problems: tuple[str, ...] = ()  # what was refused, and why

    @classmethod
    def of(cls, data: Mapping[str, str] | None) -> Report:
        """From the ConfigMap's data; a key that does not parse as its model is left out, with the reason."""
        values: dict[str, Any] = {}
        problems = []
        for key, model in ((REPORT_PROGRESS, Progress), (REPORT_ADAPTER, AdapterReport)):
            raw = (data or {}).get(key)
            if raw is None:
                continue
            try:
                values[key] = model.model_validate(json.loads(raw), strict=False)
            except (ValueError, ValidationError) as exc:
                problems.append(f"{key}: {' '.join(str(exc).split())[:200]}")
        return cls(values.get(REPORT_PROGRESS), values.get(REPORT_ADAPTER), tuple(problems))

    def progress_status(self) -> dict[str, Any] | None:
        return self.progress.model_dump(mode="json", by_alias=True, exclude_none=True) if self.progress else None


def completed_adapter(lft: LlamaFineTune, report: Report) -> tuple[dict[str, Any] | None, str]:
    """status.adapter of a run whose Job completed, from the spec and what the trainer reported; else (None, why).

    The operator decides where the adapter is: a PVC output's place is known; an S3 output's is what the
    trainer uploaded, accepted only under the spec's own output prefix. The rank is the trainer's (the real
    one), else the one the spec exports.
    """
    spec = lft.spec
    reported = report.adapter
    if reported is not None and (reported.base_model != spec.model.base_model
                                 or reported.spec_hash != spec_hash(spec)):
        reported = None  # not this spec's adapter: rank and location unknown
    uri = lft.adapter_uri()
    if spec.output.s3 is not None:
        prefix = spec.output.s3.uri.rstrip("/") + "/"
        uri = reported.uri if reported is not None and reported.uri and \
            (reported.uri + "/").startswith(prefix) else None
        if uri is None:
            why = (f"the reported location {reported.uri} is not under {spec.output.s3.uri}"
                   if reported is not None and reported.uri else "the trainer reported no adapter location")
            return None, f"{why}: the adapter cannot be found"
    adapter: dict[str, Any] = {
        "uri": uri, "baseModel": spec.model.base_model,
        "r": reported.r if reported is not None else spec.lora.exported_rank,
        "loraAlpha": spec.lora.lora_alpha}
    if spec.system_prompt:
        adapter["systemPrompt"] = spec.system_prompt
    return adapter, ""


# ---------------------------------------------------------------- pods that will never train

# Container states that do not clear by waiting (a bad image, a missing Secret or ConfigMap key).
IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONFIG_ERRORS = ("CreateContainerConfigError", "CreateContainerError")


@dataclass(frozen=True)
class PodView:
    """A training pod as the stuck-run checks read it."""

    name: str
    created: float = 0.0
    phase: str | None = None
    unschedulable_since: float | None = None  # PodScheduled=False, reason Unschedulable, since
    unschedulable: str = ""  # the scheduler's message (which resource is short, where)
    waiting_reason: str = ""  # the trainer container's waiting reason
    waiting_message: str = ""

    @classmethod
    def of(cls, pod: Mapping[str, Any], container: str) -> PodView:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        scheduled = st.condition(status.get("conditions"), "PodScheduled") or {}
        unschedulable = scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
        waiting: Mapping[str, Any] = next(
            ((cs.get("state") or {}).get("waiting") or {} for cs in status.get("containerStatuses") or []
             if cs.get("name") == container), {})
        return cls(name=meta.get("name") or "", created=_timestamp(meta.get("creationTimestamp")),
                   phase=status.get("phase"),
                   unschedulable_since=_timestamp(scheduled.get("lastTransitionTime")) if unschedulable else None,
                   unschedulable=scheduled.get("message") or "" if unschedulable else "",
                   waiting_reason=waiting.get("reason") or "", waiting_message=waiting.get("message") or "")


def stuck_outcome(run: RunSnapshot, pods: Sequence[PodView], job_created: float | None, *, now: float,
                  grace: float, max_restarts: int) -> list[Outcome]:
    """An admitted run whose pods will never train, told within `grace` seconds: its GPUs go back.

        a trainer container that cannot start (bad image, missing Secret key)   Failed, with the kubelet's message
        a pod the scheduler cannot place (CPU, memory, a node taken first)       requeued, with the scheduler's
                                                                                 message (Failed once restarts
                                                                                 are used up)
        no pod at all (a ResourceQuota, a missing PriorityClass, a webhook)      Failed: the Job's events say which
    """
    if run.phase not in ACTIVE:
        return []
    for pod in pods:
        if pod.waiting_reason in IMAGE_ERRORS + CONFIG_ERRORS and now - pod.created >= grace:
            reason = "ImagePullFailed" if pod.waiting_reason in IMAGE_ERRORS else "ContainerConfigError"
            return [Outcome(Step.FAIL, reason, f"pod {pod.name}: {pod.waiting_reason}: {pod.waiting_message}",
                            release=True)]
    for pod in pods:
        if pod.unschedulable_since is not None and now - pod.unschedulable_since >= grace:
            why = f"pod {pod.name} cannot be scheduled: {pod.unschedulable}"
            if run.restarts >= max_restarts:
                return [Outcome(Step.FAIL, "Unschedulable", why, release=True)]
            return [Outcome(Step.REQUEUE, "Unschedulable", f"{why}; requeued ({run.restarts + 1}/{max_restarts})",
                            run.restarts + 1)]
    if not pods and job_created is not None and now - job_created >= grace:
        return [Outcome(Step.FAIL, "PodsNotCreated",
                        f"its Job created no pod in {int(now - job_created)} s: a ResourceQuota, a missing "
                        "PriorityClass or an admission policy refuses them (the Job's events say which)",
                        release=True)]
    return []
