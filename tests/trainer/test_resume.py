"""Killed mid-run, the trainer resumes from its newest checkpoint and still ends at max_steps."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from llamaops.api.contract import ADAPTER_DIR, CHECKPOINTS_DIR, EXIT_RETRYABLE, METRICS_FILE, RUN_INFO_FILE
from llamaops_trainer.checkpoints import find_resume_checkpoint
from slow_trainer import slow_trainer_command
from trainer_helpers import losses, manifest, merge, run_in_process, write_spec

MAX_STEPS = 24


def _start(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    doc = manifest(training={"max_steps": MAX_STEPS, "save_steps": 4, "logging_steps": 1, "save_total_limit": 3})
    spec = write_spec(tmp_path / "spec.yaml", doc)
    out = tmp_path / "out"
    proc = subprocess.Popen(slow_trainer_command(0.25, "--spec", str(spec), "--output-dir", str(out)),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    state = out / CHECKPOINTS_DIR / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.monotonic() + timeout
    while not state.is_file():
        if proc.poll() is not None:
            pytest.fail(f"trainer exited {proc.returncode} before checkpoint-{step}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint-{step} after {timeout}s")
        time.sleep(0.05)


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / CHECKPOINTS_DIR).glob("checkpoint-*"))


def _resume_and_finish(tmp_path: Path, out: Path, newest: int) -> None:
    logged_before = len(losses(out / METRICS_FILE))
    code, _ = run_in_process(manifest(training={"max_steps": MAX_STEPS, "save_steps": 4, "logging_steps": 1,
                                                "save_total_limit": 3}), tmp_path, output=out)
    assert code == 0
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["metrics"]["resumed_from"] == f"checkpoint-{newest}"
    assert info["metrics"]["global_step"] == MAX_STEPS
    state = json.loads((out / CHECKPOINTS_DIR / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS and state["max_steps"] == MAX_STEPS
    second_run = losses(out / METRICS_FILE)[logged_before:]
    # The second run went on from the checkpoint: its first logged step follows it, never step 1.
    assert second_run[0][0] == newest + 1, second_run[:3]
    assert [s for s, _ in second_run][-1] == MAX_STEPS


def test_sigterm_saves_a_checkpoint_exits_75_and_resumes(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    proc, out = _start(tmp_path, trainer_env)
    _wait_for_checkpoint(proc, out, 4)
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == EXIT_RETRYABLE, output[-3000:]
    assert "termination signal" in output and "Traceback" not in output
    newest = _steps(out)[-1]
    assert 4 <= newest < MAX_STEPS
    # The stop saved a checkpoint at the step it stopped on, not only at the last save_steps multiple.
    stopped = [s for s, _ in losses(out / METRICS_FILE)][-1]
    assert newest == stopped, (newest, stopped)
    assert not (out / ADAPTER_DIR).exists()
    _resume_and_finish(tmp_path, out, newest)


def test_sigkill_resumes_from_the_newest_complete_checkpoint(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    proc, out = _start(tmp_path, trainer_env)
    _wait_for_checkpoint(proc, out, 8)
    proc.kill()
    proc.wait(timeout=30)
    newest = max(s for s in _steps(out) if (out / CHECKPOINTS_DIR / f"checkpoint-{s}" / "trainer_state.json").is_file())
    assert 8 <= newest < MAX_STEPS
    # A checkpoint cut short by the kill (no trainer_state.json) must be passed over.
    partial = out / CHECKPOINTS_DIR / f"checkpoint-{newest + 4}"
    if not partial.exists():
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_bytes(b"")
    assert find_resume_checkpoint(out / CHECKPOINTS_DIR) == str(out / CHECKPOINTS_DIR / f"checkpoint-{newest}")
    import shutil

    shutil.rmtree(partial)  # Trainer would otherwise refuse to write over it at that step
    _resume_and_finish(tmp_path, out, newest)


def test_find_resume_checkpoint(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "none") is None
    for step, whole in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if whole:
            (d / "trainer_state.json").write_text("{}")
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_checkpoints_of_an_edited_spec_are_not_resumed(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    """The trained sections changed (the spec hash): start over. Only scheduling changed: resume."""
    out = tmp_path / "out"
    first = manifest(training={"max_steps": 8, "save_steps": 4, "logging_steps": 1})
    assert run_in_process(first, tmp_path, output=out)[0] == 0
    (out / ADAPTER_DIR / "COMPLETE").unlink()  # as if it had been stopped before exporting

    moved = merge(first, {"spec": {"resources": {"cpu": "2"}, "training": {"max_steps": 8}}})
    assert run_in_process(moved, tmp_path, output=out)[0] == 0
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["metrics"]["resumed_from"] == "checkpoint-8"
    (out / ADAPTER_DIR / "COMPLETE").unlink()

    edited = merge(first, {"spec": {"training": {"learning_rate": 1e-2}}})
    assert run_in_process(edited, tmp_path, output=out)[0] == 0
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["metrics"]["resumed_from"] is None and info["metrics"]["global_step"] == 8
    starts = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if '"event"' in line]
    assert [s["resume_from"] for s in starts] == [None, "checkpoint-8", None]
    assert (out / CHECKPOINTS_DIR / "spec-hash").read_text().strip() == info["spec_hash"]
