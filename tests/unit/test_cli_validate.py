"""`llamaops validate`: every problem named by its field, the memory plan table, CI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from api_cases import CASES, EXAMPLES, Case, example
from llamaops.api import catalog
from llamaops.api.finetune import LlamaFineTune
from llamaops.api.memory import plan_training
from llamaops.builders.serve import validate_manifest
from llamaops.cli import app
from typer.testing import CliRunner


def invoke(*args: str):
    return CliRunner().invoke(app, ["validate", *args])


def write(path: Path, *docs: object) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_malformed_spec_fails_naming_its_field(case: Case, tmp_path: Path) -> None:
    path = write(tmp_path / f"{case.id}.yaml", case.manifest())
    result = invoke("-f", str(path))
    assert result.exit_code == 1, result.output
    assert "invalid" in result.output
    error_lines = [line for line in result.output.splitlines() if line.strip().startswith("error ")]
    assert any(case.field in line for line in error_lines), result.output
    if case.words:
        assert any(case.words in line for line in error_lines), result.output

    report = json.loads(invoke("-f", str(path), "-o", "json").output)
    doc = report[0]["documents"][0]
    assert doc["valid"] is False
    assert any(case.field in p["field"] and p["severity"] == "error" for p in doc["problems"])


def test_case_table_is_the_full_one() -> None:
    assert len(CASES) >= 45


def test_all_examples_are_valid_with_a_memory_table() -> None:
    result = invoke("-f", str(EXAMPLES))
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ("llama31-8b-lora", "llama33-70b-qlora", "llama31-8b", "tiny-llama-cpu"):
        assert f"/{name}: valid" in out
    for row in ("weights", "adapters + gradients + optimizer", "activations", "total", "GPU memory", "fits"):
        assert row in out
    assert "kv cache" in out  # the LlamaServe's plan
    assert "warning spec.model.base_model" in out  # the tiny model is not in the catalog


def test_memory_plan_is_the_api_plan() -> None:
    path = EXAMPLES / "llama-3.3-70b-qlora.yaml"
    report = json.loads(invoke("-f", str(path), "-o", "json").output)
    plan = report[0]["documents"][0]["memoryPlan"]
    lft = LlamaFineTune.model_validate(example("llama-3.3-70b-qlora.yaml"))
    expected = plan_training(lft.spec, catalog.lookup(lft.spec.model.base_model).arch)
    assert plan["perGpuGB"] == pytest.approx(expected.per_gpu_gb, abs=1e-2)
    assert plan["components"].keys() == expected.rows.keys()
    assert plan["fits"] is True and plan["gpuMemoryGB"] == 80


def test_a_plan_that_does_not_fit_says_how_many_gpus(tmp_path: Path) -> None:
    doc = example("llama-3.3-70b-qlora.yaml")
    doc["spec"]["resources"].update(gpusPerNode=1, gpuProduct="NVIDIA-L4")
    result = invoke("-f", str(write(tmp_path / "big.yaml", doc)))
    assert result.exit_code == 1
    assert "does not fit" in result.output and "GPUs needed (sharded)" in result.output
    assert "error spec.resources.gpusPerNode" in result.output


def test_unreadable_and_unparsable_files_exit_2_and_the_rest_is_still_checked(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = invoke("-f", str(tmp_path / "missing.yaml"), "-f", str(broken),
                    "-f", str(EXAMPLES / "llama-3.1-8b-lora.yaml"))
    assert result.exit_code == 2
    assert "missing.yaml: cannot read" in result.output
    assert "broken.yaml: not valid YAML" in result.output
    assert "llama31-8b-lora: valid" in result.output


def test_one_bad_document_of_several_fails_the_file(tmp_path: Path) -> None:
    good = example("llama-3.1-8b-lora.yaml")
    bad = example("llama-3.1-8b-lora.yaml")
    bad["metadata"]["name"] = "bad"
    bad["spec"]["lora"]["r"] = 0
    result = invoke("-f", str(write(tmp_path / "two.yaml", good, bad, ["not", "an", "object"])), "--no-plan")
    assert result.exit_code == 1
    assert "llama31-8b-lora: valid" in result.output
    assert "LlamaFineTune/bad: invalid" in result.output and "error spec.lora.r" in result.output
    assert "expected a mapping" in result.output
    assert "GPU memory plan" not in result.output


def test_strict_fails_on_warnings() -> None:
    path = str(EXAMPLES / "tiny-llama-cpu.yaml")
    assert invoke("-f", path).exit_code == 0
    assert invoke("-f", path, "--strict").exit_code == 1


def test_stdin() -> None:
    text = (EXAMPLES / "llama-3.1-8b-lora.yaml").read_text()
    result = CliRunner().invoke(app, ["validate", "-f", "-"], input=text)
    assert result.exit_code == 0 and "llama31-8b-lora: valid" in result.output


def test_empty_file_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    result = invoke("-f", str(tmp_path / "empty.yaml"))
    assert result.exit_code == 2 and "no YAML document" in result.output


def _plan_for(training: dict[str, object], gpu_gb: int, **resources: object):
    doc = example("llama-3.1-8b-lora.yaml")
    doc["spec"]["training"].update(training)
    doc["spec"]["resources"].update(gpuMemoryGB=gpu_gb, **resources)
    lft = LlamaFineTune.model_validate(doc)
    return plan_training(lft.spec, catalog.lookup(lft.spec.model.base_model).arch)


def test_gradient_checkpointing_is_on_only_when_the_plan_needs_it() -> None:
    """Unset, it costs 1.3-1.4x the step time only where the run would not fit without it; set, it is the spec's."""
    roomy = _plan_for({"gradient_checkpointing": None, "per_device_train_batch_size": 1, "max_seq_length": 1024}, 80)
    assert roomy.fits and roomy.gradient_checkpointing is False
    tight = _plan_for({"gradient_checkpointing": None, "per_device_train_batch_size": 2, "max_seq_length": 4096}, 48)
    assert tight.gradient_checkpointing is True and tight.fits
    without = _plan_for({"gradient_checkpointing": False, "per_device_train_batch_size": 2, "max_seq_length": 4096},
                        48)
    assert not without.fits and without.rows["activations"] > tight.rows["activations"]
    forced = _plan_for({"gradient_checkpointing": True, "per_device_train_batch_size": 1, "max_seq_length": 1024}, 80)
    assert forced.gradient_checkpointing is True and forced.rows["activations"] < roomy.rows["activations"]
    out = CliRunner().invoke(app, ["validate", "-f", str(EXAMPLES / "llama-3.1-8b-lora.yaml"), "-o", "json"])
    plan = json.loads(out.stdout)[0]["documents"][0]["memoryPlan"]
    # The seed's 8B recipe (4 x 2048 tokens) would keep ~57 GB of activations without it: on, and it fits 80 GB.
    assert plan["gradientCheckpointing"] is True and plan["fits"] and plan["strategy"] == "ddp"


