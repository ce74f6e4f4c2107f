"""From records to training batches: chat template, assistant-only labels, packing, collation.

Labels come from where each assistant turn sits in the rendered conversation,
never from token ids: with pad = eos (tokenizers without
<|finetune_right_pad_id|>) a collator that masked the pad id would also mask
the real <|eot_id|>, and the model would never learn to stop.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from llamaops.api.chat_template import DATE_STRING
from llamaops.api.finetune import DatasetSpec, FineTuneSpec

from llamaops_trainer.errors import BadConfig, BadData
from llamaops_trainer.sources import Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool", "ipython")
# Llama 3.1/3.2 templates write "Today Date" into the system block (3.2 from the
# clock); a fixed date keeps tokenisation identical from one day (and restart) to the next. The served
# Llama 3.1 template defaults to the same date (llamaops.api.chat_template).
TEMPLATE_KWARGS = {"date_string": DATE_STRING}
# Used only when a tokenizer has Llama 3's special tokens but no template of its own. Unlike Meta's
# Llama 3 template (llamaops.api.chat_template.LLAMA3_TEMPLATE) it writes bos_token even for an empty
# conversation, so a conversation that opens with an assistant turn still has a generation prompt to
# locate that turn after.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

Attention = Literal["block", "flat", "padded"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    records: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0  # cut to max_seq_length, still with assistant tokens to learn from
    skipped_too_long: int = 0  # no assistant token left within max_seq_length
    train_tokens: int = 0
    train_label_tokens: int = 0
    train_sequences: int = 0  # packs when packing, else examples
    longest_example_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: DataStats
    train_examples: list[Example] = field(default_factory=list)  # unpacked, for EVA initialisation


# ------------------------------------------------------------------ records -> messages


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise BadData(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def to_messages(record: Record, spec: DatasetSpec, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation of one record, checked, with the spec's system prompt when it has none."""
    row, where = record.value, record.where
    if not isinstance(row, dict):
        raise BadData(f"{where}: expected a JSON object, got {type(row).__name__}")
    if spec.format == "prompt-completion":
        for key in (spec.prompt_field, spec.completion_field):
            if key not in row:
                raise BadData(f"{where}: missing field {key!r} (dataset.format is prompt-completion)")
        messages = [{"role": "user", "content": _text(row[spec.prompt_field], where, spec.prompt_field)},
                    {"role": "assistant", "content": _text(row[spec.completion_field], where, spec.completion_field)}]
    else:
        if spec.messages_field not in row:
            hint = f"; it has {', '.join(map(repr, list(row)[:5]))}" if row else ""
            raise BadData(f"{where}: missing field {spec.messages_field!r}{hint}")
        raw = row[spec.messages_field]
        if not isinstance(raw, list) or not raw:
            raise BadData(f"{where}: {spec.messages_field!r} must be a non-empty list of {{role, content}}")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadData(f"{where}: {spec.messages_field}[{i}] must be an object with role and content")
            if m["role"] not in ROLES:
                raise BadData(f"{where}: {spec.messages_field}[{i}].role {m['role']!r} "
                              f"is not one of {', '.join(ROLES)}")
            content = _text(m["content"], where, f"{spec.messages_field}[{i}].content")
            messages.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadData(f"{where}: conversation has no assistant turn with content: nothing to learn")
    if system_prompt and messages[0]["role"] != "system":
        # 訓練和推理使用相同的 system prompt: the serving side applies the same one.
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


# ------------------------------------------------------------------ messages -> tokens


