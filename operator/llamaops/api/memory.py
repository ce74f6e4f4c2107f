"""GPU memory plans for training and serving, in GB (1e9 bytes) as the seed's VRAM table counts.

Weights follow the seed's table: 2 bytes a parameter in FP16/BF16, 1 in INT8,
0.5 in INT4 (70B: 140 / 70 / 35 GB). Training adds the LoRA parameters with
their fp32 gradients and optimizer state, activations (with or without
gradient checkpointing), the logits of the loss and a fixed runtime overhead.

Gradient checkpointing, unless the spec sets it, is on only when the plan
needs it: the run fits without it costs nothing, while it costs about 1.3-1.4x
the step time. The trainer makes the same decision with the same function.

A plan first tries data parallel (every GPU holds the whole model); when the
model does not fit one GPU it shards weights and LoRA state over all GPUs
(FSDP) and says how many GPUs that needs.
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


def architecture(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 tied_embeddings: bool = False) -> Architecture:
    """An Architecture from a model's config (a model the catalog does not know), its size counted from it."""
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if tied_embeddings else 2)
    return Architecture((per_layer * layers + embeddings) / 1e9, hidden, layers, heads, kv_heads, intermediate, vocab)


def weight_bytes_per_param(load_in_4bit: bool = False, load_in_8bit: bool = False) -> float:
    return 0.5 if load_in_4bit else 1.0 if load_in_8bit else 2.0


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
    chosen = spec.training.gradient_checkpointing
    if chosen is not None:
        return _plan_training(spec, arch, chosen)
    without = _plan_training(spec, arch, False)
    return without if without.fits else _plan_training(spec, arch, True)


def _plan_training(spec: FineTuneSpec, arch: Architecture, checkpointing: bool) -> TrainingPlan:
    res, q, t, lora = spec.resources, spec.quantization, spec.training, spec.lora
    gpus = max(res.total_gpus, 1)
    mem = res.gpu_memory_gb or gpu_memory_gb(res.gpu_product)
    assumed = mem is None
    mem = float(mem or DEFAULT_GPU_MEMORY_GB)

    weights = arch.params_b * 1e9 * weight_bytes_per_param(q.load_in_4bit, q.load_in_8bit) / GB
    trainable = lora_parameters(arch, lora.r, lora.target_modules)
    if lora.modules_to_save and "lm_head" in lora.modules_to_save:
        trainable += arch.vocab * arch.hidden
    state_bytes = next((b for key, b in _STATE_BYTES.items() if key in t.optim), _ADAM_STATE_BYTES)
    lora_state = trainable * state_bytes / GB

    tokens = t.per_device_train_batch_size * t.max_seq_length
    if checkpointing:
        # one bf16 hidden state kept per layer, plus one layer's recompute working set
        activations = tokens * arch.hidden * 2 * arch.layers + tokens * (10 * arch.hidden + 4 * arch.intermediate) * 2
    else:
        activations = tokens * arch.hidden * 34 * arch.layers  # SDPA/flash: no seq^2 term
    logits = tokens * arch.vocab * 8  # bf16 logits, their fp32 upcast and its gradient
    fixed = activations / GB + logits / GB + RUNTIME_OVERHEAD_GB
    sharded = weights + lora_state

    def rows(n: int) -> dict[str, float]:
        return {"weights": weights / n, "lora + optimizer": lora_state / n,
                "activations": activations / GB, "logits": logits / GB, "runtime": RUNTIME_OVERHEAD_GB}

    plan = TrainingPlan(mem, assumed, gpus, "ddp", checkpointing, rows(1))
    budget = plan.budget_gb
    if fixed >= budget:
        plan.min_gpus = None
    else:
        plan.min_gpus = max(1, math.ceil(sharded / (budget - fixed)))
    if not plan.fits and gpus > 1:
        plan.strategy, plan.rows = "fsdp", rows(gpus)
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
