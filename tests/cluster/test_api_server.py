"""The generated CRDs on a real API server: examples, malformed specs, printer columns, immutability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from api_cases import CASES, EXAMPLES, Case, example
from llamaops.api import LlamaFineTune, LlamaServe
from llamaops.api.manifests import load_file

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
MODELS = {"LlamaFineTune": LlamaFineTune, "LlamaServe": LlamaServe}


@pytest.fixture(scope="session")
def crds(kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            "crd/llamafinetunes.llamaops.io", "crd/llamaserves.llamaops.io")


def _apply(kubectl, namespace: str, doc: dict, check: bool = True):
    return kubectl("apply", "--server-side", "--field-manager=test", "-n", namespace, "-f", "-",
                   input=yaml.safe_dump(doc), check=check)


def _get(kubectl, namespace: str, kind: str, name: str) -> dict:
    return json.loads(kubectl("get", "-n", namespace, kind.lower(), name, "-o", "json").stdout)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_applies_and_round_trips(crds, kubectl, namespace: str, path: Path) -> None:
    for doc in load_file(path):
        _apply(kubectl, namespace, doc)
        stored = _get(kubectl, namespace, doc["kind"], doc["metadata"]["name"])
        model = MODELS[doc["kind"]]
        # The server filled every default the CRD declares; they must be the models' defaults.
        assert model.model_validate({**stored, "metadata": {}}).spec == model.model_validate(doc).spec
        # Every field the user wrote is stored as written.
        for section, value in doc["spec"].items():
            if isinstance(value, dict):
                assert {k: stored["spec"][section][k] for k in value} == value, section
            else:
                assert stored["spec"][section] == value, section


SERVER_CASES = [c for c in CASES if c.layer in ("schema", "cel")]


@pytest.mark.parametrize("case", SERVER_CASES, ids=lambda c: c.id)
def test_api_server_rejects_malformed_spec_naming_the_field(crds, kubectl, namespace: str, case: Case) -> None:
    result = _apply(kubectl, namespace, case.manifest(), check=False)
    assert result.returncode != 0, f"{case.id} was stored"
    # The server names fields as spec.a.b, spec.list[0].c, or with a leading dot for unknown fields.
    assert case.field in result.stderr.replace(".spec.", "spec."), result.stderr


@pytest.mark.parametrize("case", [c for c in CASES if c.layer == "semantic"], ids=lambda c: c.id)
def test_semantic_cases_pass_the_schema(crds, kubectl, namespace: str, case: Case) -> None:
    """These need the catalog or the memory planner: the server stores them and the operator rejects them."""
    result = _apply(kubectl, namespace, case.manifest(), check=False)
    assert result.returncode == 0, result.stderr


def test_base_model_and_output_are_immutable(crds, kubectl, namespace: str) -> None:
    doc = example("llama-3.1-8b-lora.yaml")
    _apply(kubectl, namespace, doc)
    changed = example("llama-3.1-8b-lora.yaml")
    changed["spec"]["model"]["base_model"] = "meta-llama/Llama-3.2-3B-Instruct"
    result = _apply(kubectl, namespace, changed, check=False)
    assert result.returncode != 0 and "model.base_model is immutable" in result.stderr, result.stderr
    moved = example("llama-3.1-8b-lora.yaml")
    moved["spec"]["output"]["pvc"]["claimName"] = "elsewhere"
    result = _apply(kubectl, namespace, moved, check=False)
    assert result.returncode != 0 and "output is immutable" in result.stderr, result.stderr
    # Other fields stay editable (GitOps edits are applied, not refused).
    edited = example("llama-3.1-8b-lora.yaml")
    edited["spec"]["training"]["learning_rate"] = 3e-5
    _apply(kubectl, namespace, edited)
    assert _get(kubectl, namespace, "LlamaFineTune", doc["metadata"]["name"])["spec"]["training"][
        "learning_rate"] == 3e-5


def test_status_is_a_subresource(crds, kubectl, namespace: str) -> None:
    doc = example("tiny-llama-cpu.yaml")
    _apply(kubectl, namespace, doc)
    name = doc["metadata"]["name"]
    # A status written through the main resource is dropped ...
    kubectl("patch", "-n", namespace, "lft", name, "--type=merge", "-p", '{"status": {"phase": "Running"}}')
    assert "status" not in _get(kubectl, namespace, "LlamaFineTune", name) or \
        _get(kubectl, namespace, "LlamaFineTune", name)["status"].get("phase") is None
    # ... and kept through the status subresource, validated against the status schema.
    kubectl("patch", "-n", namespace, "lft", name, "--subresource=status", "--type=merge",
            "-p", '{"status": {"phase": "Running"}}')
    assert _get(kubectl, namespace, "LlamaFineTune", name)["status"]["phase"] == "Running"
    bad = kubectl("patch", "-n", namespace, "lft", name, "--subresource=status", "--type=merge",
                  "-p", '{"status": {"phase": "Exploded"}}', check=False)
    assert bad.returncode != 0 and "status.phase" in bad.stderr


def test_printer_columns(crds, kubectl, namespace: str) -> None:
    ft, sv = example("llama-3.1-8b-lora.yaml"), example("llama-3.1-8b-serve.yaml")
    _apply(kubectl, namespace, ft)
    _apply(kubectl, namespace, sv)
    kubectl("patch", "-n", namespace, "lft", ft["metadata"]["name"], "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Running", "queuePosition": 3,
                                   "progress": {"step": 120, "totalSteps": 400, "display": "120/400", "loss": 1.234,
                                                "stepSeconds": 42.5}}}))
    kubectl("patch", "-n", namespace, "lsv", sv["metadata"]["name"], "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Ready", "readyReplicas": 1, "adapterNames": "k8s-assistant",
                                   "endpoint": "http://llama31-8b.ns.svc:8000/v1"}}))
    out = kubectl("get", "-n", namespace, "lft,lsv").stdout
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0] == ["NAME", "PHASE", "QUEUE", "PROGRESS", "LOSS", "AGE"], out
    assert lines[1][:5] == ["llamafinetune.llamaops.io/llama31-8b-lora", "Running", "3", "120/400", "1.234"], out
    header = next(i for i, line in enumerate(lines) if line[0] == "NAME" and i > 0)
    assert lines[header] == ["NAME", "PHASE", "READY", "ADAPTERS", "ENDPOINT", "AGE"], out
    assert lines[header + 1][:5] == ["llamaserve.llamaops.io/llama31-8b", "Ready", "1", "k8s-assistant",
                                     "http://llama31-8b.ns.svc:8000/v1"], out
    wide = [line.split() for line in kubectl("get", "-n", namespace, "lft", "-o", "wide").stdout.splitlines()]
    assert wide[0] == ["NAME", "PHASE", "QUEUE", "PROGRESS", "LOSS", "STEP-SECONDS", "MODEL", "NODES", "GPUS/NODE",
                       "ADAPTER", "AGE"]
    assert wide[1][5] == "42.5"  # the slowest step, which sizes the pods' grace period
    # The category and short names work too.
    assert "llama31-8b-lora" in kubectl("get", "-n", namespace, "llamaops", "-o", "name").stdout
