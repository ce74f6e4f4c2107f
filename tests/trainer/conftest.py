"""Fixtures for the trainer tests: a tiny Llama with a Llama 3 tokenizer on a fake PVC root.

Nothing is downloaded: the model has random weights and the tokenizer is a small
BPE trained on the synthetic chats (llamaops_trainer.tiny).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from llamaops.api.contract import ENV_NAME, ENV_NAMESPACE, ENV_OUTPUT_DIR, ENV_PVC_ROOT, ENV_SPEC
from llamaops_trainer import tiny
from trainer_helpers import CLAIM, DATASET, MODEL, MODEL_NO_PAD

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


