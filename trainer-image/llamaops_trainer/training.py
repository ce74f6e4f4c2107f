"""TrainingArguments from spec.training, and the Trainer that counts real tokens."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import torch
from llamaops.api.finetune import FineTuneSpec
from transformers import Trainer, TrainingArguments

from llamaops_trainer.distributed import WorldInfo, backend, use_cuda
from llamaops_trainer.errors import BadConfig
from llamaops_trainer.model import GRADIENT_CHECKPOINTING_KWARGS


def planned_steps(spec: FineTuneSpec, sequences: int, world: WorldInfo) -> int:
    """Optimizer steps of the run, as Trainer will count them."""
    t = spec.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(sequences / (t.per_device_train_batch_size * world.world_size))
    per_epoch = max(1, math.ceil(batches / t.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * t.num_train_epochs))


def use_bf16(spec: FineTuneSpec) -> bool:
    t = spec.training
    if t.bf16 is not None:
        return t.bf16
    # Unset: on where the GPU has it; fp16 wins when the user asked for it.
    return not t.fp16 and use_cuda() and torch.cuda.is_bf16_supported()


def fsdp_config(layer_classes: list[str]) -> dict[str, Any]:
    """FSDP2, full shard: each decoder layer its own unit (gathered when it runs, resharded after), the frozen
    base and the LoRA parameters in the same units (FSDP2 shards per parameter, so requires_grad may differ).
    Checkpoints gather only the trainable (adapter) parameters: a 70B base is never written per save. The
    weights come from rank 0 (model.load_model loads them there only) and are broadcast as shards."""
    return {"version": 2, "transformer_layer_cls_to_wrap": layer_classes, "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True}


def training_arguments(spec: FineTuneSpec, checkpoints_dir: Path, world: WorldInfo, steps: int,
                       has_eval: bool, gradient_checkpointing: bool | None = None,
                       fsdp_layers: list[str] | None = None) -> TrainingArguments:
    """`gradient_checkpointing`: model.use_gradient_checkpointing's decision (default: the spec's, off if unset).
    `fsdp_layers`: the model's decoder layer classes when the run is sharded (model.use_fsdp), else None."""
    t = spec.training
    checkpointing = bool(t.gradient_checkpointing) if gradient_checkpointing is None else gradient_checkpointing
    scheduler_kwargs: dict[str, Any] = {}
    if t.lr_scheduler_type == "cosine_with_min_lr":
        scheduler_kwargs = {"min_lr_rate": 0.1}
    elif t.lr_scheduler_type == "warmup_stable_decay":
        scheduler_kwargs = {"num_decay_steps": max(1, steps // 10)}
    # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio).
    warmup: float = t.warmup_steps if t.warmup_steps > 0 else min(t.warmup_ratio, 0.999)
    eval_strategy = t.eval_strategy if has_eval else "no"
    trackers = report_to(spec, checkpoints_dir.parent)
    try:
        return _arguments(t, checkpoints_dir, world, spec, warmup, scheduler_kwargs, eval_strategy, checkpointing,
                          trackers, fsdp_layers)
    except ValueError as exc:  # TrainingArguments checks combinations (precision, strategies) itself
        raise BadConfig("spec.training", " ".join(str(exc).split())[:300]) from None


def _arguments(t: Any, checkpoints_dir: Path, world: WorldInfo, spec: FineTuneSpec, warmup: float,
               scheduler_kwargs: dict[str, Any], eval_strategy: str, checkpointing: bool,
               trackers: list[str], fsdp_layers: list[str] | None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs,
        optim=t.optim,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=checkpointing,  # transformers 5's name for gradient checkpointing
        activation_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS,
        bf16=use_bf16(spec),
        fp16=t.fp16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=None,  # checkpoints.CompleteCheckpoints rotates, once the new checkpoint is complete
        save_only_model=False,  # optimizer, scheduler and RNG state are what make resume exact
        eval_strategy=eval_strategy,
        eval_steps=(t.eval_steps or t.logging_steps) if eval_strategy == "steps" else None,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=use_cuda(),
        remove_unused_columns=False,  # our collator's keys are the model's inputs
        include_num_input_tokens_seen="non_padding",
        use_cpu=not use_cuda(),
        ddp_backend=backend() if world.distributed else None,
        ddp_find_unused_parameters=False,  # LoRA leaves frozen params without grads by design
        fsdp=bool(fsdp_layers) or None,
        fsdp_config=fsdp_config(fsdp_layers) if fsdp_layers else None,
        report_to=trackers or "none",
        disable_tqdm=True,  # pod logs are read line by line
        log_level="warning",  # info dumps whole model configs; our own log says what matters
        log_level_replica="error",
    )


TENSORBOARD_DIR = "tensorboard"  # beside metrics.jsonl in the run's output directory
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def report_to(spec: FineTuneSpec, output_dir: Path) -> list[str]:
    """training.report_to, each tracker's package checked (a missing one is a config error naming the field);
    TensorBoard writes its event files to <output>/tensorboard, beside metrics.jsonl."""
    trackers = list(dict.fromkeys(spec.training.report_to))
    for name in trackers:
        if not any(importlib.util.find_spec(p) for p in _TRACKER_PACKAGES[name]):
            raise BadConfig("spec.training.report_to", f"{name} is not installed in the trainer image; use an image "
                                                       f"with it, or remove it from report_to")
    if "tensorboard" in trackers:
        # transformers' TensorBoard callback reads its directory from here (default: under the checkpoints).
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(output_dir / TENSORBOARD_DIR)
    return trackers


class LlamaOpsTrainer(Trainer):
    """Trainer whose token count is the collator's count of real (non-pad) tokens, and whose FSDP checkpoints
    hold the adapter only.

    With a 4D block mask the attention_mask no longer counts tokens, and packing
    leaves almost no pads: "tokens seen" must mean trained tokens on either path.
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if self.args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate turns FSDP on for accelerators only; FSDP2 itself runs on CPU over gloo, which is how
            # the sharded path (the same fully_shard calls, checkpoints and resume) is tested without a GPU.
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def adapter_state_dict(self) -> dict[str, Any] | None:
        """Under FSDP: the trainable parameters gathered whole, on the CPU (a collective: every rank calls it).
        Else None (the model's own state dict is whole)."""
        if not self.is_fsdp_enabled:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        gathered = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                             ignore_frozen_params=True))
        # A copy: on the CPU the gathered tensors can share storage FSDP frees when it reshards.
        return {k: v.detach().to("cpu", copy=True) for k, v in gathered.items()}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # accelerate loads on rank 0 and broadcasts with an empty dict elsewhere, which torch's loader skips on
        # the other ranks (rank 0 then waits forever). The saved adapter is small: every rank reads it whole and
        # keeps its own shard.
        from accelerate.utils.constants import FSDP_MODEL_NAME
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = torch.load(Path(resume_from_checkpoint) / f"{FSDP_MODEL_NAME}.bin", weights_only=True)
        set_model_state_dict(model if model is not None else self.model_wrapped, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # Trainer would gather the whole model (frozen base included) onto rank 0 for every checkpoint.
        state = self.adapter_state_dict()
        self._save(output_dir or self.args.output_dir, state_dict=state)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != "num_real_tokens"}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != "num_real_tokens"}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        real = inputs.get("num_real_tokens")
        if real is None:
            return super()._track_num_input_tokens(inputs)
        n = torch.as_tensor(real, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()


def shard_summary(model: Any) -> str:
    """This rank's share of the parameters (FSDP2 holds each as a DTensor whose local part is the shard), and
    the dtypes of the frozen and the trainable ones (a sharded QLoRA keeps the frozen ones in the compute dtype)."""
    local = whole = 0
    dtypes: dict[bool, set[str]] = {False: set(), True: set()}
    for p in model.parameters():
        part = p.to_local() if hasattr(p, "to_local") else p
        local += part.numel() * part.element_size()
        whole += p.numel() * p.element_size()
        dtypes[p.requires_grad].add(str(p.dtype).removeprefix("torch."))
    return (f"{local / 1e6:.2f} of {whole / 1e6:.2f} MB of parameters ({100 * local / max(whole, 1):.0f}%); "
            f"frozen {','.join(sorted(dtypes[False]))}; trainable {','.join(sorted(dtypes[True]))}")
