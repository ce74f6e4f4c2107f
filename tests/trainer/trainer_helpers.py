"""Helpers shared by the trainer tests: the tiny run's spec, ways to run the trainer, the S3 server's handle."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLAIM = "demo"
MODEL = "models/tiny-llama"
MODEL_NO_PAD = "models/tiny-llama-nopad"
DATASET = "datasets/chat.jsonl"

BASE_MANIFEST: dict[str, Any] = {
    "apiVersion": "llamaops.io/v1alpha1",
    "kind": "LlamaFineTune",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"base_model": f"pvc://{CLAIM}/{MODEL}", "torch_dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {
            "max_steps": 40, "per_device_train_batch_size": 4, "learning_rate": 2e-2, "max_seq_length": 256,
            "gradient_checkpointing": False, "logging_steps": 5, "save_steps": 20, "save_total_limit": 2,
            "warmup_steps": 0, "lr_scheduler_type": "constant",
        },
        "systemPrompt": "You answer in one sentence.",
        "dataset": {"pvc": {"claimName": CLAIM, "path": DATASET}},
        "resources": {"gpusPerNode": 0},
        "output": {"pvc": {"claimName": CLAIM, "path": "out/tiny"}},
    },
}


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a None value deletes the key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def manifest(**spec_patch: Any) -> dict[str, Any]:
    return merge(BASE_MANIFEST, {"spec": spec_patch})


def write_spec(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_in_process(doc: dict[str, Any], tmp_path: Path, output: Path | None = None) -> tuple[int, Path]:
    """Runs the trainer's main in this process (fast: no second torch import). Returns (exit code, output)."""
    from llamaops_trainer.main import run

    out = output or tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", doc)
    return run(["--spec", str(spec), "--output-dir", str(out)]), out


def trainer_command(spec: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "llamaops_trainer", "--spec", str(spec), "--output-dir", str(output)]


def run_subprocess(doc: dict[str, Any], tmp_path: Path, env: dict[str, str], timeout: float = 300,
                   output: Path | None = None) -> subprocess.CompletedProcess:
    out = output or tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", doc)
    return subprocess.run(trainer_command(spec, out), env=env, capture_output=True, text=True, timeout=timeout)


def losses(metrics_file: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in r]


@dataclass(frozen=True)
class S3Server:
    """The S3-compatible server of the tests (the `s3_server` fixture)."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str  # created empty for the session; tests write under their own prefixes

    def env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """This server's credentials in the environment, as the operator passes them."""
        aws_env(monkeypatch, self.access_key, self.secret_key)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}))


def s3_objects(server: S3Server, prefix: str) -> dict[str, bytes]:
    """The objects under prefix, by their key after it."""
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=server.bucket, Key=k)["Body"].read() for k in keys}


def aws_env(monkeypatch: pytest.MonkeyPatch, access_key: str, secret_key: str) -> None:
    """AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and nothing else boto3 could pick up (profiles, instance metadata)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (loopback)
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
