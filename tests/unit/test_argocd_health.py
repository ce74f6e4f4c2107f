"""The Argo CD health checks (deploy/argocd/health/*.lua), run with lupa against sample objects.

Argo CD's contract (operator-manual/health): the script sees the resource as the global `obj`
(JSON null fields absent), and returns a table with `status` (Healthy, Progressing, Degraded,
Suspended, Missing, Unknown) and an optional `message`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa")

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "deploy" / "argocd"
FINETUNE = ARGOCD / "health" / "llamaops.io_LlamaFineTune.lua"
SERVE = ARGOCD / "health" / "llamaops.io_LlamaServe.lua"
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def _lua_value(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        t = lua.table()
        for k, v in value.items():
            if v is not None:  # Argo CD hands Lua no nulls: the key is absent
                t[k] = _lua_value(lua, v)
        return t
    if isinstance(value, list):
        t = lua.table()
        for i, v in enumerate(value, start=1):
            t[i] = _lua_value(lua, v)
        return t
    return value


def health(script: Path, obj: dict[str, Any]) -> tuple[str, str]:
    """Run a health script as Argo CD does: a fresh state, `obj` global, the chunk's return value."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _lua_value(lua, obj)
    hs = lua.execute(script.read_text())
    assert hs is not None, "the script returned nothing"
    status, message = hs["status"], hs["message"]
    assert status in STATUSES
    assert isinstance(message, str) and message
    return status, message


def lft(phase: str | None = None, *, suspend: bool = False, generation: int = 1, observed: int | None = 1,
        **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaFineTune",
                           "metadata": {"name": "run", "namespace": "team", "generation": generation},
                           "spec": {"model": {"base_model": "meta-llama/Llama-3.1-8B-Instruct"}, "suspend": suspend}}
    if phase is not None or status:
        obj["status"] = {"phase": phase, "observedGeneration": observed, **status}
    return obj


def cond(type_: str, message: str, status: str = "True") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": type_, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize("obj, expected, words", [
    (lft(), "Progressing", "waiting for the operator"),
    (lft(None, observed=None, conditions=[]), "Progressing", "waiting for the operator"),
    (lft("Pending"), "Progressing", "validating"),
    (lft("Queued", queuePosition=3, conditions=[cond("Queued", "position 3: waiting for 8 GPUs")]),
     "Progressing", "position 3"),
    (lft("Queued"), "Progressing", "waiting for GPUs"),
    (lft("Admitted", conditions=[cond("Admitted", "admitted onto gpu-node-0")]), "Progressing", "gpu-node-0"),
    (lft("Running", progress={"step": 50, "totalSteps": 200, "display": "50/200", "loss": 1.23456}),
     "Progressing", "50/200, loss 1.235"),
    (lft("Running"), "Progressing", "training"),
    (lft("Succeeded", adapter={"uri": "pvc://adapters/run", "baseModel": "m", "r": 16}), "Healthy",
     "pvc://adapters/run"),
    (lft("Succeeded"), "Healthy", "succeeded"),
    (lft("Failed", conditions=[cond("Failed", "exit code 65: bad data line 3")]), "Degraded", "exit code 65"),
    (lft("Failed"), "Degraded", "failed"),
    (lft("Suspended"), "Suspended", "suspend"),
    (lft("Running", suspend=True), "Suspended", "suspend"),  # spec.suspend wins before the operator acts
    (lft(None, suspend=True), "Suspended", "suspend"),
    (lft("Succeeded", generation=3, observed=2), "Progressing", "latest spec"),  # an edit not yet handled
    (lft("Weird"), "Unknown", "Weird"),
])
def test_finetune_health(obj: dict[str, Any], expected: str, words: str) -> None:
    status, message = health(FINETUNE, obj)
    assert (status, words in message) == (expected, True), message


