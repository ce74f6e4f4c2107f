"""Fixtures for the trainer tests: a tiny Llama with a Llama 3 tokenizer on a fake PVC root,
and a real S3-compatible server (MinIO) on loopback.

Nothing is downloaded: the model has random weights and the tokenizer is a small
BPE trained on the synthetic chats (llamaops_trainer.tiny). The minio binary comes
from $LLAMAOPS_BIN_DIR, else hack/build-binaries.sh's cache (built there by
`make binaries`), else PATH; the S3 tests skip without it.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llamaops.api.contract import ENV_NAME, ENV_NAMESPACE, ENV_OUTPUT_DIR, ENV_PVC_ROOT, ENV_SPEC
from llamaops_trainer import tiny
from local_binaries import minio_binary
from trainer_helpers import CLAIM, DATASET, MODEL, MODEL_NO_PAD, S3Server, free_port, http_ok

if importlib.util.find_spec("torch") is None:  # the trainer extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core
    # machine OpenMP threads spinning against other work make steps 10-20x slower.
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pvc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/<claim>/... as the pod sees its claims under contract.PVC_ROOT."""
    root = tmp_path_factory.mktemp("pvc")
    tiny.write_model(root / CLAIM / MODEL)
    tiny.write_model(root / CLAIM / MODEL_NO_PAD, with_pad=False)
    tiny.write_jsonl(root / CLAIM / DATASET, tiny.synthetic_chats(256, seed=0, max_filler=12))
    return root


@pytest.fixture
def trainer_env(pvc_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The environment of a local run: fake PVC root, no status reporting, a private data cache."""
    monkeypatch.setenv(ENV_PVC_ROOT, str(pvc_root))
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path / "data-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses, as pytest_configure does here
    for var in (ENV_NAME, ENV_NAMESPACE, ENV_OUTPUT_DIR, ENV_SPEC, "KUBECONFIG", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return {k: v for k, v in os.environ.items()}


@pytest.fixture(scope="session")
def tokenizer(pvc_root: Path) -> Any:
    from llamaops_trainer.model import configure_padding
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pvc_root / CLAIM / MODEL))
    configure_padding(tok)
    return tok


@pytest.fixture(scope="session")
def tokenizer_no_pad(pvc_root: Path) -> Any:
    from llamaops_trainer.model import configure_padding
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pvc_root / CLAIM / MODEL_NO_PAD))
    configure_padding(tok)
    return tok


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """MinIO on a free loopback port, with generated root credentials and one bucket."""
    binary = minio_binary()
    if binary is None:
        pytest.skip("no minio binary for the S3 tests: `make binaries` (hack/build-binaries.sh, MINIO_VERSION in "
                    "hack/versions.env) builds it; or set LLAMAOPS_BIN_DIR to a directory holding one, or put "
                    "minio on PATH")
    root = tmp_path_factory.mktemp("minio")
    access_key, secret_key = "llamaops-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "AWS_"))}
    env |= {"MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key, "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off", "HOME": str(root)}
    log_path = root / "minio.log"
    for _attempt in range(3):  # a port taken between choosing and binding it: try another
        port = free_port()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(binary), "server", str(root / "data"), "--address", f"127.0.0.1:{port}",
                 "--console-address", f"127.0.0.1:{free_port()}", "--certs-dir", str(root / "certs"), "--quiet"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not http_ok(f"{endpoint}/minio/health/live"):
            time.sleep(0.1)
        if proc.poll() is None and http_ok(f"{endpoint}/minio/health/live"):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"minio did not start; its log:\n{log_path.read_text()[-3000:]}", pytrace=False)
    try:
        server = S3Server(endpoint, access_key, secret_key, "llamaops-test")
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The S3 server with its credentials in the environment and a private data cache."""
    s3_server.env(monkeypatch)
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path / "data-cache"))
    return s3_server
