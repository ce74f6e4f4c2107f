"""Chat template, loss masks, packing and collation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from llamaops.api.finetune import DatasetSpec
from llamaops_trainer import data
from llamaops_trainer.data import IGNORE_INDEX, ChatEncoder, Collator, Example
from llamaops_trainer.sources import Record
from trainer_helpers import BASE_MANIFEST, CLAIM, MODEL, merge

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what colour does alice like?"},
    {"role": "assistant", "content": "alice likes red."},
    {"role": "user", "content": "and bob?"},
    {"role": "assistant", "content": "  bob likes green.  "},  # the template trims: so must the label
]


def labelled_text(tok: Any, ex: Example) -> list[str]:
    """The decoded runs of labelled tokens."""
    runs, current = [], []
    for tid, lab in zip(ex.input_ids, ex.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_rendering_is_the_llama3_format(tokenizer: Any) -> None:
    text = ChatEncoder(tokenizer).render(CHAT[:2], add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nwhat colour does alice like?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_only_assistant_content_and_its_eot_carry_labels(tokenizer: Any) -> None:
    (ex,) = ChatEncoder(tokenizer).encode_many([CHAT])
    assert labelled_text(tokenizer, ex) == ["alice likes red.<|eot_id|>", "bob likes green.<|eot_id|>"]
    # Re-tokenising the rendered text gives the same ids: labels were found on the real tokenisation.
    assert ex.input_ids == tokenizer(ChatEncoder(tokenizer).render(CHAT), add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eots = [i for i, t in enumerate(ex.input_ids) if t == eot]
    assert [ex.labels[i] == eot for i in eots] == [False, False, True, False, True]  # system, user, asst, user, asst


def test_pad_eos_fallback_keeps_the_real_eot_label(tokenizer_no_pad: Any) -> None:
    tok = tokenizer_no_pad
    assert "<|finetune_right_pad_id|>" not in tok.get_vocab()
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"
    (ex,) = ChatEncoder(tok).encode_many([CHAT[:3]])
    fitted, _ = data.fit_length(ex, 512)
    other = data.fit_length(ChatEncoder(tok).encode_many([CHAT[:2] + [{"role": "assistant", "content": "ok"}]])[0], 512)[0]
    batch = Collator(tok.pad_token_id, "padded")([data.to_features([fitted]), data.to_features([other])])
    eot = tok.eos_token_id
    row = batch["labels"][1]
    n = len(other.input_ids)
    assert batch["input_ids"][1, n:].eq(eot).all(), "padding is eos here"
    assert row[n:].eq(IGNORE_INDEX).all(), "padding never carries a label"
    assert row[n - 1].item() == eot, "the real end-of-turn keeps its label although it equals the pad id"
    assert batch["attention_mask"][1, :n].all() and not batch["attention_mask"][1, n:].any()


def test_pad_token_is_finetune_right_pad(tokenizer: Any) -> None:
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_padding_never_carries_labels(tokenizer: Any) -> None:
    encoder = ChatEncoder(tokenizer)
    short, long = encoder.encode_many([CHAT[:3], CHAT])
    feats = [data.to_features([data.fit_length(e, 512)[0]]) for e in (short, long)]
    for attention in ("padded", "block"):
        batch = Collator(tokenizer.pad_token_id, attention, pad_to_multiple_of=16)(feats)
        n = len(short.input_ids)
        assert batch["input_ids"].shape[1] % 16 == 0
        assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][0, n:].eq(tokenizer.pad_token_id).all()
        assert batch["num_real_tokens"].item() == len(short.input_ids) + len(long.input_ids)


def test_system_prompt_is_added_only_when_missing() -> None:
    spec = DatasetSpec.model_validate({"pvc": {"claimName": "c", "path": "p"}})
    with_system = data.to_messages(Record("f:1", {"messages": CHAT}), spec, "Other.")
    assert with_system[0] == CHAT[0]
    without = data.to_messages(Record("f:1", {"messages": CHAT[1:3]}), spec, "Other.")
    assert without[0] == {"role": "system", "content": "Other."} and without[1:] == CHAT[1:3]


def test_prompt_completion_format() -> None:
    spec = DatasetSpec.model_validate({"pvc": {"claimName": "c", "path": "p"}, "format": "prompt-completion",
                                       "promptField": "q", "completionField": "a"})
    msgs = data.to_messages(Record("f:1", {"q": "hi", "a": "hello"}), spec, None)
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_overlong_examples_are_truncated_or_skipped() -> None:
    ex = Example(list(range(10)), [IGNORE_INDEX] * 6 + [6, 7, 8, 9])
    fitted, truncated = data.fit_length(ex, 8)
    assert truncated and fitted is not None and fitted.labels == [IGNORE_INDEX] * 6 + [6, 7]
    assert data.fit_length(ex, 6) == (None, False)  # nothing left to learn: skipped
    short, truncated = data.fit_length(ex, 10)
    assert not truncated and short is not None and short.labels[0] == IGNORE_INDEX


def test_pack_lengths_fills_bins_without_splitting() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(500)]
    bins = data.pack_lengths(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 256 + 1  # best-fit decreasing wastes little


def test_block_mask_is_block_diagonal_causal() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = data.block_causal_mask(seg)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    additive = data.block_causal_mask(seg, torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)


def test_flat_collation_restarts_positions() -> None:
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "seq_lens": [3, 2]},
             {"input_ids": [6, 7], "labels": [-100, 7], "seq_lens": [2]}]
    batch = Collator(0, "flat")(feats)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7] and batch["max_length_q"] == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(pvc_root: Path, tokenizer: Any, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(pvc_root / CLAIM / MODEL), attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    chats = [CHAT, CHAT[:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]]
    examples = [data.fit_length(e, 512)[0] for e in ChatEncoder(tokenizer).encode_many(chats)]
    pack = data.to_features(examples)
    mask_dtype = torch.float32 if attn == "eager" else None
    batch = Collator(tokenizer.pad_token_id, "block", mask_dtype, pad_to_multiple_of=64)([pack])
    batch.pop("num_real_tokens")
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            n = len(ex.input_ids)
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        # Without the block mask the later examples would see the earlier ones: the check has teeth.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        n0 = len(examples[0].input_ids)
        assert not torch.allclose(leaky[n0:n0 + len(examples[1].input_ids)], packed[n0:n0 + len(examples[1].input_ids)],
                                  atol=1e-4)


def test_prepare_splits_packs_and_counts(tokenizer: Any) -> None:
    from llamaops.api.finetune import FineTuneSpec

    spec = FineTuneSpec.model_validate(merge(BASE_MANIFEST["spec"], {
        "dataset": {"evalFraction": 0.1, "maxSamples": 100},
        "training": {"max_seq_length": 128},
    }))
    from llamaops_trainer import tiny

    rows = tiny.synthetic_chats(120, seed=3, max_filler=40)
    rows.append({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]})
    prepared = data.prepare([Record(f"f:{i}", r) for i, r in enumerate(rows[:99] + rows[-1:])], tokenizer, spec)
    s = prepared.stats
    assert s.records == 100 and s.eval_examples == 10
    assert s.skipped_too_long == 1 and s.train_examples + s.eval_examples == 99
    assert all(len(f["input_ids"]) <= 128 and sum(f["seq_lens"]) == len(f["input_ids"]) for f in prepared.train)
    assert s.train_sequences < s.train_examples  # packed
    assert sum(len(f["input_ids"]) for f in prepared.train) == s.train_tokens
