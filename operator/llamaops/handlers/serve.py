"""LlamaServe: adapters resolved from their runs, a vLLM Deployment kept to the spec, status from the rollout.

One reconcile function does everything from fresh reads, so it is safe to call
from any trigger, any number of times:

- the LlamaServe's own create / spec update / operator resume;
- a referenced LlamaFineTune whose phase or adapter changed (found through an
  index of serves by run; nothing is ever written onto the user's objects to
  trigger it);
- the owned Deployment's status (ready replicas, rollout progress) only
  refreshes the status (`refresh`).

A per-object lock keeps two triggers of one LlamaServe from interleaving.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import kopf
from pydantic import ValidationError

from llamaops import metrics
from llamaops import status as st
from llamaops.api import LlamaServe
from llamaops.api.finetune import LlamaFineTune
from llamaops.api.validation import validate_serve
from llamaops.builders import serve as b
from llamaops.builders.naming import LABEL_COMPONENT, MANAGED_BY, controller_of
from llamaops.handlers.runtime import Runtime, runtime
from llamaops.handlers.workload import manifest

GROUP, VERSION, PLURAL = "llamaops.io", "v1alpha1", "llamaserves"
KIND = "LlamaServe"

log = logging.getLogger(__name__)
_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
# What a run last looked like to us ((phase, adapter) by (namespace, name)): its events
# re-reconcile the serves that use it only when that changes, not on every progress patch.
_seen_runs: dict[tuple[str, str], Any] = {}


def in_scope(namespace: str | None, **_: Any) -> bool:
    return runtime().in_scope(namespace)


def _refs(spec: dict[str, Any]) -> list[str]:
    return sorted({a["fineTuneRef"] for a in spec.get("adapters") or [] if a.get("fineTuneRef")})


@kopf.index(GROUP, VERSION, PLURAL)
def serves_by_run(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    """(namespace, LlamaFineTune name) -> names of the LlamaServes that reference it."""
    return {(namespace, ref): name for ref in _refs(dict(spec))}


# ---------------------------------------------------------------- reading our objects


def _parse_run(body: dict[str, Any]) -> LlamaFineTune | None:
    """The run with its status (adapter, phase); without it if the status does not parse; None if neither does."""
    doc = manifest(body, with_status=True)
    try:
        return LlamaFineTune.model_validate(doc)
    except ValidationError:
        try:
            return LlamaFineTune.model_validate({**doc, "status": None})
        except ValidationError:
            return None


def _s3_of_run(run: LlamaFineTune) -> b.S3Credentials | None:
    out = run.spec.output.s3
    if out is None:
        return None
    return b.S3Credentials(endpoint=out.endpoint, region=out.region,
                           secret=out.credentials_secret.name if out.credentials_secret else None)


def resolve(lsv: LlamaServe, runs: dict[str, LlamaFineTune | None],
            served: list[dict[str, Any]]) -> tuple[list[b.ResolvedAdapter], list[str]]:
    """The adapters to serve, and what is still awaited ("<adapter> (LlamaFineTune <run>: <phase>)").

    A run being re-trained keeps serving the adapter it produced before (recorded in
    status.adapters) until the new one is there: a re-run never takes an endpoint down.
    """
    spec_s3 = lsv.spec.s3
    uri_s3 = b.S3Credentials(endpoint=spec_s3.endpoint, region=spec_s3.region,
                             secret=spec_s3.credentials_secret.name if spec_s3.credentials_secret else None) \
        if spec_s3 else None
    before = {a.get("name"): a for a in served}
    out, waiting = [], []
    for a in lsv.spec.adapters:
        if a.uri:
            out.append(b.ResolvedAdapter(a.name, a.uri, "uri", a.base_model, a.r, s3=uri_s3))
            continue
        ref = a.fine_tune_ref or ""
        source = f"LlamaFineTune/{ref}"
        run = runs.get(ref)
        status = run.status if run is not None else None
        done = status.adapter if status is not None and status.phase == "Succeeded" else None
        if done is not None and done.uri:
            revision = status.completion_time.strftime("%Y-%m-%dT%H:%M:%SZ") \
                if status is not None and status.completion_time else None
            out.append(b.ResolvedAdapter(a.name, done.uri, source, done.base_model, done.r, done.system_prompt,
                                         revision, s3=_s3_of_run(run) if run else None))
            continue
        prev = before.get(a.name)
        if prev is not None and prev.get("source") == source and prev.get("uri"):
            out.append(b.ResolvedAdapter(a.name, prev["uri"], source, prev.get("baseModel"), prev.get("r"),
                                         prev.get("systemPrompt"), prev.get("revision"),
                                         s3=_s3_of_run(run) if run else None))
            continue
        phase = "not found" if run is None else (status.phase if status and status.phase else "Pending")
        waiting.append(f"{a.name} (LlamaFineTune {ref}: {phase})")
    return out, waiting


# ---------------------------------------------------------------- reconcile


async def _status(rt: Runtime, body: dict[str, Any], new: dict[str, Any]) -> None:
    meta = body["metadata"]
    await rt.kube.patch_status(PLURAL, meta["namespace"], meta["name"], new)


async def _event_once(rt: Runtime, body: dict[str, Any], conditions: list[dict[str, Any]], type_: str,
                      cond: str, reason: str, message: str) -> None:
    """An Event, unless the condition already said exactly this (no event per retry)."""
    old = st.condition(conditions, cond) or {}
    if old.get("reason") != reason or old.get("message") != message:
        await rt.kube.event(body, type_, reason=reason, message=message)


async def _fail(rt: Runtime, body: dict[str, Any], conditions: list[dict[str, Any]], reason: str,
                message: str, gen: int | None, valid: bool) -> None:
    """Failed: nothing new is rolled out; a Deployment of an earlier, valid spec keeps serving."""
    await _event_once(rt, body, conditions, "Warning", st.FAILED, reason, message)
    conditions = st.set_condition(conditions, st.VALID, valid, reason if not valid else "Validated",
                                  message if not valid else "", gen)
    conditions = st.set_condition(conditions, st.FAILED, True, reason, message, gen)
    await _status(rt, body, {"phase": "Failed", "conditions": conditions, "observedGeneration": gen})


async def reconcile(namespace: str, name: str) -> None:
    async with _locks[(namespace, name)]:
        await _reconcile(runtime(), namespace, name)


async def _reconcile(rt: Runtime, namespace: str, name: str) -> None:
    body = await rt.kube.get_serve(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # gone or going: the children go with it (owner references)
    meta, status = body["metadata"], body.get("status") or {}
    gen = meta.get("generation")
    conditions = list(status.get("conditions") or [])

    runs_raw = {ref: await rt.kube.get_finetune(namespace, ref) for ref in _refs(body["spec"])}
    runs = {ref: _parse_run(raw) if raw else None for ref, raw in runs_raw.items()}
    # A missing run is no warning here: resolve() reports its adapter as awaited.
    result = validate_serve(manifest(body), finetunes={k: v for k, v in runs.items() if v is not None},
                            warn_missing=False)
    if not result.ok:
        await _fail(rt, body, conditions, "InvalidSpec", "; ".join(str(p) for p in result.errors), gen, valid=False)
        return
    lsv = result.obj
    assert isinstance(lsv, LlamaServe)
    warnings = "; ".join(str(p) for p in result.warnings)
    conditions = st.set_condition(conditions, st.VALID, True, "Validated", warnings, gen)

    adapters, waiting = resolve(lsv, runs, list(status.get("adapters") or []))
    common = {"endpoint": b.endpoint(lsv), "observedGeneration": gen}
    if waiting:
        message = "waiting for " + ", ".join(waiting) + " to succeed"
        await _event_once(rt, body, conditions, "Normal", st.ADAPTERS_READY, "WaitingForAdapters", message)
        conditions = st.set_condition(conditions, st.ADAPTERS_READY, False, "WaitingForAdapters", message, gen)
        conditions = st.clear_condition(conditions, st.FAILED, "WaitingForAdapters", gen)
        await _status(rt, body, {"phase": "WaitingForAdapters", "conditions": conditions, **common})
        return

    try:
        w = b.workload(lsv, adapters, rt.settings)
    except b.ServeError as exc:
        await _fail(rt, body, conditions, "InvalidAdapters", str(exc), gen, valid=True)
        return

    dep: dict[str, Any] = w.deployment
    for manifest_ in w.in_apply_order():
        if manifest_ is w.deployment:
            dep = await rt.kube.apply_returning(manifest_)
        else:
            await rt.kube.apply(manifest_)
    n = b.names(lsv)
    if w.pdb is None:
        await rt.kube.delete("PodDisruptionBudget", namespace, n["deployment"])
    if w.hpa is None:
        await rt.kube.delete("HorizontalPodAutoscaler", namespace, n["deployment"])
    kept = {cm["metadata"]["name"] for cm in w.config_maps}
    for cm in (n["chat"], n["modelfiles"]):
        if cm not in kept:
            await rt.kube.delete("ConfigMap", namespace, cm)

    served = ", ".join(f"{a.name}={a.uri}" for a in adapters) or "the base model only"
    new_adapters = [a.status() for a in adapters]
    if status.get("phase") not in ("Deploying", "Ready", "Degraded"):
        await rt.kube.event(body, "Normal", reason="Deploying", message=f"deploying {served}")
    elif (status.get("adapters") or []) != new_adapters:
        await rt.kube.event(body, "Normal", reason="RollingOut", message=f"rolling out adapters: {served}")

    conditions = st.set_condition(conditions, st.ADAPTERS_READY, True, "Resolved", served, gen)
    conditions = st.clear_condition(conditions, st.FAILED, "Deployed", gen)
    await _status(rt, body, {
        **_rollout_status(body, dep, conditions, gen),
        "adapters": new_adapters or None,
        "adapterNames": ",".join(a.name for a in adapters) or None,
        **common,
    })


def _rollout_status(body: dict[str, Any], dep: dict[str, Any], conditions: list[dict[str, Any]],
                    gen: int | None) -> dict[str, Any]:
    r = b.rollout_phase(dep, (body.get("status") or {}).get("phase"))
    conditions = st.set_condition(conditions, st.AVAILABLE, r.phase == "Ready" or r.available >= max(r.desired, 1),
                                  "ReplicasAvailable" if r.available else "NoReplicasAvailable",
                                  f"{r.available} replica(s) available", gen)
    conditions = st.set_condition(conditions, st.PROGRESSING, r.phase == "Deploying", r.phase, r.message, gen)
    return {"phase": r.phase, "conditions": conditions, "replicas": r.replicas, "readyReplicas": r.ready,
            "updatedReplicas": r.updated}


async def refresh(namespace: str, name: str, dep: dict[str, Any]) -> None:
    """The Deployment moved: replicas, ready replicas and the phase follow it (nothing is applied)."""
    async with _locks[(namespace, name)]:
        rt = runtime()
        body = await rt.kube.get_serve(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        status = body.get("status") or {}
        if status.get("phase") not in ("Deploying", "Ready", "Degraded"):
            return  # waiting or failed: the reconcile owns the phase
        gen = body["metadata"].get("generation")
        new = _rollout_status(body, dep, list(status.get("conditions") or []), gen)
        if all(status.get(k) == v for k, v in new.items()):
            return  # nothing moved (an unchanged condition keeps its lastTransitionTime): no write
        if new["phase"] != status.get("phase"):
            type_ = "Warning" if new["phase"] == "Degraded" else "Normal"
            progressing = st.condition(new["conditions"], st.PROGRESSING) or {}
            await rt.kube.event(body, type_, reason=new["phase"], message=progressing.get("message", ""))
        await rt.kube.patch_status(PLURAL, namespace, name, new)


# ---------------------------------------------------------------- triggers


# A failed reconcile (an API error, a refused write) is retried after 10 s, not kopf's default 60 s.
@kopf.on.create(GROUP, VERSION, PLURAL, when=in_scope, backoff=10)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", when=in_scope, backoff=10)
@kopf.on.resume(GROUP, VERSION, PLURAL, when=in_scope, backoff=10)
@metrics.count_errors("serve")
async def serve_changed(namespace: str, name: str, **_: Any) -> None:
    await reconcile(namespace, name)


@kopf.on.event(GROUP, VERSION, "llamafinetunes", when=in_scope)
async def run_changed(type: str | None, namespace: str, name: str, body: kopf.Body,  # noqa: A002
                      serves_by_run: kopf.Index, **_: Any) -> None:
    """A referenced run finished, was re-trained, or went away: re-reconcile the serves that use it."""
    key = (namespace, name)
    serves = serves_by_run.get(key)
    if not serves:
        # Not remembered while unused: a LlamaServe that starts using it reads it afresh, and a
        # stale entry could hide its next change.
        _seen_runs.pop(key, None)
        return
    if type == "DELETED":
        _seen_runs.pop(key, None)
    else:
        # type None (a listing) is compared too, not skipped: kopf lists again after every watch
        # restart (410 Gone), with no resume after it, and a change made meanwhile arrives only so.
        status = body.get("status") or {}
        seen = (status.get("phase"), status.get("adapter"), status.get("completionTime"))
        if _seen_runs.get(key) == seen:
            return
        _seen_runs[key] = seen
    for serve in sorted(set(serves)):
        try:
            await reconcile(namespace, serve)
        except Exception:  # noqa: BLE001 - event handlers are not retried; the next event or resume catches up
            log.exception("reconciling LlamaServe %s/%s after LlamaFineTune %s changed", namespace, serve, name)
            _seen_runs.pop(key, None)


@kopf.on.event("apps", "v1", "deployments",
               labels={"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_COMPONENT: b.COMPONENT})
async def deployment_event(type: str, body: kopf.Body, namespace: str, **_: Any) -> None:  # noqa: A002
    owner = controller_of(body, KIND)
    if owner is None or not runtime().in_scope(namespace):
        return
    if type == "DELETED":
        # Someone deleted it (our owner's deletion would have removed the owner first): put it back.
        await reconcile(namespace, owner)
        return
    await refresh(namespace, owner, dict(body))
