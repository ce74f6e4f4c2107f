"""The GPU memory plan (llamaops.api.memory, what `llamaops validate` shows and what picks gradient
checkpointing and DDP vs FSDP) against the peak the trainer's own code path reaches on the CPU.

The trainer's load_model and apply_lora build the model (peft's k-bit preparation and its fp32 upcasts
included), then two optimizer steps run under a counter of live tensor bytes. The plan without its fixed
runtime row (the CUDA context, absent here) must be within MARGIN of the measured peak: a planner that forgot
the fp32 upcasts of a QLoRA model, the residual checkpoints or the logits' copies fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from live_memory import LiveTensorBytes
from llamaops.api.finetune import LlamaFineTune
from llamaops.api.memory import GB, RUNTIME_OVERHEAD_GB, _plan_training, architecture
from llamaops_trainer import model as models
from llamaops_trainer.distributed import WorldInfo
from trainer_helpers import manifest

MARGIN = 0.15
# The plan's coefficients were measured on the first shape; the second (wider, fewer layers, intermediate 2.75x
# hidden, no grouped-query attention, smaller vocabulary) checks that they carry over.
SHAPES = {
    "h256-i896-l4": {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 4, "num_attention_heads": 8,
                     "num_key_value_heads": 2, "vocab_size": 8192},
    "h512-i1408-l2": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 2,
                      "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 4096},
}
BATCH, SEQ = 2, 512


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, int], Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = SHAPES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=2048, tie_word_embeddings=False)).save_pretrained(path)
    return config, path


def _spec(model_dir: Path, dtype: str, checkpointing: bool, quantized: bool) -> Any:
    doc = manifest(model={"base_model": str(model_dir), "torch_dtype": dtype},
                   training={"per_device_train_batch_size": BATCH, "max_seq_length": SEQ, "bf16": dtype != "float32",
                             "gradient_checkpointing": checkpointing},
                   lora={"r": 8, "lora_alpha": 16, "target_modules": ["all-linear"]},
                   resources={"gpusPerNode": 1, "gpuMemoryGB": 80})
    if quantized:
        doc["spec"]["quantization"] = {"load_in_4bit": True, "bnb_4bit_compute_dtype": dtype}
    return LlamaFineTune.model_validate(doc).spec


def _measured_peak(spec: Any, model_dir: Path, vocab: int) -> int:
    """Bytes: the model as the trainer builds it, plus the peak of two optimizer steps."""
    model = models.load_model(spec, str(model_dir), WorldInfo(), "sdpa")
    model = models.apply_lora(model, spec)
    model.train()
    counter = LiveTensorBytes()
    resident = counter.existing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.model.torch_dtype != "float32")
    with counter:
        for _ in range(2):
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return resident + counter.peak


@pytest.mark.parametrize(("dtype", "checkpointing", "quantized"), [
    ("float32", False, False),
    ("bfloat16", False, False),
    ("bfloat16", True, False),
    ("bfloat16", False, True),
    ("bfloat16", True, True),  # QLoRA, replicated: embeddings, lm_head, norms and the residual stream in fp32
])
def test_plan_is_within_margin_of_the_measured_peak(shape: tuple[dict[str, int], Path], dtype: str,
                                                    checkpointing: bool, quantized: bool) -> None:
    config, model_dir = shape
    spec = _spec(model_dir, dtype, checkpointing, quantized)
    arch = architecture(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                        config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"])
    plan = _plan_training(spec, arch, "ddp", checkpointing)
    planned = (plan.per_gpu_gb - RUNTIME_OVERHEAD_GB) * GB
    measured = _measured_peak(spec, model_dir, config["vocab_size"])
    rows = ", ".join(f"{k} {v * GB / 1e6:.1f}" for k, v in plan.rows.items() if k != "runtime")
    print(f"{dtype} checkpointing={checkpointing} 4bit={quantized}: planned {planned / 1e6:.1f} MB ({rows}), "
          f"measured {measured / 1e6:.1f} MB, ratio {planned / measured:.2f}")
    assert abs(planned - measured) <= MARGIN * measured, (planned, measured)
