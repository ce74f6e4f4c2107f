"""Binaries the tests run that hack/ builds into the cache: found, never built here (that takes minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cached_binary(name: str, env_dir: str, script: str) -> Path | None:
    """$<env_dir>/<name>, else the one `hack/<script> --cached` reports, else <name> on PATH; None without one."""
    dirs = [os.environ[env_dir]] if os.environ.get(env_dir) else []
    try:
        proc = subprocess.run(["bash", str(REPO / "hack" / script), "--cached"], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode == 0 and proc.stdout.strip():
            dirs.append(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired):
        pass
    for d in dirs:
        if os.access(Path(d) / name, os.X_OK):
            return Path(d) / name
    found = shutil.which(name)
    return Path(found) if found else None


def minio_binary() -> Path | None:
    """MinIO, the S3-compatible server of the trainer's S3 tests (hack/build-binaries.sh)."""
    return cached_binary("minio", "LLAMAOPS_BIN_DIR", "build-binaries.sh")


def ollama_binary() -> Path | None:
    """Ollama, the CPU server of the Ollama serving tests (hack/build-ollama.sh; `make test` sets
    LLAMAOPS_OLLAMA_BIN_DIR)."""
    return cached_binary("ollama", "LLAMAOPS_OLLAMA_BIN_DIR", "build-ollama.sh")
