"""Every malformed spec is rejected offline, at the right layer, naming its field."""

from __future__ import annotations

import pytest
from api_cases import CASES, Case, example
from llamaops.builders.serve import validate_manifest


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_malformed_spec_is_rejected_naming_the_field(case: Case) -> None:
    result = validate_manifest(case.manifest())
    assert not result.ok, f"{case.id} was accepted"
    named = [p for p in result.errors if case.field in p.field]
    assert named, f"no error names {case.field}: {[str(p) for p in result.errors]}"
    if case.words:
        assert any(case.words in p.message for p in named), [str(p) for p in named]
    if case.layer == "schema":
        assert result.obj is None, "a schema error must stop parsing"
    else:
        assert result.obj is not None, f"{case.id} should pass the schema: {[str(p) for p in result.errors]}"


def test_table_covers_every_layer() -> None:
    layers = [c.layer for c in CASES]
    assert len(CASES) >= 25
    assert {"schema", "cel", "semantic"} <= set(layers)
    assert len({c.id for c in CASES}) == len(CASES)


def test_all_problems_reported_at_once() -> None:
    manifest = Case("x", "llama-3.1-8b-lora.yaml", (
        ("spec.lora.r", 0), ("spec.training.optim", "adam"), ("spec.resources.nodes", 0)), "schema", "").manifest()
    fields = {p.field for p in validate_manifest(manifest).errors}
    assert {"spec.lora.r", "spec.training.optim", "spec.resources.nodes"} <= fields


def test_unknown_catalog_model_is_a_warning_not_an_error() -> None:
    manifest = Case("x", "llama-3.1-8b-lora.yaml", (("spec.model.base_model", "Qwen/Qwen2.5-7B-Instruct"),),
                    "semantic", "").manifest()
    result = validate_manifest(manifest)
    assert result.ok
    assert [p.field for p in result.warnings] == ["spec.model.base_model"]


def test_serve_refuses_adapter_trained_on_another_base() -> None:
    from api_cases import example
    from llamaops.api.finetune import LlamaFineTune
    from llamaops.builders.serve import validate_serve

    ft = LlamaFineTune.model_validate(example("llama-3.3-70b-qlora.yaml"))
    serve = example("llama-3.1-8b-serve.yaml")
    serve["spec"]["adapters"] = [{"name": "big", "fineTuneRef": ft.metadata.name}]
    result = validate_serve(serve, finetunes={ft.metadata.name: ft})
    assert [p.field for p in result.errors] == ["spec.adapters[0].fineTuneRef"]
    assert "Llama-3.3-70B-Instruct" in result.errors[0].message


def test_max_lora_rank_must_cover_adapters() -> None:
    from api_cases import example
    from llamaops.api.finetune import LlamaFineTune
    from llamaops.builders.serve import validate_serve

    ft = LlamaFineTune.model_validate(example("llama-3.1-8b-lora.yaml"))  # r = 32
    serve = example("llama-3.1-8b-serve.yaml")
    serve["spec"]["vllm"]["max_lora_rank"] = 16
    result = validate_serve(serve, finetunes={ft.metadata.name: ft})
    assert [p.field for p in result.errors] == ["spec.vllm.max_lora_rank"]
    assert "32, 64" in result.errors[0].message


def test_a_refused_url_is_echoed_without_its_credentials() -> None:
    doc = example("llama-3.1-8b-lora.yaml")
    doc["spec"]["dataset"] = {"http": {"url": "ftp://alice:hunter2@data.example/chat.jsonl?token=XYZ"}}
    (problem,) = validate_manifest(doc).errors
    assert problem.field == "spec.dataset.http.url" and "ftp://***@data.example/chat.jsonl?***" in problem.message
    assert "hunter2" not in problem.message and "XYZ" not in problem.message
