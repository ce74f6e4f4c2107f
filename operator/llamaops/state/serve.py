"""What a LlamaServe serves and how its rollout stands: pure decisions, no I/O.

    resolve()        the adapters to serve (a fineTuneRef becomes its run's status.adapter) and those awaited
    rollout_phase()  Ready, Deploying or Degraded, from the Deployment as the API server returns it
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from llamaops import status as st
from llamaops.api import LlamaServe
from llamaops.api.finetune import LlamaFineTune, S3Location
from llamaops.api.serve import S3Access


@dataclass(frozen=True)
class S3Credentials:
    endpoint: str | None = None
    region: str | None = None
    secret: str | None = None  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY

    @classmethod
    def of(cls, access: S3Location | S3Access | None) -> S3Credentials | None:
        if access is None:
            return None
        return cls(endpoint=access.endpoint, region=access.region,
                   secret=access.credentials_secret.name if access.credentials_secret else None)


@dataclass(frozen=True)
class ResolvedAdapter:
    """One adapter to serve, wherever it came from."""

    name: str
    uri: str  # pvc://claim/path, s3://bucket/prefix or hf://org/repo
    source: str  # "LlamaFineTune/<name>" or "uri"
    base_model: str | None = None
    r: int | None = None
    system_prompt: str | None = None
    revision: str | None = None  # the run's completion time: changes when it is re-trained
    s3: S3Credentials | None = field(default=None, compare=False)

    def status(self) -> dict[str, Any]:
        out = {"name": self.name, "uri": self.uri, "source": self.source, "baseModel": self.base_model,
               "r": self.r, "systemPrompt": self.system_prompt, "revision": self.revision}
        return {k: v for k, v in out.items() if v is not None}


def resolve(lsv: LlamaServe, runs: Mapping[str, LlamaFineTune | None],
            served: list[dict[str, Any]]) -> tuple[list[ResolvedAdapter], list[str]]:
    """The adapters to serve, and what is still awaited ("<adapter> (LlamaFineTune <run>: <phase>)").

    `runs`: the referenced LlamaFineTunes by name (None: not found); `served`: status.adapters as last written.
    A run being re-trained keeps serving the adapter it produced before (recorded in
    status.adapters) until the new one is there: a re-run never takes an endpoint down.
    """
    uri_s3 = S3Credentials.of(lsv.spec.s3)
    before = {a.get("name"): a for a in served}
    out, waiting = [], []
    for a in lsv.spec.adapters:
        if a.uri:
            out.append(ResolvedAdapter(a.name, a.uri, "uri", a.base_model, a.r, s3=uri_s3))
            continue
        ref = a.fine_tune_ref or ""
        source = f"LlamaFineTune/{ref}"
        run = runs.get(ref)
        status = run.status if run is not None else None
        run_s3 = S3Credentials.of(run.spec.output.s3) if run is not None else None
        done = status.adapter if status is not None and status.phase == "Succeeded" else None
        if done is not None and done.uri:
            revision = status.completion_time.strftime("%Y-%m-%dT%H:%M:%SZ") \
                if status is not None and status.completion_time else None
            out.append(ResolvedAdapter(a.name, done.uri, source, done.base_model, done.r, done.system_prompt,
                                       revision, s3=run_s3))
            continue
        prev = before.get(a.name)
        if prev is not None and prev.get("source") == source and prev.get("uri"):
            out.append(ResolvedAdapter(a.name, prev["uri"], source, prev.get("baseModel"), prev.get("r"),
                                       prev.get("systemPrompt"), prev.get("revision"), s3=run_s3))
            continue
        phase = "not found" if run is None else (status.phase if status and status.phase else "Pending")
        waiting.append(f"{a.name} (LlamaFineTune {ref}: {phase})")
    return out, waiting


class Rollout(NamedTuple):
    """A LlamaServe's phase (with why) and its Deployment's replica counts."""

    phase: str  # Ready, Deploying or Degraded
    message: str
    desired: int  # spec.replicas
    replicas: int
    updated: int
    ready: int
    available: int


def rollout_phase(dep: Mapping[str, Any], previous: str | None) -> Rollout:
    """The rollout of a LlamaServe whose Deployment is `dep` (as the API server returns it).

    Ready: every replica runs the current pod template and is available.
    Deploying: a rollout is under way (old replicas keep serving until new ones are Ready).
    Degraded: the rollout missed its deadline, or replicas were lost after it finished.
    """
    spec, dst = dep.get("spec") or {}, dep.get("status") or {}
    # The server always has spec.replicas (defaulted to 1; with an autoscaler, the count it set).
    desired = spec.get("replicas", 1)
    gen_ok = (dst.get("observedGeneration") or 0) >= (dep.get("metadata") or {}).get("generation", 0)
    updated, total = dst.get("updatedReplicas") or 0, dst.get("replicas") or 0
    available, ready = dst.get("availableReplicas") or 0, dst.get("readyReplicas") or 0

    def rollout(phase: str, message: str) -> Rollout:
        return Rollout(phase, message, desired, total, updated, ready, available)

    progressing = st.condition(dst.get("conditions"), "Progressing") or {}
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return rollout("Degraded", f"the rollout made no progress: {progressing.get('message', '')}".strip())
    rolled = gen_ok and updated >= desired and total <= updated
    if rolled and available >= desired:
        return rollout("Ready", f"{ready}/{desired} replicas ready")
    if rolled and previous in ("Ready", "Degraded"):
        return rollout("Degraded", f"{available}/{desired} replicas available")
    if not gen_ok:
        return rollout("Deploying", "the Deployment is taking the new spec")
    return rollout("Deploying", f"{updated}/{desired} replicas updated, {available} available")
