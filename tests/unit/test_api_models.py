"""The API models: examples round-trip, the seed's recipes paste in unchanged, the CRDs do not drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from api_cases import EXAMPLES
from llamaops.api import LlamaFineTune, LlamaServe
from llamaops.api.manifests import load_all, load_file
from llamaops.api.schema import openapi_schema
from llamaops.builders.serve import validate_manifest
from llamaops.tools import crdgen

REPO = Path(__file__).resolve().parents[2]
SEED = REPO.parent / "shared" / "seed" / "llama-models.md"
MODELS = {"LlamaFineTune": LlamaFineTune, "LlamaServe": LlamaServe}
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_round_trips_unchanged(path: Path) -> None:
    for doc in load_file(path):
        obj = MODELS[doc["kind"]].model_validate(doc)
        assert obj.model_dump(mode="json", exclude_unset=True) == doc


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    for doc in load_file(path):
        result = validate_manifest(doc)
        assert result.ok, [str(p) for p in result.errors]


def test_examples_cover_the_seed_and_a_cpu_run() -> None:
    names = {p.name for p in EXAMPLE_FILES}
    assert {"llama-3.3-70b-qlora.yaml", "llama-3.1-8b-lora.yaml", "llama-3.1-8b-serve.yaml",
            "tiny-llama-cpu.yaml"} <= names
    tiny = LlamaFineTune.model_validate(load_file(EXAMPLES / "tiny-llama-cpu.yaml")[0])
    assert tiny.spec.resources.gpus_per_node == 0


def test_exponent_floats_read_as_numbers_like_kubectl() -> None:
    doc = load_all("training:\n  learning_rate: 1e-5\n  other: 2.5E+3\n  version: '1e-5'\n  name: 1e\n")[0]
    assert doc["training"] == {"learning_rate": 1e-5, "other": 2500.0, "version": "1e-5", "name": "1e"}


def _seed_recipes() -> list[dict]:
    text = SEED.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return [load_all(b)[0] for b in blocks]


@pytest.mark.skipif(not SEED.exists(), reason="the seed document is not beside the repository")
def test_seed_recipes_are_in_the_examples_verbatim() -> None:
    recipes = _seed_recipes()
    assert len(recipes) == 2
    specs = [load_file(p)[0]["spec"] for p in EXAMPLE_FILES if load_file(p)[0]["kind"] == "LlamaFineTune"]
    for recipe in recipes:
        assert any(all(spec.get(k) == v for k, v in recipe.items()) for spec in specs), recipe


@pytest.mark.skipif(not SEED.exists(), reason="the seed document is not beside the repository")
def test_seed_recipe_pastes_into_a_spec_unchanged() -> None:
    for recipe in _seed_recipes():
        doc = {"apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaFineTune", "metadata": {"name": "seed"},
               "spec": {**recipe, "dataset": {"pvc": {"claimName": "d", "path": "t.jsonl"}},
                        "output": {"pvc": {"claimName": "o"}}}}
        result = validate_manifest(doc)
        assert result.ok, [str(p) for p in result.errors]
        spec = result.obj.spec.model_dump(mode="json", exclude_unset=True)
        for section, values in recipe.items():
            assert spec[section] == values


def test_committed_crds_match_the_models() -> None:
    for name, obj in crdgen.render().items():
        committed = (REPO / "crds" / name).read_text()
        assert committed == crdgen.dump(obj), f"crds/{name} is stale: run `make crds`"
    chart = REPO / "charts" / "llamaops" / "crds"
    if chart.is_dir():
        for name, obj in crdgen.render().items():
            assert (chart / name).read_text() == crdgen.dump(obj), f"chart crds/{name} is stale"


def test_crdgen_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "crds"
    monkeypatch.setattr(crdgen, "OUTPUT_DIRS", [out])
    monkeypatch.setattr(crdgen, "REPO_ROOT", tmp_path)
    assert crdgen.main([]) == 0
    assert crdgen.main(["--check"]) == 0
    victim = next(out.iterdir())
    victim.write_text(victim.read_text().replace("minimum: 1", "minimum: 2", 1))
    assert crdgen.main(["--check"]) == 1


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("model", [LlamaFineTune, LlamaServe], ids=lambda m: m.__name__)
def test_schema_is_structural(model) -> None:
    schema = openapi_schema(model.model_fields["spec"].annotation)
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        assert not {"anyOf", "oneOf", "$ref", "title", "const"} & node.keys(), f"{path}: {sorted(node)}"
        if node["type"] == "object" and "properties" not in node:
            assert "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields"), path


def test_every_section_defaults_to_its_model_defaults() -> None:
    """The server stores an omitted section as the models' defaults, every key filled."""
    for model in (LlamaFineTune, LlamaServe):
        spec_model = model.model_fields["spec"].annotation
        spec = openapi_schema(spec_model)
        for name, field in spec_model.model_fields.items():
            if field.default_factory is not None and field.default_factory is not list:
                default = spec["properties"][field.alias or name]["default"]
                assert field.default_factory().model_dump(mode="json", exclude_none=True) == default, name
                assert default, name
