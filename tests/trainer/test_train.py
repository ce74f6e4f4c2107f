"""End to end on the tiny model: training lowers the loss, the adapter is whole and loads back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from llamaops.api.contract import ADAPTER_DIR, CHECKPOINTS_DIR, COMPLETE_MARKER, METRICS_FILE, RUN_INFO_FILE
from trainer_helpers import BASE_MANIFEST, CLAIM, MODEL, losses, manifest, run_in_process


@pytest.fixture(scope="module")
def trained(pvc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LoRA run shared by the tests of this module."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("lora")
    mp.setenv("LLAMAOPS_PVC_ROOT", str(pvc_root))
    for var in ("LLAMAOPS_NAME", "LLAMAOPS_NAMESPACE", "LLAMAOPS_OUTPUT_DIR", "WORLD_SIZE", "RANK"):
        mp.delenv(var, raising=False)
    try:
        code, out = run_in_process(manifest(training={"max_steps": 60}), tmp)
    finally:
        mp.undo()
    assert code == 0
    return out


def test_training_lowers_the_loss(trained: Path) -> None:
    history = losses(trained / METRICS_FILE)
    first, last = history[0][1], history[-1][1]
    print(f"loss: step {history[0][0]} {first:.3f} -> step {history[-1][0]} {last:.3f}")
    assert history[-1][0] == 60
    assert all(math.isfinite(loss) for _, loss in history)
    assert last < 0.5 * first, history


def test_adapter_directory_is_complete(trained: Path) -> None:
    adapter = trained / ADAPTER_DIR
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", RUN_INFO_FILE, COMPLETE_MARKER} <= names
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_MANIFEST["spec"]["model"]["base_model"]
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    info = json.loads((adapter / RUN_INFO_FILE).read_text())
    assert info["data"]["train_examples"] == 256 and info["data"]["skipped_too_long"] == 0
    assert info["metrics"]["global_step"] == 60 and info["spec_hash"]
    assert info["metrics"]["num_tokens"] > 0
    assert "<|start_header_id|>" in (adapter / "chat_template.jinja").read_text()
    assert not [p for p in trained.iterdir() if p.name.startswith(".")], "no temporary directory left behind"
    assert sorted(p.name for p in (trained / CHECKPOINTS_DIR).iterdir()) == ["checkpoint-40", "checkpoint-60",
                                                                              "complete-markers", "spec-hash"]
    assert all((trained / CHECKPOINTS_DIR / f"checkpoint-{s}" / COMPLETE_MARKER).is_file() for s in (40, 60))


def test_metrics_jsonl_records(trained: Path) -> None:
    records = [json.loads(line) for line in (trained / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    for r in steps:
        assert {"loss", "learning_rate", "epoch", "tokens_per_second", "num_tokens", "time"} <= set(r)
        assert r["tokens_per_second"] > 0


def test_adapter_loads_back_and_changes_outputs(trained: Path, pvc_root: Path, tokenizer: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(pvc_root / CLAIM / MODEL), dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "what colour does alice like?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = "alice likes red.<|eot_id|>"  # the mapping the synthetic data teaches
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    with torch.no_grad():
        before = base(input_ids=ids, labels=labels)
    tuned = PeftModel.from_pretrained(base, str(trained / ADAPTER_DIR)).eval()
    with torch.no_grad():
        after = tuned(input_ids=ids, labels=labels)
    assert not torch.allclose(before.logits, after.logits, atol=1e-3)
    print(f"answer loss: base {before.loss.item():.3f} -> adapter {after.loss.item():.3f}")
    assert after.loss.item() < 0.5 * before.loss.item()


def test_rerun_of_a_finished_spec_is_a_no_op(trained: Path, tmp_path: Path, trainer_env: dict[str, str]) -> None:
    marker = (trained / ADAPTER_DIR / COMPLETE_MARKER).stat().st_mtime_ns
    code, _ = run_in_process(manifest(training={"max_steps": 60}), tmp_path, output=trained)
    assert code == 0
    assert (trained / ADAPTER_DIR / COMPLETE_MARKER).stat().st_mtime_ns == marker


def test_qlora_4bit_nf4_on_cpu(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    pytest.importorskip("bitsandbytes")
    doc = manifest(
        quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32",
                      "bnb_4bit_use_double_quant": True},
        training={"max_steps": 30, "gradient_checkpointing": True},
    )
    code, out = run_in_process(doc, tmp_path)
    assert code == 0
    history = losses(out / METRICS_FILE)
    print("qlora loss:", [round(loss, 3) for _, loss in history])
    assert all(math.isfinite(loss) for _, loss in history)
    assert history[-1][1] < 0.7 * history[0][1]
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["quantization"]["load_in_4bit"] is True
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_no_packing_and_gradient_checkpointing(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    doc = manifest(training={"max_steps": 12, "packing": False, "gradient_checkpointing": True,
                             "per_device_train_batch_size": 8, "logging_steps": 4},
                   dataset={"evalFraction": 0.1}, lora={"init_lora_weights": "gaussian", "use_rslora": True})
    doc["spec"]["training"].update({"eval_strategy": "steps", "eval_steps": 6})
    code, out = run_in_process(doc, tmp_path)
    assert code == 0
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["packing"] is False and info["data"]["train_sequences"] == info["data"]["train_examples"]


def test_pissa_adapter_is_converted_for_the_original_base(tmp_path: Path, trainer_env: dict[str, str],
                                                           pvc_root: Path, tokenizer: Any) -> None:
    """PiSSA rewrites the base weights in memory; the exported adapter must apply to the untouched base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, out = run_in_process(manifest(lora={"init_lora_weights": "pissa"}, training={"max_steps": 20}), tmp_path)
    assert code == 0
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["init_lora_weights"] is True  # plain LoRA of twice the rank
    base = AutoModelForCausalLM.from_pretrained(str(pvc_root / CLAIM / MODEL), dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("what colour does bob like?")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after, atol=1e-3)


