"""Writing the finished adapter: whole or not at all.

The adapter is saved into a temporary directory beside <output>/adapter,
renamed into place (atomic on one filesystem), and only then is the COMPLETE
marker written. A LlamaServe that finds COMPLETE can trust every file; a crash
at any point leaves either the old adapter or none, never half of one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llamaops.api.contract import ADAPTER_DIR, COMPLETE_MARKER, RUN_INFO_FILE

from llamaops_trainer import __version__

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with path.open("w") as f:
        json.dump(doc, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def completed_run(output_dir: Path) -> dict[str, Any] | None:
    """llamaops.json of a finished adapter in output_dir, or None."""
    adapter = output_dir / ADAPTER_DIR
    if not (adapter / COMPLETE_MARKER).is_file():
        return None
    try:
        return json.loads((adapter / RUN_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def save_initial_adapter(model: Any, path: Path) -> None:
    """The adapter as initialised (PiSSA/OLoRA), written once, before any training step."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def export_adapter(model: Any, tokenizer: Any, output_dir: Path, base_model: str, run_info: dict[str, Any],
                   convert_from: Path | None = None, state_dict: dict[str, Any] | None = None) -> Path:
    """Saves the LoRA weights (safetensors), tokenizer, chat template and llamaops.json to <output>/adapter.

    With `convert_from` (PiSSA/OLoRA) the weights become a plain LoRA of twice the rank that applies to
    the unmodified base model. `state_dict`: the gathered adapter of a sharded (FSDP) model.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / ADAPTER_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{ADAPTER_DIR}-", dir=output_dir))
    try:
        extra: dict[str, Any] = {"path_initial_model_for_weight_conversion": str(convert_from)} if convert_from else {}
        if state_dict is not None:
            extra["state_dict"] = state_dict
        model.save_pretrained(str(tmp), safe_serialization=True, **extra)
        tokenizer.save_pretrained(str(tmp))
        if getattr(tokenizer, "chat_template", None) and not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        # The id the base is served under (vLLM's --lora-modules base_model_name), not this pod's path.
        config["base_model_name_or_path"] = base_model
        _write_json(config_path, config)
        run_info = {**run_info, "adapter_rank": config.get("r")}
        _write_json(tmp / RUN_INFO_FILE, {
            **run_info, "trainer_version": __version__,
            "completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        })
        for f in tmp.iterdir():
            f.chmod(0o644)  # readable by the serving pod, whatever uid it runs as
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp made it 0700
        _fsync_dir(tmp)
        old = None
        if final.exists():  # a previous export (or one without COMPLETE): move aside, then replace
            old = output_dir / f".{ADAPTER_DIR}-old-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json(final / COMPLETE_MARKER, {"spec_hash": run_info.get("spec_hash"),
                                          "completed_at": dt.datetime.now(dt.UTC).isoformat()})
    _fsync_dir(final)
    log.info("adapter written to %s", final)
    return final


def upload_adapter(adapter: Path, s3_location: Any) -> str:
    """Copies the adapter to s3://bucket/prefix/adapter/, the COMPLETE marker last.

    A reader that finds COMPLETE under the prefix can trust every other file there.
    """
    from llamaops_trainer import s3

    bucket, prefix = s3.directory(s3_location.uri)
    dest = f"s3://{bucket}/{prefix}{ADAPTER_DIR}"
    with s3.errors("spec.output.s3.uri", s3_location.uri):
        client = s3.client(s3_location.endpoint, s3_location.region)
        keys = s3.upload_dir(client, adapter, bucket, f"{prefix}{ADAPTER_DIR}/", last=COMPLETE_MARKER)
    log.info("uploaded %d files to %s", len(keys), dest)
    return dest
