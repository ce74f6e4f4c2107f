"""The trainer's figures on one GPU, one line each (bench/gpu_check.sh runs it; --dry-run: tiny shapes on the CPU).

    lora bf16 gc=off|on   tokens/s and MFU of LoRA r=16 on all linear layers of an 8B-shaped Llama (random
                          weights), seq 4096, with gradient checkpointing off and on (their ratio is its cost)
    qlora nf4             the same with the base in 4-bit NF4 (bitsandbytes Linear4bit): tokens/s, peak memory
    attention             sdpa with our block-diagonal mask of packed examples vs plain causal: ms per step
    nccl                  a process group (nccl; gloo on the CPU) initialised through llamaops_trainer.launch,
                          one all_reduce checked
    fsdp                  the trainer itself (python -m llamaops_trainer, training.parallelism: fsdp) on a tiny
                          model over every GPU (2+; gloo processes in a dry run): exit code, this rank's share
                          of the parameters, wall time. One GPU has nothing to shard with: said so

MFU counts 4 x parameters FLOPs per trained token (forward plus input gradients: LoRA computes no weight
gradients of the base) against the peak given by --peak-tflops (H100/H200 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORKER = r'''
import os, torch, torch.distributed as dist
from llamaops_trainer import distributed
dist.init_process_group(distributed.backend())
t = torch.ones(1, device="cuda" if torch.cuda.is_available() else "cpu") * (dist.get_rank() + 1)
dist.all_reduce(t)
assert t.item() == sum(range(1, dist.get_world_size() + 1)), t
print(f"worker {dist.get_rank()}: backend {dist.get_backend()}, all_reduce {t.item():.0f}", flush=True)
dist.destroy_process_group()
'''


def model(shape: dict[str, int], dtype: torch.dtype, device: str, nf4: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    base.config.use_cache = False
    if nf4:
        quantize_nf4(base, dtype, device)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))


def quantize_nf4(base: Any, dtype: torch.dtype, device: str) -> None:
    """Every projection of the decoder as a bitsandbytes NF4 Linear4bit (what QLoRA loads), random weights kept."""
    import bitsandbytes as bnb

    for layer in base.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))
                del linear
    if device == "cuda":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(m: Any, batch: int, seq: int, steps: int, device: str, checkpointing: bool,
                mask: torch.Tensor | None = None) -> float:
    """Seconds per optimizer step (forward, backward, AdamW on the LoRA parameters), after one warm-up step."""
    base = m.get_base_model()
    if checkpointing:  # as the trainer does (model.load_model)
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    elif getattr(base, "is_gradient_checkpointing", False):
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, m.config.vocab_size, (batch, seq), device=device)
    kwargs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    timed = 0.0
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        m(**kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:
            timed += time.perf_counter() - t0
    return timed / steps


def packed_mask(batch: int, seq: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Our collator's block-diagonal mask for examples of varied length packed into each row."""
    from llamaops_trainer.data import block_causal_mask

    segments = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        pos, seg = 0, 0
        while pos < seq:
            n = min(seq - pos, 64 + (seg * 97) % (seq // 4 or 1))
            segments[b, pos:pos + n] = seg
            pos, seg = pos + n, seg + 1
    return block_causal_mask(segments, dtype).to(device)


def nccl_through_launch(device: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "nccl_worker.py"
        script.write_text(WORKER)
        nproc = max(1, torch.cuda.device_count()) if device == "cuda" else 2
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "llamaops_trainer.launch", "--standalone",
                              f"--nproc-per-node={nproc}", str(script)], capture_output=True, text=True, timeout=240)
        took = time.perf_counter() - t0
    # The workers share the pipe: their lines may interleave, so count reports rather than lines.
    reports = re.findall(r"worker \d+: (backend \w+, all_reduce \d+)", out.stdout)
    if out.returncode != 0 or len(reports) != nproc:
        return f"FAILED (exit {out.returncode}, {len(reports)} of {nproc} workers): {out.stderr[-300:]}"
    return f"{nproc} process(es) through llamaops_trainer.launch in {took:.1f} s: {reports[0]}"


def fsdp_through_trainer(device: str) -> str:
    nproc = torch.cuda.device_count() if device == "cuda" else 2
    if nproc < 2:
        return "not measured: one GPU, nothing to shard with (tests/trainer/test_fsdp.py proves the path on 2 gloo ranks)"
    import yaml
    from llamaops_trainer import tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny.write_model(root / "model")
        tiny.write_jsonl(root / "local" / "chat.jsonl", tiny.synthetic_chats(128, max_filler=12))
        spec = {"model": {"base_model": str(root / "model"), "torch_dtype": "bfloat16" if device == "cuda" else
                          "float32"},
                "lora": {"r": 8, "lora_alpha": 16},
                "training": {"max_steps": 6, "per_device_train_batch_size": 2, "max_seq_length": 256,
                             "parallelism": "fsdp", "save_steps": 3, "logging_steps": 1},
                "dataset": {"pvc": {"claimName": "local", "path": "chat.jsonl"}},
                "output": {"pvc": {"claimName": "local", "path": "out"}}}
        (root / "spec.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "LLAMAOPS_PVC_ROOT": str(root), "PET_NPROC_PER_NODE": str(nproc), "PET_STANDALONE": "1",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "llamaops_trainer", "--spec", str(root / "spec.yaml"),
                              "--output-dir", str(root / "out")], env=env, capture_output=True, text=True, timeout=240)
        took = time.perf_counter() - t0
    share = re.search(r"parameters on this rank: (.*)", out.stderr)
    if out.returncode != 0 or share is None:
        return f"FAILED (exit {out.returncode}): {out.stderr[-300:]}"
    return f"{nproc} ranks, 6 steps with 2 checkpoints in {took:.1f} s; rank 0 holds {share.group(1)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (float32): checks the script")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = LLAMA_8B if cuda else TINY
    seq = args.seq if cuda else min(args.seq, 256)
    name = torch.cuda.get_device_name() if cuda else "CPU (dry run: tiny shapes)"
    print(f"device: {name}; torch {torch.__version__}; seq {seq}, batch {args.batch}", flush=True)
    started = time.perf_counter()

    m = model(shape, dtype, device)
    params = sum(p.numel() for p in m.parameters())
    tokens = args.batch * seq
    rates = {}
    for gc in (False, True):
        step = train_steps(m, args.batch, seq, args.steps, device, gc)
        rates[gc] = tokens / step
        mfu = 4 * params * rates[gc] / (args.peak_tflops * 1e12)
        print(f"lora {str(dtype).removeprefix('torch.')} gc={'on' if gc else 'off'}: {rates[gc]:,.0f} tokens/s, MFU {100 * mfu:.1f}%, "
              f"{step * 1000:.0f} ms/step", flush=True)
    print(f"lora gradient checkpointing cost: {rates[False] / rates[True]:.2f}x step time", flush=True)

    mask_dtype = dtype
    causal = train_steps(m, args.batch, seq, args.steps, device, False)
    blocked = train_steps(m, args.batch, seq, args.steps, device, False, packed_mask(args.batch, seq, mask_dtype,
                                                                                     device))
    print(f"attention: sdpa block-diagonal mask {blocked * 1000:.0f} ms/step vs plain causal {causal * 1000:.0f} "
          f"ms/step ({blocked / causal:.2f}x)", flush=True)
    del m
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    try:
        q = model(shape, dtype, device, nf4=True)
        step = train_steps(q, args.batch, seq, args.steps, device, True)
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        print(f"qlora nf4 gc=on: {tokens / step:,.0f} tokens/s, {step * 1000:.0f} ms/step, peak {peak:.1f} GB",
              flush=True)
        del q
    except Exception as exc:  # noqa: BLE001 - reported, the other figures stand
        print(f"qlora nf4: FAILED: {type(exc).__name__}: {exc}", flush=True)

    print(f"fsdp: {fsdp_through_trainer(device)}", flush=True)
    print(f"nccl: {nccl_through_launch(device)}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