def lsv(phase: str | None = None, *, generation: int = 1, observed: int | None = 1, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe",
                           "metadata": {"name": "chat", "namespace": "team", "generation": generation},
                           "spec": {"model": {"base_model": "meta-llama/Llama-3.1-8B-Instruct"}}}
    if phase is not None or status:
        obj["status"] = {"phase": phase, "observedGeneration": observed, **status}
    return obj


@pytest.mark.parametrize("obj, expected, words", [
    (lsv(), "Progressing", "waiting for the operator"),
    (lsv("WaitingForAdapters", conditions=[cond("AdaptersReady", "LlamaFineTune/run is Running", "False")]),
     "Progressing", "LlamaFineTune/run is Running"),
    (lsv("WaitingForAdapters"), "Progressing", "waiting for the adapters"),
    (lsv("Deploying", replicas=2, readyReplicas=1), "Progressing", "1/2 replicas ready"),
    (lsv("Pending"), "Progressing", "0/0"),
    (lsv("Ready", replicas=2, readyReplicas=2, endpoint="http://chat.team.svc:8000/v1"), "Healthy",
     "2/2 replicas ready at http://chat.team.svc:8000/v1"),
    (lsv("Degraded", replicas=2, readyReplicas=1), "Degraded", "1/2"),
    (lsv("Failed", conditions=[cond("Ready", "adapter rank 512 exceeds --max-lora-rank", "False")]), "Degraded",
     "max-lora-rank"),
    (lsv("Ready", generation=2, observed=1), "Progressing", "latest spec"),
    (lsv("Strange"), "Unknown", "Strange"),
])
def test_serve_health(obj: dict[str, Any], expected: str, words: str) -> None:
    status, message = health(SERVE, obj)
    assert (status, words in message) == (expected, True), message


def test_the_phases_the_api_defines_are_all_covered() -> None:
    """Every phase of the models maps to a deliberate status (never the Unknown fallback)."""
    from typing import get_args

    from llamaops.api.finetune import FineTunePhase
    from llamaops.api.serve import ServePhase

    for phase in get_args(FineTunePhase):
        assert health(FINETUNE, lft(phase))[0] != "Unknown", phase
    for phase in get_args(ServePhase):
        assert health(SERVE, lsv(phase))[0] != "Unknown", phase


def test_argocd_cm_snippet_embeds_the_scripts_verbatim() -> None:
    cm = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    data = cm["data"]
    assert data["resource.customizations.health.llamaops.io_LlamaFineTune"] == FINETUNE.read_text()
    assert data["resource.customizations.health.llamaops.io_LlamaServe"] == SERVE.read_text()
    ignored = yaml.safe_load(data["resource.customizations.ignoreResourceUpdates.llamaops.io_LlamaFineTune"])
    assert "/status/progress" in ignored["jsonPointers"]
    assert "/status/phase" not in ignored["jsonPointers"] and "/spec" not in ignored["jsonPointers"]


def test_example_applications_are_well_formed() -> None:
    apps = {p.name: yaml.safe_load(p.read_text()) for p in (ARGOCD / "applications").glob("*.yaml")}
    assert set(apps) >= {"llamaops-operator.yaml", "team-fine-tunes.yaml"}
    for app in apps.values():
        assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
        assert not any(o.startswith("Replace=") for o in app["spec"]["syncPolicy"]["syncOptions"])
    assert apps["llamaops-operator.yaml"]["spec"]["source"]["path"] == "charts/llamaops"
    assert (REPO / apps["llamaops-operator.yaml"]["spec"]["source"]["path"] / "Chart.yaml").is_file()


def test_crds_are_never_pruned_nor_uninstalled() -> None:
    for path in sorted((REPO / "charts" / "llamaops" / "crds").glob("*.yaml")):
        annotations = yaml.safe_load(path.read_text())["metadata"]["annotations"]
        assert "Prune=false" in annotations["argocd.argoproj.io/sync-options"].split(","), path.name
        assert annotations["helm.sh/resource-policy"] == "keep", path.name
