"""`llamaops run --local`: the same spec document, launcher and environment contract as a cluster run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from api_cases import EXAMPLES, example
from llamaops.api import LlamaFineTune
from llamaops.api.contract import ENV_NAME, ENV_NAMESPACE, ENV_OUTPUT_DIR, ENV_PVC_ROOT, ENV_SPEC, SPEC_PATH
from llamaops.builders.finetune import job, spec_document
from llamaops.cli import app
from llamaops.cli.local import local_command, local_env
from llamaops.queue import Placement
from llamaops.settings import Settings
from typer.testing import CliRunner

TINY = EXAMPLES / "tiny-llama-cpu.yaml"


def pvc_root(tmp_path: Path) -> Path:
    root = tmp_path / "pvc"
    (root / "llamaops-demo" / "models" / "tiny-llama").mkdir(parents=True)
    (root / "llamaops-demo" / "datasets").mkdir(parents=True)
    (root / "llamaops-demo" / "datasets" / "chat.jsonl").write_text("{}\n")
    return root


def test_local_command_is_the_job_command_on_one_node() -> None:
    lft = LlamaFineTune.model_validate(example("tiny-llama-cpu.yaml"))
    container = job(lft, Settings(), Placement())["spec"]["template"]["spec"]["containers"][0]
    cluster = [*container["command"], *container["args"]]
    local = local_command(SPEC_PATH, "1", python="python")
    assert local == cluster
    env_names = {e["name"] for e in container["env"]}
    assert {ENV_SPEC, ENV_NAME, ENV_NAMESPACE} <= env_names


def test_local_env_maps_claims_and_output_and_reports_no_status(tmp_path: Path) -> None:
    base = {ENV_NAME: "leftover", ENV_NAMESPACE: "ns", "PATH": "/bin"}
    env = local_env(base, "/s.yaml", tmp_path / "pvc", tmp_path / "out", "2", cpu=True)
    assert ENV_NAME not in env and ENV_NAMESPACE not in env
    assert env[ENV_SPEC] == "/s.yaml" and env[ENV_PVC_ROOT] == str(tmp_path / "pvc")
    assert env[ENV_OUTPUT_DIR] == str(tmp_path / "out") and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"] == "/bin"


def test_dry_run_writes_the_configmap_spec_with_overrides(tmp_path: Path) -> None:
    root, out = pvc_root(tmp_path), tmp_path / "out"
    result = CliRunner().invoke(app, [
        "run", "--local", "-f", str(TINY), "--pvc-root", str(root), "--output-dir", str(out), "--max-steps", "3",
        "--set", "training.logging_steps=1", "--set", "training.learning_rate=1e-2", "--nproc", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    spec_file = out / "llamaops-spec.yaml"
    written = yaml.safe_load(spec_file.read_text())
    training = written["spec"]["training"]
    assert (training["max_steps"], training["logging_steps"], training["learning_rate"]) == (3, 1, 0.01)
    # Exactly what the operator's ConfigMap would hold for this object.
    doc = example("tiny-llama-cpu.yaml")
    doc["spec"]["training"].update(max_steps=3, logging_steps=1, learning_rate=1e-2)
    assert spec_file.read_text() == spec_document(LlamaFineTune.model_validate(doc))
    assert f"{ENV_PVC_ROOT}={root.resolve()}" in result.output
    assert f"{ENV_OUTPUT_DIR}={out.resolve()}" in result.output
    assert (f"{sys.executable} -m llamaops_trainer.launch --nnodes=1 --nproc-per-node=2 --standalone "
            f"-m llamaops_trainer --spec {spec_file.resolve()}") in result.output


def test_default_output_is_under_llamaops_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = pvc_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--local", "-f", str(TINY), "--pvc-root", str(root), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "llamaops-runs" / "tiny-llama-cpu" / "llamaops-spec.yaml").is_file()


@pytest.mark.parametrize(("args", "code", "words"), [
    (["run", "-f", str(TINY)], 2, "only --local"),
    (["run", "--local"], 2, "-f FILE is required"),
    (["run", "--local", "-f", str(TINY), "--nproc", "zero"], 2, "--nproc"),
    (["run", "--local", "-f", str(EXAMPLES / "llama-3.1-8b-serve.yaml")], 2, "0 LlamaFineTune"),
    (["run", "--local", "-f", str(TINY), "--set", "training"], 2, "KEY=VALUE"),
    (["run", "--local", "-f", str(TINY), "--max-steps", "0", "--set", "training.num_train_epochs=0"], 1,
     "error: spec.training"),
])
def test_usage_and_invalid_specs(args: list[str], code: int, words: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [*args, "--pvc-root", str(pvc_root(tmp_path)), "--output-dir",
                                      str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == code, result.output
    assert words in result.output


def test_missing_claim_paths_are_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--local", "-f", str(TINY), "--pvc-root", str(tmp_path / "empty"),
                                      "--dry-run"])
    assert result.exit_code == 1
    assert "spec.model.base_model" in result.output and "spec.dataset.pvc" in result.output
    assert str(tmp_path / "empty" / "llamaops-demo" / "models" / "tiny-llama") in result.output