class ChatEncoder:
    """Renders conversations with the tokenizer's chat template and labels the assistant turns."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            if "<|start_header_id|>" in tokenizer.get_vocab():
                tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
            else:
                raise BadConfig("spec.model.base_model", "the tokenizer has no chat template")

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **TEMPLATE_KWARGS)

    def assistant_spans(self, messages: Sequence[dict[str, str]], where: str = "conversation"
                        ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character span of each assistant turn: its content and end-of-turn token.

        Each span is what rendering the turn adds after the generation prompt, which
        is exactly what the model must produce at inference (template trimming included).
        """
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(prompt) and full.startswith(through)):
                raise BadData(f"{where}: the chat template renders turn {i} differently once the conversation "
                              "goes on, so the assistant turn cannot be located (does it open with an assistant turn?)")
            if len(through) > len(prompt):
                spans.append((len(prompt), len(through)))
        return full, spans

    def encode_many(self, conversations: Sequence[Sequence[dict[str, str]]],
                    wheres: Sequence[str] | None = None) -> list[Example]:
        wheres = wheres or ["conversation"] * len(conversations)
        rendered = [self.assistant_spans(c, w) for c, w in zip(conversations, wheres, strict=True)]
        texts = [t for t, _ in rendered]
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            out = []
            for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
                labels = [IGNORE_INDEX] * len(ids)
                si = 0
                for t, (start, _end) in enumerate(offsets):
                    while si < len(spans) and start >= spans[si][1]:
                        si += 1
                    if si < len(spans) and spans[si][0] <= start < spans[si][1]:
                        labels[t] = ids[t]
                out.append(Example(list(ids), labels))
            return out
        return [self._encode_by_segments(text, spans) for text, spans in rendered]

    def _encode_by_segments(self, text: str, spans: list[tuple[int, int]]) -> Example:
        """Slow tokenizers have no offsets: tokenize the pieces between span boundaries separately."""
        ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for start, end in spans:
            for piece, learn in ((text[pos:start], False), (text[start:end], True)):
                if piece:
                    toks = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += toks
                    labels += toks if learn else [IGNORE_INDEX] * len(toks)
            pos = end
        if pos < len(text):
            toks = self.tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
            ids += toks
            labels += [IGNORE_INDEX] * len(toks)
        return Example(ids, labels)


def fit_length(ex: Example, max_len: int) -> tuple[Example | None, bool]:
    """(example, truncated): cut to max_len, or None when no assistant token would remain."""
    labels = list(ex.labels)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token; in a pack this is the example boundary
    if len(ex.input_ids) <= max_len:
        return Example(ex.input_ids, labels), False
    cut = labels[:max_len]
    if all(x == IGNORE_INDEX for x in cut):
        return None, False
    return Example(ex.input_ids[:max_len], cut), True


