"""Trained tokens per second: the LlamaOps trainer against a naive Hugging Face Trainer baseline.

CPU mode (default): a small random-weight Llama and variable-length chats, trained
side by side in one process with the same LoRA, batch size and number of steps:

  ours:     packing up to max_seq_length, block-diagonal attention (sdpa) or
            padding-free varlen (FlashAttention 2), assistant-only labels
  baseline: plain transformers.Trainer, every example padded to max_seq_length

Only real (non-pad) tokens count as trained tokens on both sides. Prints the
ratio ours / baseline.

GPU mode (--gpu): an 8B-shaped random-weight Llama (Llama 3.1 8B dimensions),
bf16, LoRA r=16 on all linear layers, sequences of 4096 tokens; prints
tokens/s/GPU and MFU, taking 4 x parameters FLOPs per trained token (LoRA:
forward plus input gradients, no weight gradients of the base) against the H100
SXM's 989 TFLOP/s dense bf16 peak.

    python bench/trainer_throughput.py [--steps 6] [--max-seq-length 1024]
    python bench/trainer_throughput.py --gpu [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from llamaops.api.finetune import FineTuneSpec
from llamaops_trainer import data, tiny, training
from llamaops_trainer import model as models
from llamaops_trainer.distributed import WorldInfo
from llamaops_trainer.sources import Record
from transformers import Trainer, TrainerCallback, TrainingArguments

H100_BF16_DENSE_FLOPS = 989e12
LLAMA_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab_size=128256)


class Stopwatch(TrainerCallback):
    """Times the optimizer steps after the warm-up ones, with the real tokens they trained."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.last = warmup, warmup + steps
        self.t0 = self.t1 = 0.0
        self.tok0 = self.tok1 = 0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            self.t0, self.tok0 = self._now(), state.num_input_tokens_seen
        elif state.global_step == self.last:
            self.t1, self.tok1 = self._now(), state.num_input_tokens_seen

    @property
    def tokens_per_second(self) -> float:
        return (self.tok1 - self.tok0) / (self.t1 - self.t0)


def make_spec(max_len: int, batch: int, steps: int, dtype: str, lora: dict[str, Any],
              checkpointing: bool) -> FineTuneSpec:
    return FineTuneSpec.model_validate({
        "model": {"base_model": "bench/random-llama", "torch_dtype": dtype},
        "lora": {"lora_dropout": 0.0, **lora},
        "training": {"max_steps": steps, "per_device_train_batch_size": batch, "max_seq_length": max_len,
                     "learning_rate": 1e-4, "gradient_checkpointing": checkpointing, "packing": True,
                     "logging_steps": 10_000, "save_strategy": "no", "bf16": dtype == "bfloat16"},
        "dataset": {"pvc": {"claimName": "bench", "path": "chat.jsonl"}},
        "output": {"pvc": {"claimName": "bench", "path": "out"}},
    })


