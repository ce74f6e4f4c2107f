"""What `pip install '.[operator]'` gives, in a fresh virtual environment: the operator and its CLI, without the
dev tooling (llamaops_dev, its own distribution in operator/dev) or what only that needs (cryptography)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def operator_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("operator-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    # The image's own install: the operator extra, pinned by operator/constraints.txt (pip's cache makes it quick).
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--constraint",
                    REPO / "operator" / "constraints.txt", f"{REPO}[operator]"], check=True, timeout=900)
    return python


def run(python: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")


def test_the_operator_extra_installs_no_dev_tooling_and_no_cryptography(operator_venv: Path) -> None:
    listed = subprocess.run([operator_venv, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "kopf" in names and "llamaops" in names
    assert "cryptography" not in names and "llamaops-dev" not in names and "torch" not in names
    ok = run(operator_venv, "import llamaops.operator, llamaops.handlers, llamaops.cli; print('ok')")
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    dev = run(operator_venv, "import llamaops_dev")
    assert dev.returncode != 0 and "No module named 'llamaops_dev'" in dev.stderr


def test_the_cli_works_there_without_dev_cluster(operator_venv: Path) -> None:
    cli = operator_venv.parent / "llamaops"
    out = subprocess.run([cli, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "validate" in out.stdout and "operator" in out.stdout
    assert "dev-cluster" not in out.stdout
    checked = subprocess.run([cli, "validate", "-f", REPO / "examples"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dev_installs_add_dev_cluster() -> None:
    """This checkout's venv has operator/dev installed: the entry point adds the command."""
    out = subprocess.run([Path(sys.executable).parent / "llamaops", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "dev-cluster" in out.stdout