# ------------------------------------------------------------------ packing


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into bins of at most `capacity` tokens; examples are never split."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            b, room = len(bins), capacity
            bins.append([])
        bins[b].append(i)
        room -= need
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def to_features(examples: Sequence[Example]) -> dict[str, list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
    return {"input_ids": ids, "labels": labels, "seq_lens": [len(ex.input_ids) for ex in examples]}


def build_sequences(examples: list[Example], max_len: int, packing: bool, seed: int) -> list[dict[str, list[int]]]:
    if not packing:
        return [to_features([ex]) for ex in examples]
    bins = pack_lengths([len(ex.input_ids) for ex in examples], max_len)
    for b in bins:
        b.sort()  # keep source order inside a pack
    random.Random(seed).shuffle(bins)  # the sampler shuffles too; this spreads long packs on resume-free runs
    return [to_features([examples[i] for i in b]) for b in bins]


# ------------------------------------------------------------------ the whole pipeline


def prepare(records: list[Record], tokenizer: Any, spec: FineTuneSpec) -> PreparedData:
    ds, training = spec.dataset, spec.training
    if ds.max_samples is not None:
        records = records[: ds.max_samples]
    stats = DataStats(records=len(records))
    conversations = [to_messages(r, ds, spec.system_prompt) for r in records]

    order = list(range(len(conversations)))
    n_eval = 0
    if ds.eval_fraction > 0 and len(order) > 1:
        random.Random(training.seed).shuffle(order)
        n_eval = min(len(order) - 1, max(1, round(len(order) * ds.eval_fraction)))
    eval_idx = set(order[len(order) - n_eval:]) if n_eval else set()

    encoder = ChatEncoder(tokenizer)
    max_len = training.max_seq_length
    train: list[Example] = []
    evals: list[Example] = []
    chunk = 512
    for lo in range(0, len(conversations), chunk):
        encoded = encoder.encode_many(conversations[lo: lo + chunk], [r.where for r in records[lo: lo + chunk]])
        for offset, ex in enumerate(encoded):
            stats.longest_example_tokens = max(stats.longest_example_tokens, len(ex.input_ids))
            fitted, truncated = fit_length(ex, max_len)
            if fitted is None:
                stats.skipped_too_long += 1
                continue
            stats.truncated += truncated
            (evals if lo + offset in eval_idx else train).append(fitted)

    if not train:
        raise BadData(f"all {len(conversations)} examples are longer than max_seq_length={max_len} with no "
                      f"assistant token inside it (longest: {stats.longest_example_tokens} tokens): raise "
                      "spec.training.max_seq_length or shorten the conversations")
    if stats.skipped_too_long or stats.truncated:
        log.warning("%d example(s) skipped (no assistant token within max_seq_length=%d), %d truncated to it",
                    stats.skipped_too_long, max_len, stats.truncated)
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    stats.train_tokens = sum(len(ex.input_ids) for ex in train)
    stats.train_label_tokens = sum(sum(1 for x in ex.labels if x != IGNORE_INDEX) for ex in train)
    train_seqs = build_sequences(train, max_len, training.packing, training.seed)
    eval_seqs = build_sequences(evals, max_len, training.packing, training.seed)
    stats.train_sequences = len(train_seqs)
    log.info("data: %s", stats.as_dict())
    return PreparedData(train_seqs, eval_seqs, stats, train)


class SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


# ------------------------------------------------------------------ collation


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) mask: causal inside a segment, nothing across segments.

    bool (True = attend) for sdpa, additive float (0 / dtype min) for eager.
    Position ids that restart per example do not isolate packed examples under
    sdpa/eager; this mask does.
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None or dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


class Collator:
    """Batches of packed (or single) examples.

    block:  rows padded right, a block-diagonal causal 4D mask (sdpa, eager).
    flat:   padding-free, all sequences in one row with restarting position_ids
            (FlashAttention 2 reads the boundaries from them).
    padded: one example per row, a plain 2D padding mask (no packing).
    Pads carry label -100 and are found by length, never by token id.
    """

    def __init__(self, pad_token_id: int, attention: Attention, mask_dtype: torch.dtype | None = None,
                 pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.attention = attention
        self.mask_dtype = mask_dtype
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        real = sum(sum(f["seq_lens"]) for f in features)
        if self.attention == "flat":
            features = [{"input_ids": [t for f in features for t in f["input_ids"]],
                         "labels": [t for f in features for t in f["labels"]],
                         "seq_lens": [n for f in features for n in f["seq_lens"]]}]
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of and self.attention != "flat":
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        segments = torch.full((batch, length), -1, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
            pos = 0
            for seg, seq_len in enumerate(f["seq_lens"]):
                position_ids[row, pos: pos + seq_len] = torch.arange(seq_len)
                segments[row, pos: pos + seq_len] = seg
                pos += seq_len
            if n < length:  # pads: their own causal segment, so no row of the mask is empty (NaN in sdpa)
                position_ids[row, n:] = torch.arange(length - n)
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "num_real_tokens": torch.tensor(real, dtype=torch.long)}
        if self.attention == "flat":
            # Sequence boundaries for FlashAttention's varlen kernel, given rather than inferred from
            # position_ids in every layer (which costs a device sync each time).
            lens = torch.tensor(features[0]["seq_lens"], dtype=torch.int32)
            cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
            longest = int(lens.max())
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        elif self.attention == "block":
            out["attention_mask"] = block_causal_mask(segments, self.mask_dtype)
        elif self.attention == "padded":
            out["attention_mask"] = (segments >= 0).long()
        return out
