"""`python -m llamaops_trainer`: one training run, from spec to adapter, ending in a contract exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from llamaops.api.contract import (
    CHECKPOINTS_DIR,
    ENV_OUTPUT_DIR,
    ENV_SPEC,
    EXIT_BAD_CONFIG,
    EXIT_OK,
    EXIT_RETRYABLE,
    METRICS_FILE,
    SPEC_PATH,
    progress_interval,
)

from llamaops_trainer import config as run_config
from llamaops_trainer import distributed
from llamaops_trainer.errors import BadConfig, Interrupted, TrainerError

log = logging.getLogger("llamaops_trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llamaops_trainer", description=__doc__)
    p.add_argument("--spec", default=None,
                   help=f"LlamaFineTune manifest or bare spec (YAML); default ${ENV_SPEC} or {SPEC_PATH}")
    p.add_argument("--output-dir", default=None,
                   help=f"write checkpoints and the adapter here instead of spec.output (also ${ENV_OUTPUT_DIR})")
    return p.parse_args(argv)


def setup_logging(world: distributed.WorldInfo) -> None:
    level = logging.INFO if world.is_main else logging.WARNING
    fmt = f"%(asctime)s rank{world.rank} %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_llamaops", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        handler._llamaops = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # botocore's debug records hold request headers (session tokens): never below WARNING.
    for noisy in ("urllib3", "httpx", "filelock", "botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(argv: list[str] | None = None) -> int:
    """The entry point: torchrun first when PET_* asks for several workers, else one worker."""
    from llamaops_trainer import launch

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)  # --help and argument errors before anything starts
    if launch.needs_launcher():
        return launch.launch(argv)
    ended: dict[str, str] = {}
    code = _worker(args, ended)
    message = ended.get("message", "")
    if code != EXIT_OK and message:
        launch.termination_message(message)
    launch.record_exit(code, message)
    return code


def _worker(args: argparse.Namespace, ended: dict[str, str]) -> int:
    """One training process; `ended["message"]` receives the one-line reason when it fails."""
    world = distributed.from_env()
    setup_logging(world)
    from llamaops_trainer.signals import StopSignal, Terminated

    stop = StopSignal()
    stop.install()
    state: dict[str, Any] = {}
    try:
        return _run(args, world, stop, state)
    except TrainerError as exc:
        message = f"{exc.kind}: {exc}"
        log.log(logging.WARNING if isinstance(exc, Interrupted) else logging.ERROR, "%s", message)
        ended["message"] = message
        return exc.exit_code
    except Terminated as exc:
        log.warning("%s: exiting for a restart", exc)
        ended["message"] = f"interrupted: {exc}"
        return EXIT_RETRYABLE
    except Exception as exc:  # noqa: BLE001 - every other failure is infrastructure until shown otherwise
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(exc, torch.OutOfMemoryError):
            message = ("bad config: spec.training.per_device_train_batch_size: out of GPU memory; lower it or "
                       "max_seq_length, enable gradient_checkpointing, or use 4-bit quantization")
            log.error("%s", message)
            ended["message"] = message
            return EXIT_BAD_CONFIG
        log.exception("training failed; exiting %d so the gang restarts and resumes", EXIT_RETRYABLE)
        ended["message"] = f"retryable: {type(exc).__name__}: {exc}"
        return EXIT_RETRYABLE
    finally:
        reporter = state.get("reporter")
        if reporter is not None:
            reporter.close()
        stop.uninstall()
        distributed.shutdown()


def _run(args: argparse.Namespace, world: distributed.WorldInfo, stop: Any, state: dict[str, Any]) -> int:
    cfg = run_config.load(args.spec, args.output_dir)
    spec = cfg.spec
    out = cfg.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise BadConfig("spec.output", f"cannot write to {out}: permission denied") from None

    from llamaops_trainer import export

    done = export.completed_run(out)
    if done and done.get("spec_hash") == cfg.spec_hash:
        log.info("%s already holds the finished adapter of this spec: nothing to do", out)
        return EXIT_OK
    if done:
        log.warning("%s holds an adapter of another spec; training again and replacing it", out)

    # Heavy imports only now: a bad spec fails in a second, before torch is loaded.
    from transformers import set_seed

    from llamaops_trainer import checkpoints, data, progress, remote_checkpoints, sources, training
    from llamaops_trainer import model as models

    distributed.init(world)
    set_seed(spec.training.seed)
    t0 = time.monotonic()

    model_path = models.fetch_model(spec.model, world)
    tokenizer = models.load_tokenizer(spec.model, model_path)
    records = sources.load_records(spec.dataset, world)
    prepared = data.prepare(records, tokenizer, spec)
    del records

    attn = models.pick_attention(spec.model)
    sharded = models.use_fsdp(spec, model_path, world)
    base = models.load_model(spec, model_path, world, attn, sharded)
    fsdp_layers = models.decoder_layer_classes(base) if sharded else None
    eva_loader = None
    if spec.lora.init_lora_weights == "eva":
        import torch.utils.data

        eva_loader = torch.utils.data.DataLoader(
            [data.to_features([ex]) for ex in prepared.train_examples],
            batch_size=spec.training.per_device_train_batch_size,
            collate_fn=_without_count(data.Collator(tokenizer.pad_token_id, "padded")))
    peft_model = models.apply_lora(base, spec, eva_loader)
    # PiSSA/OLoRA rewrite the base weights in memory; the exported adapter must work on the original
    # base (vLLM serves that), so keep the initial adapter and convert against it at export.
    lora_init = None
    if spec.lora.init_lora_weights in ("pissa", "olora"):
        lora_init = out / "lora_init"  # no dot: peft names an adapter after its directory
        if world.is_main and not (lora_init / "adapter_model.safetensors").is_file():
            export.save_initial_adapter(peft_model, lora_init)

    if spec.training.packing:
        attention: data.Attention = "flat" if attn == "flash_attention_2" else "block"
    else:
        attention = "padded"
    mask_dtype = models.DTYPES[spec.model.torch_dtype] if attn == "eager" else None
    collator = data.Collator(tokenizer.pad_token_id, attention, mask_dtype,
                             pad_to_multiple_of=8 if distributed.use_cuda() else None)

    checkpoints_dir = out / CHECKPOINTS_DIR
    steps = training.planned_steps(spec, len(prepared.train), world)
    targs = training.training_arguments(spec, checkpoints_dir, world, steps, has_eval=bool(prepared.eval),
                                        gradient_checkpointing=models.use_gradient_checkpointing(spec, model_path),
                                        fsdp_layers=fsdp_layers)

    reporter = None
    if world.is_main and cfg.report and cfg.namespace:
        reporter = progress.Reporter(cfg.report, cfg.namespace, interval_s=progress_interval())
        state["reporter"] = reporter
    elif world.is_main:
        log.info("no report ConfigMap named in the environment: progress reporting is off")
    progress_cb = progress.ProgressCallback(out / METRICS_FILE if world.is_main else None, reporter)
    callbacks: list[Any] = [progress_cb, checkpoints.StopOnSignalCallback(stop, world),
                            checkpoints.CompleteCheckpoints(spec.training.save_total_limit)]
    remote = None
    if cfg.s3_output is not None:
        # The staging directory dies with the pod: S3 keeps the checkpoints. After CompleteCheckpoints: it marks them.
        remote = remote_checkpoints.Remote.of(cfg.s3_output)
        callbacks.append(remote_checkpoints.UploadCheckpoints(remote, world, spec.training.save_total_limit))

    trainer = training.LlamaOpsTrainer(
        model=peft_model, args=targs, data_collator=collator, processing_class=tokenizer,
        train_dataset=data.SequenceDataset(prepared.train),
        eval_dataset=data.SequenceDataset(prepared.eval) if prepared.eval else None,
        callbacks=callbacks,
    )
    if world.is_main:
        checkpoints.claim(checkpoints_dir, cfg.spec_hash)
    if remote is not None:
        remote_checkpoints.restore(remote, checkpoints_dir, cfg.spec_hash, world)
    distributed.barrier()
    resume = checkpoints.find_resume_checkpoint(checkpoints_dir)
    if world.is_main:
        progress.append_record(out / METRICS_FILE, {
            "event": "start", "spec_hash": cfg.spec_hash, "world_size": world.world_size,
            "resume_from": Path(resume).name if resume else None, "planned_steps": steps})
    log.info("training: %d step(s) planned, attention %s (%s), %s, %s", steps, attn, attention,
             f"sharded (FSDP over {world.world_size})" if sharded else
             f"replicated (DDP over {world.world_size})" if world.distributed else "one process",
             f"resuming from {resume}" if resume else "starting from step 0")
    result = trainer.train(resume_from_checkpoint=resume)
    log.info("parameters on this rank: %s", training.shard_summary(trainer.model))

    if stop.requested.is_set() and trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(f"stopped at step {trainer.state.global_step} by a termination signal; "
                          "checkpoint saved, the restart resumes from it")

    adapter_state = trainer.adapter_state_dict()  # under FSDP a collective: every rank gathers
    if world.is_main:
        final_loss = progress_cb.last_record.get("loss")
        run_info = {
            "spec_hash": cfg.spec_hash,
            "name": cfg.name, "namespace": cfg.namespace,
            "base_model": spec.model.base_model,
            "system_prompt": spec.system_prompt,
            "lora": {"r": spec.lora.r, "lora_alpha": spec.lora.lora_alpha,
                     "target_modules": spec.lora.target_modules},
            "quantization": spec.quantization.model_dump(mode="json") if spec.quantization.enabled else None,
            "data": prepared.stats.as_dict(),
            "metrics": {
                "global_step": result.global_step,
                "train_loss": result.training_loss,
                "final_loss": final_loss,
                "num_tokens": trainer.state.num_input_tokens_seen,
                "resumed_from": Path(resume).name if resume else None,
                **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            },
            "world_size": world.world_size,
            "parallelism": "fsdp" if sharded else "ddp" if world.distributed else "none",
            "attention": attn, "packing": spec.training.packing,
            "wall_seconds": round(time.monotonic() - t0, 1),
        }
        adapter = export.export_adapter(trainer.model, tokenizer, out, spec.model.base_model, run_info,
                                        convert_from=lora_init, state_dict=adapter_state)
        if cfg.s3_output is not None:
            uri = export.upload_adapter(adapter, cfg.s3_output)
            log.info("adapter uploaded to %s", uri)
        if reporter is not None:
            # The adapter's real rank: PiSSA/OLoRA exports are converted to plain LoRA at twice r,
            # and vLLM's --max-lora-rank must cover it.
            rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
            reported = {"baseModel": spec.model.base_model, "r": rank, "loraAlpha": spec.lora.lora_alpha,
                        "specHash": cfg.spec_hash}
            if cfg.s3_output is not None:
                reported["uri"] = uri
            reporter.report_adapter(reported)
        log.info("done: %s", json.dumps(run_info["metrics"], default=str))
    distributed.barrier()
    return EXIT_OK


def _without_count(collator: Any) -> Any:
    """EVA feeds batches straight to the model: drop the token count the Trainer reads."""
    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        batch = collator(features)
        batch.pop("num_real_tokens", None)
        return batch
    return collate
