"""`llamaops run --local` trains examples/tiny-llama-cpu.yaml on the CPU, through the pod's launcher and torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from llamaops.api.contract import ADAPTER_DIR, COMPLETE_MARKER, METRICS_FILE, RUN_INFO_FILE
from trainer_helpers import CLAIM, REPO

EXAMPLE = REPO / "examples" / "tiny-llama-cpu.yaml"


@pytest.fixture
def demo_root(pvc_root: Path, tmp_path: Path) -> Path:
    """The example's claim (llamaops-demo) as the tests' tiny model and dataset."""
    root = tmp_path / "pvc"
    root.mkdir()
    (root / "llamaops-demo").symlink_to(pvc_root / CLAIM, target_is_directory=True)
    return root


def llamaops(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaops", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_run_local_trains_the_cpu_example(nproc: str, demo_root: Path, tmp_path: Path,
                                          trainer_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    proc = llamaops("run", "--local", "-f", str(EXAMPLE), "--pvc-root", str(demo_root), "--output-dir", str(out),
                    "--max-steps", "3", "--set", "training.save_steps=3", "--cpu", "--nproc", nproc,
                    env={**trainer_env, "LLAMAOPS_NAME": "must-not-be-patched", "LLAMAOPS_NAMESPACE": "nowhere"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapter = out / ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / COMPLETE_MARKER).is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    info = json.loads((adapter / RUN_INFO_FILE).read_text())
    assert info["metrics"]["global_step"] == 3 and info["world_size"] == int(nproc)
    assert info["name"] is None  # no object to report to: status reporting was off
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # logging_steps: 1 in the example
    assert f"adapter: {adapter}" in proc.stdout
    assert "progress reporting is off" in proc.stderr

    # The curves of that run, from its directory.
    png = tmp_path / "loss.png"
    plotted = llamaops("plot", str(out), "-o", str(png), env=trainer_env, timeout=120)
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_local_passes_the_trainers_exit_code(demo_root: Path, tmp_path: Path,
                                                 trainer_env: dict[str, str]) -> None:
    """A dataset with no assistant turn: 65 (bad data), as the pod would exit."""
    bad = demo_root / "bad"
    bad.mkdir()
    (bad / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    proc = llamaops("run", "--local", "-f", str(EXAMPLE), "--pvc-root", str(demo_root),
                    "--output-dir", str(tmp_path / "run"), "--set", "dataset.pvc.claimName=bad",
                    "--set", "dataset.pvc.path=chat.jsonl", "--max-steps", "1", "--cpu", env=trainer_env)
    assert proc.returncode == 65, proc.stderr[-3000:]
    assert "the trainer exited 65" in proc.stderr
