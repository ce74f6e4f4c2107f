"""Trained tokens per second and held-out loss: the LlamaOps trainer against what a user would pick instead.

CPU mode (default): a small random-weight Llama and variable-length chats (a held-out share kept aside), one
epoch on each side over the same examples (so the same real tokens), the same model, LoRA (r=8 on the
attention and MLP projections), AdamW, learning rate and schedule, about the same tokens per optimizer step:

  ours:         packing up to max_seq_length (best-fit), block-diagonal attention (sdpa), assistant-only labels
  trl packed:   TRL's SFTTrainer with its own packing (best-fit decreasing, padding-free position ids)
  trl padded:   TRL's SFTTrainer without packing (dynamic padding per batch)
  hf dynamic:   transformers.Trainer, one example per row, padded to the longest in each batch

Sides alternate over rounds (noisy machines), round r with seed r for all; the best tokens/s of each counts.
After the epoch every side's model is scored on the same held-out chats, one at a time, with the same function: the mean loss over the
assistant tokens, averaged over the rounds (the data order alone moves it by about 0.1). A speed-up bought by letting packed examples attend to each other shows there (TRL's packing
without FlashAttention does so). Ends with `ratio vs trl: X.XXx` (ours against TRL's faster variant).

GPU mode (--gpu): an 8B-shaped random-weight Llama (Llama 3.1 8B dimensions),
bf16, LoRA r=16 on all linear layers, sequences of 4096 tokens; prints
tokens/s/GPU and MFU, taking 4 x parameters FLOPs per trained token (LoRA:
forward plus input gradients, no weight gradients of the base) against the H100
SXM's 989 TFLOP/s dense bf16 peak.

    python bench/trainer_throughput.py [--rounds 3] [--max-seq-length 1024] [--profile]
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
              checkpointing: bool, learning_rate: float = 1e-4) -> FineTuneSpec:
    """`steps` -1: one epoch."""
    return FineTuneSpec.model_validate({
        "model": {"base_model": "bench/random-llama", "torch_dtype": dtype},
        "lora": {"lora_dropout": 0.0, **lora},
        "training": {"max_steps": steps, "num_train_epochs": 1, "per_device_train_batch_size": batch,
                     "max_seq_length": max_len, "learning_rate": learning_rate, "seed": 0, "gradient_checkpointing": checkpointing, "packing": True,
                     "logging_steps": 10_000, "save_strategy": "no", "bf16": dtype == "bfloat16"},
        "dataset": {"pvc": {"claimName": "bench", "path": "chat.jsonl"}},
        "output": {"pvc": {"claimName": "bench", "path": "out"}},
    })


def train_ours(base: Any, tokenizer: Any, prepared: data.PreparedData, spec: FineTuneSpec, attn: str,
               workdir: Path, callback: TrainerCallback) -> training.LlamaOpsTrainer:
    """Our trainer's path on an in-memory model: LoRA, packed sequences, our collator and TrainingArguments."""
    if spec.training.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=models.GRADIENT_CHECKPOINTING_KWARGS)
        base.enable_input_require_grads()
    peft_model = models.apply_lora(base, spec)
    attention = "flat" if attn == "flash_attention_2" else "block"
    collator = data.Collator(tokenizer.pad_token_id, attention, models.DTYPES[spec.model.torch_dtype]
                             if attn == "eager" else None, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    args = training.training_arguments(spec, workdir / "ours", WorldInfo(), max(spec.training.max_steps, 0),
                                       has_eval=False)
    trainer = training.LlamaOpsTrainer(model=peft_model, args=args, data_collator=collator,
                                       train_dataset=data.SequenceDataset(prepared.train), callbacks=[callback])
    trainer.train()
    return trainer


class Timed(TrainerCallback):
    """Wall time of the training loop alone (TRL tokenizes and packs in its constructor, outside it)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def _hf_arguments(spec: FineTuneSpec, batch: int, workdir: Path, cls: Any = TrainingArguments,
                  **extra: Any) -> Any:
    t = spec.training
    return cls(output_dir=str(workdir), per_device_train_batch_size=batch, num_train_epochs=1,
               learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=0,
               weight_decay=t.weight_decay, optim="adamw_torch", seed=t.seed, data_seed=t.seed, save_strategy="no",
               report_to="none", logging_steps=10_000, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
               bf16=bool(t.bf16), **extra)


def run_hf_dynamic(base: Any, tokenizer: Any, examples: list[data.Example], spec: FineTuneSpec, batch: int,
                   workdir: Path) -> tuple[Any, float, int]:
    """transformers.Trainer, one example a row, each batch padded to its longest (DataCollatorForSeq2Seq)."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    model = get_peft_model(base, models.lora_config(spec.lora, quantized=False))
    rows = [{"input_ids": ex.input_ids, "labels": ex.labels, "attention_mask": [1] * len(ex.input_ids)}
            for ex in examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    timer = Timed()
    trainer = Trainer(model=model, args=_hf_arguments(spec, batch, workdir / "hf", remove_unused_columns=False),
                      train_dataset=rows, data_collator=collator, callbacks=[timer])
    trainer.train()
    return trainer.model, timer.seconds, sum(len(r["input_ids"]) for r in rows)


def run_trl(base: Any, tokenizer: Any, records: list[Record], spec: FineTuneSpec, batch: int, packing: bool,
            workdir: Path) -> tuple[Any, float, int]:
    """TRL's SFTTrainer on the same chats as prompt/completion pairs (its completion-only loss: the assistant
    turn, as ours), with its own packing (best-fit decreasing, padding-free) or its own dynamic padding."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": r.value["messages"][:-1], "completion": r.value["messages"][-1:]} for r in records]
    args = _hf_arguments(spec, batch, workdir / f"trl-{packing}", SFTConfig, max_length=spec.training.max_seq_length,
                         packing=packing, dataset_num_proc=None)
    timer = Timed()
    trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=models.lora_config(spec.lora, quantized=False), callbacks=[timer])
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trainer.train()
    return trainer.model, timer.seconds, tokens


@torch.no_grad()
def held_out_loss(model: Any, examples: list[data.Example]) -> float:
    """Mean loss over the assistant tokens of the held-out chats, each scored alone (no packing, no padding)."""
    model.eval()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor(ex.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    model.train()
    return total / count


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
    # work make step times erratic; every side runs under the same setting.
    torch.set_num_threads(args.threads)
    tokenizer = tiny.build_tokenizer()
    models.configure_padding(tokenizer)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]}
    spec = make_spec(args.max_seq_length, args.batch_size, -1, "float32", lora, checkpointing=False,
                     learning_rate=args.learning_rate)
    # Template and answer take about 40 tokens; the tiny tokenizer makes about one token per filler word.
    records = chats(args.examples, args.max_seq_length - 48, seed=0)
    held = max(8, len(records) // 8)
    train_records, eval_records = records[:-held], records[-held:]
    prepared = data.prepare(train_records, tokenizer, spec)
    held_out = data.prepare(eval_records, tokenizer, spec).train_examples
    examples = prepared.train_examples
    lengths = sorted(len(ex.input_ids) for ex in examples)
    tokens = prepared.stats.train_tokens
    per_step = tokens / len(prepared.train) * args.batch_size  # what one packed optimizer step trains
    unpacked_batch = max(1, round(per_step / statistics.mean(lengths)))
    print(f"data: {len(lengths)} training chats of {lengths[0]}-{lengths[-1]} tokens (median "
          f"{lengths[len(lengths) // 2]}, mean {statistics.mean(lengths):.0f}), {tokens} tokens; {len(held_out)} held "
          f"out. ours: {len(prepared.train)} packs of <= {args.max_seq_length}, batch {args.batch_size} "
          f"(~{per_step:.0f} tokens/step); unpacked sides: batch {unpacked_batch}")
    size = dict(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4, intermediate=args.hidden * 8 // 3)

    def fresh(seed: int = 0) -> Any:
        model = tiny.build_model(tokenizer, **size, attn_implementation="sdpa")
        model.config.use_cache = False
        torch.manual_seed(seed)  # the same LoRA initialisation on every side (each wraps the model next)
        return model

    def seeded(seed: int) -> FineTuneSpec:
        return spec.model_copy(update={"training": spec.training.model_copy(update={"seed": seed})})

    # Round r trains every side with seed r (data order, packing, LoRA initialisation): held-out loss moves by
    # about +-0.1 with the seed alone here, so it is averaged over the rounds; tokens/s is the best round's.
    sides: dict[str, Any] = {
        "ours": lambda tmp, r: _ours_epoch(fresh(r), tokenizer, data.prepare(train_records, tokenizer, seeded(r)),
                                           seeded(r), tmp),
        "trl packed": lambda tmp, r: run_trl(fresh(r), tokenizer, train_records, seeded(r), args.batch_size, True,
                                             tmp),
        "trl padded": lambda tmp, r: run_trl(fresh(r), tokenizer, train_records, seeded(r), unpacked_batch, False,
                                             tmp),
        "hf dynamic": lambda tmp, r: run_hf_dynamic(fresh(r), tokenizer, examples, seeded(r), unpacked_batch, tmp),
    }
    speed: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternate, so background load hits every side alike
            for name, run in sides.items():
                model, seconds, trained = run(Path(tmp), round_)
                speed[name].append(trained / seconds)
                losses[name].append(held_out_loss(model, held_out))
                print(f"round {round_ + 1} (seed {round_}) {name:>10}: {trained / seconds:8,.0f} tok/s ({trained} "
                      f"tokens in {seconds:.1f} s), held-out loss {losses[name][-1]:.4f}", flush=True)
    untrained = held_out_loss(fresh(), held_out)
    print(f"held-out loss before training: {untrained:.4f}")
    loss = {name: statistics.mean(values) for name, values in losses.items()}
    for name in sides:
        print(f"{name:>10}: {max(speed[name]):8,.0f} tok/s   held-out loss {loss[name]:.4f} (mean of "
              f"{len(losses[name])} seeds)")
    trl = max(("trl packed", "trl padded"), key=lambda n: max(speed[n]))
    print(f"ratio vs hf dynamic: {max(speed['ours']) / max(speed['hf dynamic']):.2f}x")
    print(f"ratio vs trl: {max(speed['ours']) / max(speed[trl]):.2f}x (vs TRL's faster side, {trl}; "
          f"held-out loss ours {loss['ours']:.4f} vs {loss[trl]:.4f})")
    if args.profile:
        profile_ours(fresh(), tokenizer, prepared, spec)


def _ours_epoch(base: Any, tokenizer: Any, prepared: data.PreparedData, spec: FineTuneSpec,
                workdir: Path) -> tuple[Any, float, int]:
    timer = Timed()
    trainer = train_ours(base, tokenizer, prepared, spec, "sdpa", workdir, timer)
    return trainer.model, timer.seconds, trainer.state.num_input_tokens_seen


def profile_ours(base: Any, tokenizer: Any, prepared: data.PreparedData, spec: FineTuneSpec) -> None:
    """Where our step's time goes: the operators by their own CPU time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    peft_model = models.apply_lora(base, spec)
    collator = data.Collator(tokenizer.pad_token_id, "block")
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    batches = [collator(prepared.train[i:i + spec.training.per_device_train_batch_size]) for i in range(0, 8, 2)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            batch.pop("num_real_tokens", None)
            peft_model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


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
        w = Stopwatch(args.warmup, args.steps)
        train_ours(base, tokenizer, prepared, spec, attn, Path(tmp), w)
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
    p.add_argument("--rounds", type=int, default=3,
                   help="CPU: alternating rounds, round r with seed r; best tokens/s, mean held-out loss")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="CPU: every side's peak learning rate")
    p.add_argument("--profile", action="store_true", help="CPU: then profile our training step (top operators)")
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
