"""Loading the base model and tokenizer, and wrapping the model with LoRA (or QLoRA)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from llamaops.api.contract import parse_pvc_uri, pvc_path
from llamaops.api.finetune import FineTuneSpec, LoraSpec, ModelSpec, QuantizationSpec

from llamaops_trainer.distributed import WorldInfo, local_main_first, use_cuda
from llamaops_trainer.errors import BadConfig, Retryable

log = logging.getLogger(__name__)

PAD_TOKEN = "<|finetune_right_pad_id|>"  # Llama 3.1+ (id 128004): a pad that is no real token
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}  # reentrant + DDP + LoRA: "marked ready twice"


def resolve_model_path(base_model: str) -> str:
    """A local directory for pvc:// and absolute paths; a Hub id stays as it is."""
    if base_model.startswith("pvc://"):
        claim, sub = parse_pvc_uri(base_model)
        path = pvc_path(claim, sub or None)
    elif base_model.startswith("/"):
        path = base_model
    else:
        return base_model
    if not Path(path).is_dir():
        raise BadConfig("spec.model.base_model", f"{base_model} is not a model directory (looked at {path})")
    return path


def _hub_error(exc: BaseException) -> BaseException | None:
    """The huggingface_hub error behind an exception (from_pretrained wraps them in OSError), if any."""
    from huggingface_hub import errors as hub

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (hub.RepositoryNotFoundError, hub.GatedRepoError, hub.RevisionNotFoundError,
                             hub.EntryNotFoundError, hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _load(what: str, fn: Any, ref: str, *args: Any, **kwargs: Any) -> Any:
    """Runs a Hub download or from_pretrained: a missing/gated repo or revision is BadConfig, no network Retryable."""
    from huggingface_hub import errors as hub

    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        cause = _hub_error(exc)
        if isinstance(cause, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
            raise Retryable(f"loading the {what} {ref}: the Hub is unreachable and it is not cached") from exc
        if isinstance(cause, hub.GatedRepoError):
            raise BadConfig("spec.hfTokenSecretRef", f"{ref} is gated: the token is missing or lacks access") from None
        if isinstance(cause, hub.RevisionNotFoundError):
            raise BadConfig("spec.model.revision", f"revision not found in {ref}") from None
        if cause is not None or (isinstance(exc, OSError) and (
                "is not a local folder" in str(exc) or "does not appear to have" in str(exc))):
            raise BadConfig("spec.model.base_model", f"cannot load the {what} from {ref}: "
                            + " ".join(str(cause or exc).split())[:300]) from None
        raise


def fetch_model(spec: ModelSpec, world: WorldInfo) -> str:
    """A local directory holding the base model: the PVC or image path, or a Hub snapshot in $HF_HOME.

    Local rank 0 downloads; the other ranks of the node then read the same cache.
    """
    path = resolve_model_path(spec.base_model)
    if path != spec.base_model or spec.base_model.startswith("/"):
        return path
    from huggingface_hub import snapshot_download

    with local_main_first(world):
        return _load("model", snapshot_download, spec.base_model, spec.base_model, revision=spec.revision,
                     token=os.environ.get("HF_TOKEN") or None,
                     # Llama repos also ship the original consolidated.pth weights: not needed here.
                     ignore_patterns=["original/*", "*.pth", "*.gguf"])


def load_tokenizer(spec: ModelSpec, path: str) -> Any:
    from transformers import AutoTokenizer

    tok = _load("tokenizer", AutoTokenizer.from_pretrained, spec.base_model, path,
                trust_remote_code=spec.trust_remote_code)
    configure_padding(tok)
    return tok


def configure_padding(tokenizer: Any) -> str:
    """Right padding with <|finetune_right_pad_id|> where the tokenizer has it, else pad = eos.

    The pad id never decides a label (data.py masks by position), so pad = eos is
    safe here: the real <|eot_id|> keeps its label either way.
    """
    tokenizer.padding_side = "right"
    if PAD_TOKEN in tokenizer.get_vocab():
        tokenizer.pad_token = PAD_TOKEN
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:  # neither: any id will do, since no label depends on it
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer.pad_token


def pick_attention(spec: ModelSpec) -> str:
    if spec.attn_implementation:
        if spec.attn_implementation == "flash_attention_2" and not (use_cuda() and _has_flash_attn()):
            raise BadConfig("spec.model.attn_implementation",
                            "flash_attention_2 needs a CUDA GPU and the flash-attn package in the trainer image")
        return spec.attn_implementation
    return "flash_attention_2" if use_cuda() and _has_flash_attn() else "sdpa"


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def quantization_config(q: QuantizationSpec, world: WorldInfo) -> Any:
    from transformers import BitsAndBytesConfig

    compute = DTYPES[q.bnb_4bit_compute_dtype]
    # Sharded 4-bit weights (FSDP, several GPUs) must be stored in the compute dtype.
    storage = DTYPES[q.bnb_4bit_quant_storage] if q.bnb_4bit_quant_storage else (
        compute if world.world_size > 1 else torch.uint8)
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit, load_in_8bit=q.load_in_8bit,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_quant_storage=storage,
        llm_int8_threshold=q.llm_int8_threshold, llm_int8_skip_modules=q.llm_int8_skip_modules,
        llm_int8_enable_fp32_cpu_offload=q.llm_int8_enable_fp32_cpu_offload,
    )


def memory_plan(spec: FineTuneSpec, path: str) -> Any:
    """The plan `llamaops validate` shows (llamaops.api.memory), for the catalog's architecture or the model's
    own config: it decides gradient checkpointing and replicated vs sharded."""
    from llamaops.api import catalog
    from llamaops.api.memory import architecture, plan_training

    known = catalog.lookup(spec.model.base_model)
    if known is not None:
        arch = known.arch
    else:  # the model's own config: its size counted from it
        c = json.loads((Path(path) / "config.json").read_text())
        arch = architecture(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                            c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"],
                            c["vocab_size"], bool(c.get("tie_word_embeddings")))
    return plan_training(spec, arch)


def use_gradient_checkpointing(spec: FineTuneSpec, path: str) -> bool:
    """The spec's choice, else the memory plan's: on only when the run would not fit the GPU without it.
    A CPU run has no GPU memory to save: off."""
    if spec.training.gradient_checkpointing is not None:
        return spec.training.gradient_checkpointing
    if not use_cuda():
        return False
    return bool(memory_plan(spec, path).gradient_checkpointing)


def use_fsdp(spec: FineTuneSpec, path: str, world: WorldInfo) -> bool:
    """Sharded (FSDP) or replicated (DDP): training.parallelism, else the memory plan's strategy. One process
    has nothing to shard with; a CPU run has no GPU memory to plan, so auto means replicated there."""
    if not world.distributed:
        return False
    if spec.training.parallelism != "auto":
        return spec.training.parallelism == "fsdp"
    return use_cuda() and memory_plan(spec, path).strategy == "fsdp"


def decoder_layer_classes(model: Any) -> list[str]:
    """The classes FSDP wraps one by one (transformers names them in _no_split_modules)."""
    return list(getattr(model, "_no_split_modules", None) or ["LlamaDecoderLayer"])


def load_model(spec: FineTuneSpec, path: str, world: WorldInfo, attn: str, sharded: bool = False) -> Any:
    """`sharded`: the model will be FSDP-wrapped. A quantized one then skips peft's k-bit preparation, which
    upcasts every unquantized weight to fp32: FSDP gathers one dtype, and the upcast is the memory the
    sharded plan does not have (the replicated plan counts it)."""
    from transformers import AutoModelForCausalLM

    m, q = spec.model, spec.quantization
    # `path` is a local directory (fetch_model), so no revision or token here.
    kwargs: dict[str, Any] = dict(trust_remote_code=m.trust_remote_code, dtype=DTYPES[m.torch_dtype],
                                  attn_implementation=attn)
    if q.enabled:
        kwargs["quantization_config"] = quantization_config(q, world)
        if not sharded:  # each rank holds its own copy of the quantized base on its own GPU
            kwargs["device_map"] = {"": world.local_rank if use_cuda() else "cpu"}
    if sharded:
        # Only local rank 0 reads the weights (into CPU memory); the others build the model on the meta device
        # and FSDP broadcasts rank 0's shards to them: no GPU ever holds the whole model, no node holds it twice.
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    model = _load("model", AutoModelForCausalLM.from_pretrained, m.base_model, path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    checkpointing = use_gradient_checkpointing(spec, path)
    log.info("gradient checkpointing %s (%s)", "on" if checkpointing else "off",
             "spec.training.gradient_checkpointing" if spec.training.gradient_checkpointing is not None
             else "the memory plan")
    if q.enabled and not sharded:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
    elif checkpointing:  # a sharded quantized model, like an unquantized one: its weights stay frozen as loaded
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS)
        # The frozen embeddings' outputs need grads for checkpointed blocks to backpropagate into LoRA.
        model.enable_input_require_grads()
    return model


def lora_config(lora: LoraSpec, quantized: bool) -> Any:
    from peft import LoraConfig, TaskType

    init: Any = True if lora.init_lora_weights == "default" else lora.init_lora_weights
    extra: dict[str, Any] = {}
    if init == "loftq":
        if quantized:
            raise BadConfig("spec.lora.init_lora_weights",
                            "loftq quantizes the base model itself: leave spec.quantization off")
        if not use_cuda():
            raise BadConfig("spec.lora.init_lora_weights", "loftq initialisation runs on CUDA: it needs a GPU")
        from peft import LoftQConfig

        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    elif init == "eva":
        from peft import EvaConfig

        extra["eva_config"] = EvaConfig()
    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.lora_alpha, target_modules=targets,
        lora_dropout=lora.lora_dropout, bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save, layers_to_transform=lora.layers_to_transform,
        rank_pattern=lora.rank_pattern or {}, alpha_pattern=lora.alpha_pattern or {},
        init_lora_weights=init, fan_in_fan_out=lora.fan_in_fan_out, **extra,
    )


def apply_lora(model: Any, spec: FineTuneSpec, eva_loader: Any = None) -> Any:
    from peft import get_peft_model

    config = lora_config(spec.lora, spec.quantization.enabled)
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=config.init_lora_weights == "eva")
    except ValueError as exc:  # e.g. target modules not found in the model
        raise BadConfig("spec.lora", " ".join(str(exc).split())[:300]) from None
    if config.init_lora_weights == "eva":
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(peft_model, eva_loader, show_progress_bar=False)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return peft_model
