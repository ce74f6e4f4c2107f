"""Bad specs exit 64 and malformed data exits 65, each with one clear line and no library traceback."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from llamaops.api.contract import ADAPTER_DIR, EXIT_BAD_CONFIG, EXIT_BAD_DATA, RUN_INFO_FILE
from trainer_helpers import manifest, run_in_process, run_subprocess, write_spec

GOOD = {"messages": [{"role": "user", "content": "what colour does bob like?"},
                     {"role": "assistant", "content": "bob likes green."}]}


def _dataset(pvc_root: Path, name: str, lines: list[str] | bytes) -> str:
    path = pvc_root / "demo" / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line + "\n" for line in lines))
    return f"bad/{name}"


def _run(doc: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.set_level(logging.INFO)
    code, _ = run_in_process(doc, tmp_path)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any(r.exc_info for r in errors), "a traceback was logged"
    return code, "\n".join(r.getMessage() for r in errors)


BAD_DATA = [
    ("empty", [], "is empty"),
    ("blank-lines", ["", "   ", ""], "is empty"),
    ("invalid-json", [json.dumps(GOOD), '{"messages": [', json.dumps(GOOD)], "bad-data/invalid-json.jsonl:2: invalid JSON"),
    ("missing-messages", [json.dumps(GOOD), json.dumps({"conversation": []})], ":2: missing field 'messages'"),
    ("messages-not-a-list", [json.dumps({"messages": "hello"})], "must be a non-empty list"),
    ("no-assistant", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})], ":1: conversation has no assistant turn"),
    ("bad-role", [json.dumps({"messages": [{"role": "bot", "content": "hi"}]})], "role 'bot' is not one of"),
    ("content-not-text", [json.dumps({"messages": [{"role": "user", "content": 3},
                                                   {"role": "assistant", "content": "x"}]})], "content must be a string"),
    ("not-an-object", ["[1, 2]"], "expected a JSON object"),
    ("all-over-long", [json.dumps({"messages": [{"role": "user", "content": "word " * 300},
                                                {"role": "assistant", "content": "ok"}]})] * 3,
     "all 3 examples are longer than max_seq_length=64"),
]


@pytest.mark.parametrize(("name", "lines", "expected"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_malformed_data_exits_65(name: str, lines: list[str], expected: str, pvc_root: Path, tmp_path: Path,
                                 trainer_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    path = _dataset(pvc_root, f"{name}.jsonl", lines)
    doc = manifest(dataset={"pvc": {"path": path}}, training={"max_seq_length": 64})
    # Labels in messages are relative to the dataset root: name the file as it is addressed.
    code, message = _run(doc, tmp_path, caplog)
    assert code == EXIT_BAD_DATA, message
    assert expected.replace("bad-data/", "") in message, message


def test_not_utf8_exits_65(pvc_root: Path, tmp_path: Path, trainer_env: dict[str, str],
                           caplog: pytest.LogCaptureFixture) -> None:
    path = _dataset(pvc_root, "latin1.jsonl", b'{"messages": "caf\xe9"}\n')
    code, message = _run(manifest(dataset={"pvc": {"path": path}}), tmp_path, caplog)
    assert code == EXIT_BAD_DATA and "not UTF-8" in message


def test_directory_without_jsonl_exits_65(pvc_root: Path, tmp_path: Path, trainer_env: dict[str, str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    (pvc_root / "demo" / "empty-dir").mkdir(exist_ok=True)
    code, message = _run(manifest(dataset={"pvc": {"path": "empty-dir"}}), tmp_path, caplog)
    assert code == EXIT_BAD_DATA and "no *.jsonl" in message


def test_prompt_completion_missing_field_exits_65(pvc_root: Path, tmp_path: Path, trainer_env: dict[str, str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = _dataset(pvc_root, "pc.jsonl", [json.dumps({"prompt": "hi", "completion": "hello"}), json.dumps({"prompt": "x"})])
    code, message = _run(manifest(dataset={"pvc": {"path": path}, "format": "prompt-completion"}), tmp_path, caplog)
    assert code == EXIT_BAD_DATA and "pc.jsonl:2: missing field 'completion'" in message


def test_some_over_long_examples_are_skipped_and_counted(pvc_root: Path, tmp_path: Path, trainer_env: dict[str, str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    cut = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 300}]}
    path = _dataset(pvc_root, "some-long.jsonl", [json.dumps(GOOD)] * 8 + [json.dumps(long), json.dumps(cut)])
    doc = manifest(dataset={"pvc": {"path": path}}, training={"max_seq_length": 64, "max_steps": 2})
    code, message = _run(doc, tmp_path, caplog)
    assert code == 0, message
    info = json.loads((tmp_path / "out" / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["data"]["skipped_too_long"] == 1 and info["data"]["truncated"] == 1
    assert info["data"]["train_examples"] == 9
    assert "1 example(s) skipped" in caplog.text


BAD_SPECS = [
    ("unknown-field", {"lora": {"lora_alph": 8}}, "spec.lora.lora_alph", 'did you mean "lora_alpha"'),
    ("rank-zero", {"lora": {"r": 0}}, "spec.lora.r", ""),
    ("4-and-8-bit", {"quantization": {"load_in_4bit": True, "load_in_8bit": True}}, "spec.quantization", "mutually exclusive"),
    ("missing-base", {"model": {"base_model": "pvc://demo/models/nope"}}, "spec.model.base_model", "not a model directory"),
    ("missing-dataset", {"dataset": {"pvc": {"path": "nope.jsonl"}}}, "spec.dataset.pvc.path", "does not exist"),
    ("flash-on-cpu", {"model": {"attn_implementation": "flash_attention_2"}}, "spec.model.attn_implementation", "CUDA"),
    ("eval-without-split", {"training": {"eval_strategy": "steps"}}, "spec.dataset.evalFraction", "must be > 0"),
    ("unknown-module", {"lora": {"target_modules": ["foo_proj"]}}, "spec.lora", "foo_proj"),
    ("wrong-type", {"training": {"max_steps": "ten"}}, "spec.training.max_steps", ""),
    ("loftq-on-cpu", {"lora": {"init_lora_weights": "loftq"}}, "spec.lora.init_lora_weights", "needs a GPU"),
    # wandb is not among the trainer image's packages
    ("tracker-not-installed", {"training": {"report_to": ["wandb"]}}, "spec.training.report_to", "not installed"),
]


@pytest.mark.parametrize(("name", "patch", "field", "text"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_exits_64_naming_the_field(name: str, patch: dict[str, Any], field: str, text: str, tmp_path: Path,
                                            trainer_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    code, message = _run(manifest(**patch), tmp_path, caplog)
    assert code == EXIT_BAD_CONFIG, message
    assert field in message and text in message, message
    assert len(message.splitlines()) == 1


def test_spec_that_is_not_yaml_or_missing_exits_64(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    from llamaops_trainer.main import run

    (tmp_path / "bad.yaml").write_text("spec: [unclosed\n")
    assert run(["--spec", str(tmp_path / "bad.yaml"), "--output-dir", str(tmp_path / "o")]) == EXIT_BAD_CONFIG
    assert run(["--spec", str(tmp_path / "absent.yaml"), "--output-dir", str(tmp_path / "o")]) == EXIT_BAD_CONFIG


def test_bare_spec_is_accepted(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    from llamaops_trainer import config

    doc = manifest()["spec"]
    spec = write_spec(tmp_path / "bare.yaml", doc)
    cfg = config.load(str(spec), str(tmp_path / "o"))
    assert cfg.spec.model.base_model == doc["model"]["base_model"]


def test_process_exit_codes(tmp_path: Path, trainer_env: dict[str, str], pvc_root: Path) -> None:
    """The real process: 64 for a bad spec, 65 for bad data, one line on stderr and no traceback."""
    bad_spec = run_subprocess(manifest(lora={"r": 0}), tmp_path, trainer_env, timeout=120)
    assert bad_spec.returncode == EXIT_BAD_CONFIG, bad_spec.stderr
    assert "spec.lora.r" in bad_spec.stderr and "Traceback" not in bad_spec.stderr
    path = _dataset(pvc_root, "proc-empty.jsonl", [])
    bad_data = run_subprocess(manifest(dataset={"pvc": {"path": path}}), tmp_path, trainer_env, timeout=120)
    assert bad_data.returncode == EXIT_BAD_DATA, bad_data.stderr
    assert "is empty" in bad_data.stderr and "Traceback" not in bad_data.stderr
