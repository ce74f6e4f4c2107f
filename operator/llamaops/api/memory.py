"""GPU memory plans for training and serving, in GB (1e9 bytes) as the seed's VRAM table counts.

Weights follow the seed's table: 2 bytes a parameter in FP16/BF16, 1 in INT8,
0.5 in INT4 (70B: 140 / 70 / 35 GB), plus what the trainer really holds
beside them: 4-bit quantization keeps embeddings and lm_head unquantized, and
on the replicated path peft's prepare_model_for_kbit_training upcasts them
(and with them the residual stream and the logits) to fp32. Training adds the
LoRA parameters with their fp32 gradients and optimizer state, the activations
(per token and layer, with or without gradient checkpointing; coefficients
measured on the trainer's own code path, which tests/trainer/test_memory_plan.py
measures again on the CPU and fails when they drift), the logits of the loss
and a fixed runtime overhead (the CUDA context).

Gradient checkpointing, unless the spec sets it, is on only when the plan
needs it: it costs about 1.3-1.4x the step time. Data parallel (every GPU holds
the whole model) is tried first; when it does not fit, weights, adapters and
optimizer state are sharded over all GPUs (FSDP), each GPU gathering one layer
at a time. The trainer takes both decisions from the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llamaops.api.catalog import DEFAULT_GPU_MEMORY_GB, Architecture, gpu_memory_gb
from llamaops.api.finetune import LLAMA_PROJECTIONS, FineTuneSpec
from llamaops.api.serve import LlamaServeSpec

GB = 1e9
USABLE_FRACTION = 0.9  # allocator fragmentation and the CUDA context
RUNTIME_OVERHEAD_GB = 2.0
# fp32 master weight + fp32 gradient + optimizer state, per trainable parameter.
_STATE_BYTES = {"8bit": 4 + 4 + 2, "sgd": 4 + 4, "adafactor": 4 + 4 + 1}
_ADAM_STATE_BYTES = 4 + 4 + 8
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Activation bytes per token and layer kept for the backward pass, by bytes of the compute dtype (fp32, or
# bf16/fp16 under autocast): (per hidden unit, per intermediate unit), plus 8 bytes per head dim and 4 per head
# (RoPE, softmax statistics). With checkpointing a layer keeps only its input (the residual stream's dtype) and
# the backward pass recomputes one layer at a time, after the logits' memory is gone.
_ACTIVATIONS = {4: (26.6, 16.2), 2: (17.1, 10.4)}
# Logits per token and vocabulary entry at the peak (the loss): the logits, the saved log-softmax and the
# gradient, as fp32 (a bf16 copy is freed once upcast).
_LOGITS_BYTES = 12
# 4-bit blocks of 64 carry an fp32 absmax; double quantization stores it in 8 bits (+ fp32 per 256 blocks).
_QUANT_CONSTANTS = {False: 4 / 64, True: 1 / 64 + 4 / (64 * 256)}


def architecture(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 tied_embeddings: bool = False) -> Architecture:
    """An Architecture from a model's config (a model the catalog does not know), its size counted from it."""
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if tied_embeddings else 2)
    return Architecture((per_layer * layers + embeddings) / 1e9, hidden, layers, heads, kv_heads, intermediate, vocab,
                        tied_embeddings)


def _module_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    head_dim = arch.hidden // arch.heads
    kv = arch.kv_heads * head_dim
    return {
        "q_proj": (arch.hidden, arch.hidden), "k_proj": (arch.hidden, kv), "v_proj": (arch.hidden, kv),
        "o_proj": (arch.hidden, arch.hidden), "gate_proj": (arch.hidden, arch.intermediate),
        "up_proj": (arch.hidden, arch.intermediate), "down_proj": (arch.intermediate, arch.hidden),
    }


