"""A tiny Llama-architecture model, a Llama 3 style tokenizer and a synthetic chat dataset.

Built locally with random weights and a small BPE, nothing downloaded: for the
CPU demo (examples/tiny-llama-cpu.yaml), the tests and the throughput benchmark.

    python -m llamaops_trainer.tiny --model-dir DIR --dataset FILE.jsonl [--examples N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from llamaops.api.chat_template import LLAMA3_TEMPLATE  # Meta-Llama-3-8B-Instruct's chat template

# Llama 3's special tokens (ids differ: a real Llama 3 vocabulary has 128k entries).
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
# Llama 3's pre-tokenizer split.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
         "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yolanda"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
FILLER = ("the cluster runs many pods and each node has a kubelet that watches the api server for work while "
          "controllers reconcile desired state with observed state in a loop").split()


def synthetic_chats(n: int, seed: int = 0, max_filler: int = 0, system: bool = False) -> list[dict[str, Any]]:
    """Chats with a fixed name -> colour mapping to learn; `max_filler` words of noise vary their length."""
    rng = random.Random(seed)
    fav = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(NAMES)}
    rows = []
    for _ in range(n):
        name = rng.choice(NAMES)
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, max_filler))) if max_filler else ""
        question = (filler + " " if filler else "") + f"what colour does {name} like?"
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": f"{name} likes {fav[name]}."}]
        if system:
            messages.insert(0, {"role": "system", "content": "You answer in one sentence."})
        rows.append({"messages": messages})
    return rows


def build_tokenizer(vocab_size: int = 1024, with_pad: bool = True) -> Any:
    """A byte-level BPE trained on the synthetic corpus, with Llama 3's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in SPECIAL_TOKENS if with_pad or t != "<|finetune_right_pad_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for row in synthetic_chats(400, seed=1, max_filler=20, system=True) for m in row["messages"]]
    corpus += ["user\n\nassistant\n\nsystem\n\n", "You are a concise assistant for Kubernetes questions."]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # Like Llama 3's, it puts <|begin_of_text|> before a plain encode (the trainer encodes rendered chats, which
    # hold it already, without special tokens).
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=LLAMA3_TEMPLATE, model_max_length=8192, add_bos_token=True)


def build_model(tokenizer: Any, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, seed: int = 0, initializer_range: float = 0.2, **overrides: Any) -> Any:
    """Random weights. The wide init (0.2, not Llama's 0.02) gives the frozen lm_head logits with some
    range, so a LoRA-only fine-tune can move the loss as it does on a pretrained model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=initializer_range, **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_model(model_dir: Path, with_pad: bool = True, **model_kwargs: Any) -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer) like a Hub snapshot."""
    tokenizer = build_tokenizer(with_pad=with_pad)
    model = build_model(tokenizer, **model_kwargs)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # Recorded for converters that read the config rather than the tokenizer's post-processor (Ollama's
    # safetensors import: without the key it writes a GGUF that adds no BOS token).
    config = model_dir / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "add_bos_token": True}, indent=2) + "\n")
    return model_dir


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llamaops_trainer.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--examples", type=int, default=256)
    args = p.parse_args(argv)
    write_model(args.model_dir)
    write_jsonl(args.dataset, synthetic_chats(args.examples, max_filler=12))
    print(f"model: {args.model_dir}\ndataset: {args.dataset}")


if __name__ == "__main__":
    main()