def _qlora70(gpu_gb: int, **training: object):
    doc = example("llama-3.3-70b-qlora.yaml")
    doc["spec"]["resources"]["gpuMemoryGB"] = gpu_gb
    doc["spec"]["training"].update(training)
    lft = LlamaFineTune.model_validate(doc)
    return plan_training(lft.spec, catalog.lookup(lft.spec.model.base_model).arch)


def test_the_70b_qlora_recipe_counts_fp32_upcasts_and_shards_when_replicas_do_not_fit() -> None:
    """peft's k-bit preparation upcasts embeddings and lm_head to fp32 (8.4 GB for 70B) and the residual stream
    follows: replicated, the seed's recipe needs ~69 GB a GPU. On 4 x 48 GB that cannot fit, so the plan (and the
    trainer, with the same function) shards: no upcast, a quarter of the weights each."""
    on80 = _qlora70(80)
    assert on80.strategy == "ddp" and on80.fits and 65 <= on80.per_gpu_gb <= 72, on80.rows
    on48 = _qlora70(48)
    assert on48.strategy == "fsdp" and on48.fits and on48.gpus == 4, on48.rows
    assert on48.rows["weights"] < on80.rows["weights"] / 4  # sharded, and the embeddings stay bf16
    forced = _qlora70(48, parallelism="ddp")
    assert forced.strategy == "ddp" and not forced.fits
    doc = example("llama-3.3-70b-qlora.yaml")
    doc["spec"]["training"]["parallelism"] = "ddp"
    doc["spec"]["resources"]["gpuMemoryGB"] = 48
    result = validate_manifest(doc)
    assert [p.field for p in result.errors] == ["spec.resources.gpusPerNode"], result.errors
