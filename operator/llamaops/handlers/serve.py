"""LlamaServe: adapters resolved from their runs, the serving Deployment kept to the spec, status from the rollout.

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

import logging
from typing import Any

import kopf
from pydantic import ValidationError

from llamaops import metrics
from llamaops import status as st
from llamaops.api import LlamaServe
from llamaops.api.constants import (
    FINETUNES,
    GROUP,
    KIND_SERVE,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    SERVES,
    VERSION,
)
from llamaops.api.finetune import LlamaFineTune
from llamaops.builders import serve as b
from llamaops.builders.naming import controller_of
from llamaops.handlers.runtime import Runtime, in_scope, runtime
from llamaops.handlers.workload import manifest
from llamaops.kube import NotOwned
from llamaops.state.serve import resolve, rollout_phase

log = logging.getLogger(__name__)


def _refs(spec: dict[str, Any]) -> list[str]:
    return sorted({a["fineTuneRef"] for a in spec.get("adapters") or [] if a.get("fineTuneRef")})


@kopf.index(GROUP, VERSION, SERVES)
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


# ---------------------------------------------------------------- reconcile


async def _status(rt: Runtime, body: dict[str, Any], new: dict[str, Any]) -> None:
    meta = body["metadata"]
    await rt.kube.patch_status(SERVES, meta["namespace"], meta["name"], new)


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


async def reconcile(rt: Runtime, namespace: str, name: str) -> None:
    async with rt.lock(KIND_SERVE, namespace, name):
        await _reconcile(rt, namespace, name)


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
    result = b.validate_serve(manifest(body), finetunes={k: v for k, v in runs.items() if v is not None},
                              warn_missing=False)
    if not result.ok:
        await _fail(rt, body, conditions, "InvalidSpec", "; ".join(str(p) for p in result.errors), gen, valid=False)
        return
    lsv = result.obj
    assert isinstance(lsv, LlamaServe)
    refused = rt.settings.spec_policy().serve(lsv)  # what the platform does not allow (an image, a priority class)
    if refused:
        await _fail(rt, body, conditions, "PolicyViolation", "; ".join(str(p) for p in refused), gen, valid=False)
        return
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
    try:
        for manifest_ in w.in_apply_order():
            applied = await rt.kube.apply(manifest_)
            if manifest_ is w.deployment:
                dep = applied  # with its status: no extra read
    except NotOwned as exc:
        await _fail(rt, body, st.set_condition(conditions, st.CONFLICT, True, "NotOwned", str(exc), gen),
                    "Conflict", str(exc), gen, valid=True)
        return
    conditions = st.clear_condition(conditions, st.CONFLICT, "Resolved", gen)
    # What the spec no longer asks for goes, if it is this serve's: an object of that name it does not
    # control is left alone.
    n, uid = b.names(lsv), meta.get("uid")
    if w.pdb is None:
        await rt.kube.delete_owned("PodDisruptionBudget", namespace, n["deployment"], uid)
    if w.hpa is None:
        await rt.kube.delete_owned("HorizontalPodAutoscaler", namespace, n["deployment"], uid)
    kept = {cm["metadata"]["name"] for cm in w.config_maps}
    for cm in b.config_map_names(lsv):  # every runtime's: a runtime switch leaves the other's behind
        if cm not in kept:
            await rt.kube.delete_owned("ConfigMap", namespace, cm, uid)

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
    r = rollout_phase(dep, (body.get("status") or {}).get("phase"))
    conditions = st.set_condition(conditions, st.AVAILABLE, r.phase == "Ready" or r.available >= max(r.desired, 1),
                                  "ReplicasAvailable" if r.available else "NoReplicasAvailable",
                                  f"{r.available} replica(s) available", gen)
    conditions = st.set_condition(conditions, st.PROGRESSING, r.phase == "Deploying", r.phase, r.message, gen)
    return {"phase": r.phase, "conditions": conditions, "replicas": r.replicas, "readyReplicas": r.ready,
            "updatedReplicas": r.updated}


async def refresh(rt: Runtime, namespace: str, name: str, dep: dict[str, Any]) -> None:
    """The Deployment moved: replicas, ready replicas and the phase follow it (nothing is applied)."""
    async with rt.lock(KIND_SERVE, namespace, name):
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
        await rt.kube.patch_status(SERVES, namespace, name, new)


# ---------------------------------------------------------------- triggers


# A failed reconcile (an API error, a refused write) is retried after 10 s, not kopf's default 60 s.
@kopf.on.create(GROUP, VERSION, SERVES, when=in_scope, backoff=10)
@kopf.on.update(GROUP, VERSION, SERVES, field="spec", when=in_scope, backoff=10)
@kopf.on.resume(GROUP, VERSION, SERVES, when=in_scope, backoff=10)
@metrics.count_errors("serve")
async def serve_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await reconcile(runtime(memo), namespace, name)


@kopf.on.event(GROUP, VERSION, FINETUNES, when=in_scope)
async def run_changed(type: str | None, namespace: str, name: str, body: kopf.Body,  # noqa: A002
                      serves_by_run: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    """A referenced run finished, was re-trained, or went away: re-reconcile the serves that use it."""
    rt = runtime(memo)
    seen_runs = rt.seen_runs
    key = (namespace, name)
    serves = serves_by_run.get(key)
    if not serves:
        # Not remembered while unused: a LlamaServe that starts using it reads it afresh, and a
        # stale entry could hide its next change.
        seen_runs.pop(key, None)
        return
    if type == "DELETED":
        seen_runs.pop(key, None)
    else:
        # type None (a listing) is compared too, not skipped: kopf lists again after every watch
        # restart (410 Gone), with no resume after it, and a change made meanwhile arrives only so.
        status = body.get("status") or {}
        seen = (status.get("phase"), status.get("adapter"), status.get("completionTime"))
        if seen_runs.get(key) == seen:
            return
        seen_runs[key] = seen
    for serve in sorted(set(serves)):
        try:
            await reconcile(rt, namespace, serve)
        except Exception:  # noqa: BLE001 - event handlers are not retried; the next event or resume catches up
            log.exception("reconciling LlamaServe %s/%s after LlamaFineTune %s changed", namespace, serve, name)
            seen_runs.pop(key, None)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: b.COMPONENT})
async def deployment_event(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,  # noqa: A002
                           **_: Any) -> None:
    rt = runtime(memo)
    owner = controller_of(body, KIND_SERVE)
    if owner is None or not rt.in_scope(namespace):
        return
    if type == "DELETED":
        # Someone deleted it (our owner's deletion would have removed the owner first): put it back.
        await reconcile(rt, namespace, owner)
        return
    await refresh(rt, namespace, owner, dict(body))
