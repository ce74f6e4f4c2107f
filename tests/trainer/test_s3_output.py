"""An S3 output (a real MinIO): each checkpoint and the finished adapter land under the prefix, each with its
COMPLETE marker last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llamaops.api.contract import ADAPTER_DIR, CHECKPOINTS_DIR, COMPLETE_MARKER, EXIT_BAD_CONFIG, RUN_INFO_FILE
from llamaops.api.finetune import OutputSpec
from llamaops_trainer import s3
from llamaops_trainer.errors import BadConfig, Retryable
from llamaops_trainer.export import upload_adapter
from trainer_helpers import S3Server, manifest, run_in_process, s3_objects


@pytest.fixture
def put_keys(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the trainer's S3 clients write, in the order of their requests."""
    keys: list[str] = []
    real = s3.client

    def recording(*args: Any, **kwargs: Any) -> Any:
        client = real(*args, **kwargs)
        for op in ("PutObject", "CreateMultipartUpload"):
            client.meta.events.register(f"before-parameter-build.s3.{op}",
                                        lambda params, **_: keys.append(params["Key"]))
        return client

    monkeypatch.setattr(s3, "client", recording)
    return keys


def test_run_with_s3_output_uploads_the_adapter(s3_env: S3Server, trainer_env: dict[str, str], put_keys: list[str],
                                                tmp_path: Path) -> None:
    prefix = "runs/tiny run/"  # a space: keys are quoted right in path-style URLs
    doc = manifest(training={"max_steps": 2, "save_steps": 2, "logging_steps": 1},
                   output={"pvc": None, "s3": {"uri": f"s3://{s3_env.bucket}/{prefix}", "endpoint": s3_env.endpoint}})
    code, out = run_in_process(doc, tmp_path)
    assert code == 0
    local = {p.name: p.read_bytes() for p in (out / ADAPTER_DIR).iterdir()}
    uploaded = s3_objects(s3_env, f"{prefix}{ADAPTER_DIR}/")
    assert {"adapter_config.json", "adapter_model.safetensors", RUN_INFO_FILE, COMPLETE_MARKER} <= set(uploaded)
    assert uploaded == local, "every file of the adapter, byte for byte"
    assert put_keys[-1] == f"{prefix}{ADAPTER_DIR}/{COMPLETE_MARKER}"
    assert len([k for k in put_keys if k.startswith(f"{prefix}{ADAPTER_DIR}/")]) == len(local)
    # The checkpoint went up first, every file of it, its COMPLETE marker last.
    checkpoint = f"{prefix}{CHECKPOINTS_DIR}/checkpoint-2/"
    saved = {p.name: p.read_bytes() for p in (out / CHECKPOINTS_DIR / "checkpoint-2").iterdir()}
    assert COMPLETE_MARKER in saved and s3_objects(s3_env, checkpoint) == saved
    assert [k for k in put_keys if k.startswith(checkpoint)][-1] == checkpoint + COMPLETE_MARKER


def _adapter(tmp_path: Path) -> Path:
    adapter = tmp_path / ADAPTER_DIR
    adapter.mkdir()
    for name in (COMPLETE_MARKER, "adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text(name)
    return adapter


def test_upload_errors(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    adapter = _adapter(tmp_path)
    missing = OutputSpec.model_validate({"s3": {"uri": "s3://no-such-bucket/runs/", "endpoint": s3_env.endpoint}}).s3
    with pytest.raises(BadConfig, match="spec.output.s3.uri: s3://no-such-bucket/runs/: NoSuchBucket") as e:
        upload_adapter(adapter, missing)
    assert e.value.exit_code == EXIT_BAD_CONFIG
    loc = OutputSpec.model_validate({"s3": {"uri": f"s3://{s3_env.bucket}/x/", "endpoint": s3_env.endpoint}}).s3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(Retryable, match="S3 refused the credentials for s3://.*/x/: SignatureDoesNotMatch"):
        upload_adapter(adapter, loc)
