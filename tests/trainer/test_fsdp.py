"""FSDP (FSDP2, full shard) on two gloo processes: the same optimizer steps and loss as one process, LoRA and
QLoRA, each rank holding half of the parameters; adapter-only checkpoints; SIGTERM and resume while sharded.

What only a GPU can show (bench/gpu_check.sh): NCCL, bf16 mixed precision under FSDP's own policy, memory
per GPU against the plan, and loading a 4-bit model that does not fit one GPU whole.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from llamaops.api.contract import ADAPTER_DIR, CHECKPOINTS_DIR, COMPLETE_MARKER, EXIT_RETRYABLE, RUN_INFO_FILE
from safetensors.torch import load_file
from slow_trainer import slow_workers_site
from trainer_helpers import manifest, run_in_process, write_spec

# Global batch 4 x 2 accumulation either way: one process with 4 sequences, or two with 2 each.
TRAINING = {"max_steps": 12, "save_steps": 4, "logging_steps": 1, "gradient_accumulation_steps": 2}
QLORA = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}


def _env(trainer_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**trainer_env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PET_NPROC_PER_NODE": "2",
            "PET_STANDALONE": "1", **extra}


def _sharded(tmp_path: Path, env: dict[str, str], training: dict[str, Any] | None = None,
             **spec: Any) -> tuple[subprocess.CompletedProcess[str], Path]:
    doc = manifest(training={**TRAINING, "per_device_train_batch_size": 2, "parallelism": "fsdp", **(training or {})},
                   **spec)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_spec(tmp_path / "spec.yaml", doc)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "llamaops_trainer", "--spec", str(path), "--output-dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out


def _single(tmp_path: Path, **spec: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    code, out = run_in_process(manifest(training={**TRAINING, "per_device_train_batch_size": 4}, **spec), tmp_path)
    assert code == 0
    return out


def _info(out: Path) -> dict[str, Any]:
    return json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())


def _rank_shares(stderr: str) -> dict[str, tuple[float, str, str]]:
    """rank -> (percent of the parameters it holds, frozen dtypes, trainable dtypes), from the trainer's log."""
    found = re.findall(r"rank(\d) \w+ llamaops_trainer: parameters on this rank: .*\((\d+)%\); frozen (\S+); "
                       r"trainable (\S+)", stderr)
    return {rank: (float(pct), frozen, trainable) for rank, pct, frozen, trainable in found}


def _assert_same_training(sharded: Path, single: Path, adapter_atol: float) -> None:
    info, one = _info(sharded), _info(single)
    assert info["parallelism"] == "fsdp" and info["world_size"] == 2
    assert info["metrics"]["global_step"] == one["metrics"]["global_step"] == TRAINING["max_steps"]
    assert info["metrics"]["num_tokens"] == one["metrics"]["num_tokens"]
    assert info["metrics"]["final_loss"] == pytest.approx(one["metrics"]["final_loss"], abs=1e-3)
    if not info["metrics"]["resumed_from"]:  # after a resume, train_loss averages the resumed steps only
        assert info["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], abs=1e-3)
    # The exported adapter is whole (gathered from both shards), not rank 0's half.
    a = load_file(sharded / ADAPTER_DIR / "adapter_model.safetensors")
    b = load_file(single / ADAPTER_DIR / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=adapter_atol, rtol=0, msg=key)


def test_fsdp_lora_matches_one_process_and_shards_half(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    single = _single(tmp_path / "single")
    proc, out = _sharded(tmp_path / "fsdp", _env(trainer_env))
    _assert_same_training(out, single, adapter_atol=1e-4)
    pct, _, _ = _rank_shares(proc.stderr)["0"]  # rank 0 logs it (the others log warnings only)
    assert 48 <= pct <= 52, pct  # FSDP2 shards every parameter by dim 0, and the model has 2 x the dims
    # Checkpoints hold the adapter, never the base model: the gathered state is LoRA weights only.
    checkpoint = out / CHECKPOINTS_DIR / "checkpoint-12"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    saved = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]


def test_fsdp_qlora_matches_one_process(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    single = _single(tmp_path / "single", quantization=QLORA)
    proc, out = _sharded(tmp_path / "fsdp", _env(trainer_env), quantization=QLORA)
    _assert_same_training(out, single, adapter_atol=1e-4)
    pct, _, _ = _rank_shares(proc.stderr)["0"]
    assert 45 <= pct <= 55, pct
    assert _info(out)["quantization"]["load_in_4bit"] is True


def test_fsdp_qlora_bf16_keeps_frozen_weights_in_the_compute_dtype(tmp_path: Path, trainer_env: dict[str, str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Sharded: 4-bit weights stored in bf16 and no fp32 upcast of the rest (FSDP gathers one dtype); the LoRA
    weights stay fp32 masters. One process (replicated path): peft's k-bit preparation upcasts them to fp32."""
    bf16 = {"model": {"torch_dtype": "bfloat16"},
            "quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}}
    training = {"max_steps": 4, "bf16": True}
    proc, out = _sharded(tmp_path / "fsdp", _env(trainer_env), training=training, **bf16)
    _, frozen, trainable = _rank_shares(proc.stderr)["0"]
    assert (frozen, trainable) == ("bfloat16", "float32")
    assert _info(out)["metrics"]["train_loss"] < 10

    with caplog.at_level("INFO", logger="llamaops_trainer"):
        code, _ = run_in_process(manifest(training={**TRAINING, **training}, **bf16), tmp_path)
    assert code == 0
    line = next(m for m in caplog.messages if m.startswith("parameters on this rank"))
    frozen = re.search(r"frozen (\S+);", line).group(1)
    assert "float32" in frozen.split(","), line


def test_fsdp_sigterm_checkpoints_and_resumes_to_the_same_adapter(tmp_path: Path,
                                                                  trainer_env: dict[str, str]) -> None:
    single = _single(tmp_path / "single")
    env = _env(trainer_env, PYTHONPATH=str(slow_workers_site(tmp_path / "site", 0.3)))
    doc = manifest(training={**TRAINING, "per_device_train_batch_size": 2, "parallelism": "fsdp"})
    spec = write_spec(tmp_path / "spec.yaml", doc)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "llamaops_trainer", "--spec", str(spec), "--output-dir", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / CHECKPOINTS_DIR / "checkpoint-4" / COMPLETE_MARKER
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RETRYABLE, output[-4000:]
    stopped = sorted({int(s) for s in re.findall(r"interrupted: stopped at step (\d+)", output)})
    assert len(stopped) == 1 and 4 <= stopped[0] < TRAINING["max_steps"], output[-3000:]
    assert (out / CHECKPOINTS_DIR / f"checkpoint-{stopped[0]}" / COMPLETE_MARKER).is_file()

    resumed = subprocess.run(command, env=_env(trainer_env), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _info(out)["metrics"]["resumed_from"] == f"checkpoint-{stopped[0]}"
    # Sharded model and optimizer state restored: the same adapter as one uninterrupted process.
    _assert_same_training(out, single, adapter_atol=1e-4)