def test_gradient_checkpointing_follows_the_spec_else_the_memory_plan(pvc_root: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset: off on the CPU; on a GPU, on only when the plan of this model (counted from its config.json, as the
    catalog does not know it) would not fit without it."""
    from llamaops.api import LlamaFineTune
    from llamaops_trainer import model as models

    path = str(pvc_root / CLAIM / MODEL)

    def spec(**training: Any) -> Any:
        doc = manifest(training=training)
        doc["spec"]["resources"] = {"gpusPerNode": 1, "gpuMemoryGB": 4}
        return LlamaFineTune.model_validate(doc).spec

    assert models.use_gradient_checkpointing(spec(gradient_checkpointing=None), path) is False  # the CPU
    assert models.use_gradient_checkpointing(spec(gradient_checkpointing=True), path) is True
    monkeypatch.setattr(models, "use_cuda", lambda: True)
    assert models.use_gradient_checkpointing(spec(gradient_checkpointing=None, per_device_train_batch_size=1,
                                                  max_seq_length=256), path) is False
    # 24 x 8192 tokens of this 2-layer, 64-wide model on a 4 GB GPU: 1.72 GB of activations and logits over
    # the runtime's 2 GB without checkpointing (does not fit), 1.37 GB with (fits)
    assert models.use_gradient_checkpointing(spec(gradient_checkpointing=None, per_device_train_batch_size=24,
                                                  max_seq_length=8192), path) is True
    assert models.use_gradient_checkpointing(spec(gradient_checkpointing=False, per_device_train_batch_size=24,
                                                  max_seq_length=8192), path) is False


def test_report_to_tensorboard_writes_the_losses_beside_metrics_jsonl(tmp_path: Path, trainer_env: dict[str, str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard and `llamaops plot` read the same run: the event files under <output>/tensorboard hold the
    losses metrics.jsonl holds, step for step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    code, out = run_in_process(manifest(training={"max_steps": 8, "logging_steps": 2, "report_to": ["tensorboard"]}),
                               tmp_path)
    assert code == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = {(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")}
    assert scalars and scalars == {(step, round(loss, 4)) for step, loss in losses(out / METRICS_FILE)}

