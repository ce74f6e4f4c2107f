"""GitOps and observability against a real API server.

- A LlamaFineTune applied server-side by field manager `argocd-controller` (as Argo CD does with
  ServerSideApply=true), with labels and annotations, is driven to Succeeded by the operator; then
  managedFields show the operator owns nothing but status (kopf would also own
  metadata.finalizers if a deletion handler asked for one: acceptable, and checked to be the only
  exception), the labels and annotations are as applied, and re-applying the same manifest is a
  no-op (no conflict, no diff): Argo CD sees the run Synced.
- The operator's /metrics, scraped while runs queue, train, finish and go away.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cases import example
from operator_fixtures import (
    Cluster,
    OperatorProcess,
    crd_namespace,
    free_port,
    gpu_pods_gone,
    running_operator,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.cluster
GITOPS_MANAGER = "argocd-controller"
# Managers a GitOps tool may legitimately show besides its own (kubectl's client-side apply, if used).
GITOPS_MANAGERS = {GITOPS_MANAGER, "kubectl-client-side-apply"}
LABELS = {"app.kubernetes.io/instance": "team-a-fine-tunes", "team": "a"}


@pytest.fixture(scope="module")
def ns(kubectl) -> Iterator[str]:
    with crd_namespace(kubectl, "gitops") as name:
        yield name


@pytest.fixture(scope="module")
def operator(ns: str, kubeconfig: Path, kubectl, tmp_path_factory) -> Iterator[OperatorProcess]:
    gpu_pods_gone(kubectl)
    with running_operator(kubeconfig, tmp_path_factory.mktemp("operator"), ns,
                          LLAMAOPS_METRICS_PORT=str(free_port())) as proc:
        yield proc


@pytest.fixture
def c(operator: OperatorProcess, ns: str, kubectl, tmp_path_factory, request) -> Iterator[Cluster]:
    cluster = Cluster(kubectl, ns, tmp_path_factory.mktemp("volumes"))
    if not cluster.get("pvc", "adapters"):
        cluster.volumes("training-data", "adapters")
    yield cluster
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"--- operator log ---\n{operator.tail(150)}")


def gitops_manifest(name: str) -> dict[str, Any]:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"] = {
        "name": name, "labels": dict(LABELS),
        "annotations": {"argocd.argoproj.io/tracking-id": f"team-a-fine-tunes:llamaops.io/LlamaFineTune:x/{name}",
                        "example.com/owner": "ml-platform"},
    }
    doc["spec"]["resources"].update(gpusPerNode=1, nodes=1)
    doc["spec"].pop("hfTokenSecretRef", None)
    return doc


def server_side_apply(kubectl, ns: str, doc: dict[str, Any], *extra: str) -> subprocess.CompletedProcess:
    return kubectl("apply", "--server-side", f"--field-manager={GITOPS_MANAGER}", "-n", ns, "-f", "-", *extra,
                   input=yaml.safe_dump(doc), check=False)


def test_operator_never_writes_what_gitops_applied(c: Cluster, kubectl, ns: str) -> None:
    doc = gitops_manifest("gitops-run")
    proc = server_side_apply(kubectl, ns, doc)
    assert proc.returncode == 0, proc.stderr
    c.wait_phase("gitops-run", "Running")
    c.finish_pods("gitops-run")
    c.wait_phase("gitops-run", "Succeeded")

    obj = json.loads(kubectl("get", "lft", "gitops-run", "-n", ns, "-o", "json", "--show-managed-fields").stdout)
    meta = obj["metadata"]
    assert meta["generation"] == 1, "someone wrote the spec"
    assert meta["labels"] == doc["metadata"]["labels"]
    assert meta["annotations"] == doc["metadata"]["annotations"]
    owners: dict[str, list[dict[str, Any]]] = {}
    for entry in meta["managedFields"]:
        owners.setdefault(entry["manager"], []).append(entry)
    print("managedFields:", {m: [(e["operation"], e.get("subresource"), sorted(e.get("fieldsV1") or {}))
                                 for e in entries] for m, entries in owners.items()})
    assert GITOPS_MANAGER in owners
    others = [e for m, entries in owners.items() if m not in GITOPS_MANAGERS for e in entries]
    assert others, "the operator's status writes should show up as a manager"
    for entry in others:
        fields = entry.get("fieldsV1") or {}
        assert set(fields) <= {"f:status", "f:metadata"}, (entry["manager"], sorted(fields))
        assert "f:spec" not in fields, entry["manager"]
        # kopf may own metadata.finalizers (a deletion handler's finalizer); never labels or annotations.
        assert set(fields.get("f:metadata", {})) <= {"f:finalizers"}, (entry["manager"], fields["f:metadata"])
        if "f:status" in fields:
            assert entry.get("subresource") == "status", entry
    status_owners = {e["manager"] for e in others if "f:status" in (e.get("fieldsV1") or {})}
    # Our own client writes as "llamaops" (kube.FIELD_MANAGER), kopf's bookkeeping as "kopf".
    assert "llamaops" in status_owners, status_owners

    # Argo CD's next sync: the same manifest applies with no conflict and changes nothing.
    version = meta["resourceVersion"]
    again = server_side_apply(kubectl, ns, doc)
    assert again.returncode == 0 and "conflict" not in again.stderr.lower(), again.stderr
    after = json.loads(kubectl("get", "lft", "gitops-run", "-n", ns, "-o", "json").stdout)
    assert after["metadata"]["resourceVersion"] == version
    diff = kubectl("diff", "--server-side", f"--field-manager={GITOPS_MANAGER}", "-n", ns, "-f", "-",
                   input=yaml.safe_dump(doc), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr

    # The children carry none of the GitOps tool's labels or annotations (it would prune them as its own).
    job = c.job("gitops-run")
    assert job is not None
    for child in [job, *(c.get("configmaps", selector="llamaops.io/finetune=gitops-run") or {}).get("items", [])]:
        labels = child["metadata"].get("labels") or {}
        annotations = child["metadata"].get("annotations") or {}
        assert labels.get("app.kubernetes.io/instance") != LABELS["app.kubernetes.io/instance"], child["metadata"]
        assert "team" not in labels and "argocd.argoproj.io/tracking-id" not in annotations, child["metadata"]


def scrape(operator: OperatorProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = operator.env["LLAMAOPS_METRICS_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_follow_the_queue_and_the_runs(c: Cluster, operator: OperatorProcess, kubectl, ns: str) -> None:
    before = scrape(operator)
    admissions = ("llamaops_admissions_total", (("queue_mode", "builtin"),))
    succeeded = ("llamaops_run_duration_seconds_count", (("outcome", "Succeeded"),))
    c.run("metered", gpus=1)
    c.wait_phase("metered", "Running")
    # What the trainer's rank 0 reports as it trains.
    kubectl("patch", "-n", ns, "lft", "metered", "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"progress": {"step": 10, "totalSteps": 40, "loss": 2.5, "display": "10/40"}}}))
    c.run("too-wide", gpus=8, nodes=3)  # more 8-GPU nodes than the cluster has: it waits
    c.wait_phase("too-wide", "Queued")

    run = (("name", "metered"), ("namespace", ns))
    s = wait_until(lambda: (m := scrape(operator)).get(("llamaops_finetune_loss", run)) == 2.5 and m,
                   "the loss gauge of the metered run")
    assert s[("llamaops_queue_length", ())] == 1
    assert s[("llamaops_queue_gpus_requested", ())] == 24
    assert s[("llamaops_finetunes", (("phase", "Queued"),))] == 1
    assert s[("llamaops_finetunes", (("phase", "Running"),))] == 1
    assert s[("llamaops_finetune_progress_ratio", run)] == 0.25
    assert s[admissions] == before.get(admissions, 0) + 1
    assert s[("llamaops_queue_wait_seconds_count", ())] >= 1

    c.finish_pods("metered")
    c.wait_phase("metered", "Succeeded")
    s = wait_until(lambda: (m := scrape(operator)).get(succeeded, 0) > before.get(succeeded, 0) and m,
                   "a run duration observed")
    assert s[("llamaops_finetunes", (("phase", "Succeeded"),))] >= 1
    assert s.get(("llamaops_reconcile_errors_total", (("handler", "reconcile"),)), 0) == 0

    kubectl("delete", "lft", "metered", "too-wide", "-n", ns, "--wait=true", "--timeout=60s")
    s = wait_until(lambda: (m := scrape(operator)).get(("llamaops_queue_length", ())) == 0 and m,
                   "the deleted runs to leave the metrics")
    assert ("llamaops_finetune_loss", run) not in s and ("llamaops_finetune_step", run) not in s
    assert s[("llamaops_queue_gpus_requested", ())] == 0