def lora_parameters(arch: Architecture, r: int, target_modules: list[str]) -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted matrix."""
    shapes = _module_shapes(arch)
    targets = LLAMA_PROJECTIONS if "all-linear" in target_modules else target_modules
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in targets if m in shapes)
    extra = r * (arch.hidden + arch.vocab) if "lm_head" in target_modules else 0
    return per_layer * arch.layers + extra


@dataclass
class TrainingPlan:
    gpu_memory_gb: float
    gpu_memory_assumed: bool
    gpus: int
    strategy: str  # "ddp" (replicated) or "fsdp" (sharded)
    gradient_checkpointing: bool = True  # what the plan assumes (the spec's choice, else what it needs)
    rows: dict[str, float] = field(default_factory=dict)  # component -> GB per GPU
    min_gpus: int | None = None  # None: does not fit at any GPU count

    @property
    def per_gpu_gb(self) -> float:
        return sum(self.rows.values())

    @property
    def budget_gb(self) -> float:
        return self.gpu_memory_gb * USABLE_FRACTION

    @property
    def fits(self) -> bool:
        return self.per_gpu_gb <= self.budget_gb


def plan_training(spec: FineTuneSpec, arch: Architecture) -> TrainingPlan:
    """The first plan that fits, cheapest first: replicated before sharded (training.parallelism may force
    either), and within each without gradient checkpointing before with it (unless the spec sets it).
    Nothing fits: the most frugal plan, which says so."""
    t = spec.training
    gpus = max(spec.resources.total_gpus, 1)
    if t.parallelism != "auto":
        strategies = [t.parallelism]
    else:
        strategies = ["ddp", "fsdp"] if gpus > 1 else ["ddp"]
    checkpointing = [t.gradient_checkpointing] if t.gradient_checkpointing is not None else [False, True]
    plan = None
    for strategy in strategies:
        for ckpt in checkpointing:
            plan = _plan_training(spec, arch, strategy, ckpt)
            if plan.fits:
                return plan
    assert plan is not None
    return plan


def _plan_training(spec: FineTuneSpec, arch: Architecture, strategy: str, checkpointing: bool) -> TrainingPlan:
    res, q, t, lora = spec.resources, spec.quantization, spec.training, spec.lora
    gpus = max(res.total_gpus, 1)
    mem = res.gpu_memory_gb or gpu_memory_gb(res.gpu_product)
    assumed = mem is None
    mem = float(mem or DEFAULT_GPU_MEMORY_GB)
    sharded = strategy == "fsdp"
    dtype = DTYPE_BYTES[spec.model.torch_dtype]
    quantized = q.load_in_4bit or q.load_in_8bit
    # Replicated k-bit training upcasts every unquantized weight to fp32, and the residual stream follows;
    # sharded QLoRA keeps them in the compute dtype (FSDP needs one dtype to gather).
    upcast = quantized and not sharded
    wide = 4 if upcast else dtype

    embedding = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
    linear = arch.params_b * 1e9 - embedding
    if q.load_in_4bit:
        per_linear = 0.5 + _QUANT_CONSTANTS[q.bnb_4bit_use_double_quant]
    else:
        per_linear = 1.0 if q.load_in_8bit else dtype
    weights = (linear * per_linear + embedding * wide) / GB
    trainable = lora_parameters(arch, lora.r, lora.target_modules)
    if lora.modules_to_save and "lm_head" in lora.modules_to_save:
        trainable += arch.vocab * arch.hidden
    state_bytes = next((b for key, b in _STATE_BYTES.items() if key in t.optim), _ADAM_STATE_BYTES)
    lora_state = trainable * state_bytes / GB

    tokens = t.per_device_train_batch_size * t.max_seq_length
    head_dim = arch.hidden // arch.heads
    c_h, c_i = _ACTIVATIONS[4 if dtype == 4 or upcast else 2]  # the upcast layers keep fp32 copies
    layer = tokens * (c_h * arch.hidden + c_i * arch.intermediate + 8 * head_dim + 4 * arch.heads)
    logits = tokens * arch.vocab * _LOGITS_BYTES / GB
    if checkpointing:
        saved = tokens * wide * arch.hidden * arch.layers
        activations = (saved + max(0.0, layer - logits * GB)) / GB
    else:
        activations = layer * arch.layers / GB
    # FSDP gathers one layer's weights at a time, and prefetches the next.
    gathered = 2 * linear * per_linear / arch.layers / GB if sharded else 0.0
    fixed = activations + logits + gathered + RUNTIME_OVERHEAD_GB

    n = gpus if sharded else 1
    rows = {"weights": weights / n, "lora + optimizer": lora_state / n, "activations": activations,
            "logits": logits, "runtime": RUNTIME_OVERHEAD_GB}
    if sharded:
        rows["fsdp gather"] = gathered
    plan = TrainingPlan(mem, assumed, gpus, strategy, checkpointing, rows)
    if not sharded:  # replicated: one GPU each if it fits, else what the same run needs sharded
        plan.min_gpus = 1 if plan.fits else _plan_training(spec, arch, "fsdp", checkpointing).min_gpus
    elif fixed < plan.budget_gb:
        plan.min_gpus = max(1, math.ceil((weights + lora_state) / (plan.budget_gb - fixed)))
    return plan


@dataclass
class ServingPlan:
    gpu_memory_gb: float
    gpu_memory_assumed: bool
    tensor_parallel_size: int
    rows: dict[str, float] = field(default_factory=dict)
    budget_gb: float = 0.0
    min_tensor_parallel_size: int | None = None

    @property
    def per_gpu_gb(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.per_gpu_gb <= self.budget_gb


_SERVE_BYTES = {"awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5, "fp8": 1.0, "compressed-tensors": 1.0}


def plan_serving(spec: LlamaServeSpec, arch: Architecture, context: int) -> ServingPlan:
    """Weights split over the tensor-parallel GPUs plus the KV cache of one full-length sequence."""
    v, res = spec.vllm, spec.resources
    mem = res.gpu_memory_gb or gpu_memory_gb(res.gpu_product)
    assumed = mem is None
    mem = float(mem or DEFAULT_GPU_MEMORY_GB)
    bpp = _SERVE_BYTES.get(v.quantization or "", 4.0 if v.dtype == "float32" else 2.0)
    weights = arch.params_b * 1e9 * bpp / GB
    head_dim = arch.hidden // arch.heads
    kv_per_token = 2 * arch.layers * arch.kv_heads * head_dim * 2
    kv = (v.max_model_len or context) * kv_per_token / GB
    budget = mem * v.gpu_memory_utilization

    def rows(tp: int) -> dict[str, float]:
        return {"weights": weights / tp, "kv cache (1 sequence)": kv / tp, "runtime": RUNTIME_OVERHEAD_GB}

    plan = ServingPlan(mem, assumed, v.tensor_parallel_size, rows(v.tensor_parallel_size), budget)
    for tp in (1, 2, 4, 8, 16, 32, 64):
        if arch.heads % tp == 0 and sum(rows(tp).values()) <= budget:
            plan.min_tensor_parallel_size = tp
            break
    return plan