def run_ours(base: Any, tokenizer: Any, prepared: data.PreparedData, spec: FineTuneSpec, warmup: int,
             steps: int, attn: str, workdir: Path) -> Stopwatch:
    if spec.training.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=models.GRADIENT_CHECKPOINTING_KWARGS)
        base.enable_input_require_grads()
    peft_model = models.apply_lora(base, spec)
    attention = "flat" if attn == "flash_attention_2" else "block"
    collator = data.Collator(tokenizer.pad_token_id, attention, models.DTYPES[spec.model.torch_dtype]
                             if attn == "eager" else None, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    args = training.training_arguments(spec, workdir / "ours", WorldInfo(), warmup + steps, has_eval=False)
    watch = Stopwatch(warmup, steps)
    trainer = training.LlamaOpsTrainer(model=peft_model, args=args, data_collator=collator,
                                       train_dataset=data.SequenceDataset(prepared.train), callbacks=[watch])
    trainer.train()
    return watch


def run_baseline(base: Any, tokenizer: Any, prepared: data.PreparedData, spec: FineTuneSpec, warmup: int,
                 steps: int, workdir: Path) -> Stopwatch:
    """The textbook recipe: one example per row, padded to max_seq_length, 2D attention mask."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    peft_model = get_peft_model(base, models.lora_config(spec.lora, quantized=False))
    rows = [{"input_ids": ex.input_ids, "labels": ex.labels, "attention_mask": [1] * len(ex.input_ids)}
            for ex in prepared.train_examples]
    t = spec.training
    collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=t.max_seq_length,
                                      label_pad_token_id=-100)
    args = TrainingArguments(
        output_dir=str(workdir / "baseline"), per_device_train_batch_size=t.per_device_train_batch_size,
        max_steps=warmup + steps, learning_rate=t.learning_rate, save_strategy="no", report_to="none",
        logging_steps=10_000, disable_tqdm=True, remove_unused_columns=False, bf16=t.bf16 or False,
        use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen="non_padding", seed=t.seed,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs=models.GRADIENT_CHECKPOINTING_KWARGS,
    )
    watch = Stopwatch(warmup, steps)
    Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator, callbacks=[watch]).train()
    return watch


def chats(n: int, max_words: int, seed: int) -> list[Record]:
    """Chats with a long-tailed length spread, like real SFT data: lognormal question length with a median
    of a sixth of the longest (mean about a quarter), capped so the longest just fits max_seq_length."""
    rng = random.Random(seed)
    records = []
    for i, row in enumerate(tiny.synthetic_chats(n, seed=seed)):
        words = min(max_words, int(rng.lognormvariate(math.log(max_words / 6), 0.8)))
        question = row["messages"][0]
        question["content"] = " ".join(rng.choice(tiny.FILLER) for _ in range(words)) + " " + question["content"]
        records.append(Record(f"bench:{i}", row))
    return records


def cpu_mode(args: argparse.Namespace) -> None:
    # One intra-op thread by default: on a small shared machine, OpenMP threads fighting other
    # work make step times erratic; both sides run under the same setting.
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer()
    models.configure_padding(tokenizer)
    spec = make_spec(args.max_seq_length, args.batch_size, args.warmup + args.steps, "float32",
                     {"r": 8, "lora_alpha": 16}, checkpointing=False)
    # Template and answer take about 40 tokens; the tiny tokenizer makes about one token per filler word.
    prepared = data.prepare(chats(args.examples, args.max_seq_length - 48, seed=0), tokenizer, spec)
    lengths = sorted(len(ex.input_ids) for ex in prepared.train_examples)
    fill = prepared.stats.train_tokens / (len(prepared.train) * args.max_seq_length)
    print(f"data: {len(lengths)} examples of {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}, "
          f"mean {statistics.mean(lengths):.0f}, {prepared.stats.skipped_too_long} skipped); "
          f"{len(prepared.train)} packs of <= {args.max_seq_length} tokens ({fill:.0%} full)")
    size = dict(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4, intermediate=args.hidden * 8 // 3)
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternate, so background load hits both sides alike
            w = run_ours(tiny.build_model(tokenizer, **size, attn_implementation="sdpa"), tokenizer, prepared,
                         spec, args.warmup, args.steps, "sdpa", Path(tmp))
            ours.append(w.tokens_per_second)
            b = run_baseline(tiny.build_model(tokenizer, **size, attn_implementation="sdpa"), tokenizer, prepared,
                             spec, args.warmup, args.steps, Path(tmp))
            base.append(b.tokens_per_second)
            print(f"round {round_ + 1}: ours {ours[-1]:,.0f} tok/s ({w.tok1 - w.tok0} tokens), "
                  f"baseline {base[-1]:,.0f} tok/s ({b.tok1 - b.tok0} tokens)")
    best_ours, best_base = max(ours), max(base)
    print(f"trained tokens/s  ours: {best_ours:,.0f}   baseline (pad to {args.max_seq_length}, no packing): "
          f"{best_base:,.0f}")
    print(f"ratio: {best_ours / best_base:.2f}x (target >= 2x)")


def gpu_mode(args: argparse.Namespace, dims: dict[str, int] = LLAMA_8B, device: str = "cuda",
             dtype: str = "bfloat16") -> None:
    """`dims`/`device`/`dtype` exist so the path can be smoke-tested small on a CPU."""
    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer()
    models.configure_padding(tokenizer)
    seq = args.max_seq_length if args.max_seq_length != 1024 else 4096
    spec = make_spec(seq, 1, args.warmup + args.steps, dtype,
                     {"r": 16, "lora_alpha": 32, "target_modules": ["all-linear"]}, checkpointing=True)
    # Chats of up to ~4000 tokens (long-tailed) packed into 4096-token sequences.
    needed = args.warmup + args.steps
    prepared = data.prepare(chats(needed * 8, seq - 48, seed=0), tokenizer, spec)
    attn = models.pick_attention(spec.model)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=dims["vocab_size"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"], max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation=attn,
    )
    with torch.device(device), _default_dtype(models.DTYPES[dtype]):
        base = LlamaForCausalLM(config)  # random weights, built on the GPU in bf16 (16 GB, no fp32 copy)
    base.config.use_cache = False
    params = sum(p.numel() for p in base.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        w = run_ours(base, tokenizer, prepared, spec, args.warmup, args.steps, attn, Path(tmp))
    tps = w.tokens_per_second
    mfu = tps * 4 * params / H100_BF16_DENSE_FLOPS
    on_gpu = device == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else device
    print(f"{name}: {params / 1e9:.2f}B params, seq {seq}, attention {attn}, LoRA r=16 all-linear, {dtype}, "
          f"gradient checkpointing, {w.tok1 - w.tok0} tokens timed")
    memory = f"   peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if on_gpu else ""
    print(f"tokens/s/GPU: {tps:,.0f}   MFU (4N FLOPs/token vs 989 TFLOP/s): {mfu:.1%}{memory}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="8B-shaped model on one GPU: tokens/s/GPU and MFU")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--rounds", type=int, default=2, help="CPU: alternating rounds; the best of each side counts")
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads")
    p.add_argument("--max-seq-length", type=int, default=1024, help="CPU; --gpu uses 4096 unless set otherwise")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU")
        gpu_mode(args)
    else:
        cpu_mode(args)


if __name__ == "__main__":
    main()
