"""Killed mid-run, the trainer resumes from its newest checkpoint and still ends at max_steps."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from llamaops.api.contract import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    EXIT_RETRYABLE,
    METRICS_FILE,
    RUN_INFO_FILE,
)
from llamaops_trainer.checkpoints import (
    SPEC_HASH_FILE,
    claim,
    find_resume_checkpoint,
    is_complete,
    mark_complete,
    rotate,
)
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
    state = out / CHECKPOINTS_DIR / f"checkpoint-{step}" / COMPLETE_MARKER
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
    newest = max(s for s in _steps(out) if is_complete(out / CHECKPOINTS_DIR / f"checkpoint-{s}"))
    assert 8 <= newest < MAX_STEPS
    # A checkpoint cut short by the kill (no COMPLETE marker) must be passed over.
    partial = out / CHECKPOINTS_DIR / f"checkpoint-{newest + 4}"
    if not partial.exists():
        partial.mkdir()
        (partial / "adapter_model.safetensors").write_bytes(b"")
    assert find_resume_checkpoint(out / CHECKPOINTS_DIR) == str(out / CHECKPOINTS_DIR / f"checkpoint-{newest}")
    import shutil

    shutil.rmtree(partial)  # Trainer would otherwise refuse to write over it at that step
    _resume_and_finish(tmp_path, out, newest)


def _saved(directory: Path, step: int, complete: bool) -> Path:
    """A checkpoint as Trainer leaves it (trainer_state.json last), marked complete or cut short before."""
    d = directory / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    (d / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(d, step)
    return d


def test_find_resume_checkpoint_takes_the_newest_marked_one(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path / "none") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        _saved(tmp_path, step, complete)
    # checkpoint-15 has every file of Trainer's but no marker: killed before it was synced and marked.
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    marker = tmp_path / "checkpoint-10" / COMPLETE_MARKER
    assert json.loads(marker.read_text()) == {"step": 10}
    assert not list(tmp_path.rglob(f"*{COMPLETE_MARKER}.tmp")), "written under a temporary name, renamed"
    (tmp_path / "checkpoint-5" / COMPLETE_MARKER).unlink()
    (tmp_path / "checkpoint-10" / COMPLETE_MARKER).unlink()
    assert find_resume_checkpoint(tmp_path) is None


def test_rotation_keeps_a_complete_checkpoint_whatever_the_limit(tmp_path: Path) -> None:
    """Older checkpoints go only after the new one is marked: with save_total_limit 1, a kill while saving
    checkpoint-6 still leaves checkpoint-4 to resume from."""
    _saved(tmp_path, 2, True)
    _saved(tmp_path, 3, False)  # cut short earlier: garbage once a newer one is complete
    _saved(tmp_path, 4, True)
    assert rotate(tmp_path, keep=1) == ["checkpoint-2", "checkpoint-3"]
    _saved(tmp_path, 6, False)  # being saved, or killed while saving: not marked yet
    assert rotate(tmp_path, keep=1) == []
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    mark_complete(tmp_path / "checkpoint-6", 6)
    assert rotate(tmp_path, keep=1) == ["checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


def test_claim_adopts_checkpoints_of_a_trainer_that_wrote_no_marker_once(tmp_path: Path) -> None:
    """A run upgraded mid-way resumes from what the earlier trainer saved (trainer_state.json was its last file);
    once claimed by this trainer, a checkpoint without its marker is one cut short."""
    _saved(tmp_path, 4, False)
    d = tmp_path / "checkpoint-8"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"x")  # the earlier trainer was killed before trainer_state.json
    (tmp_path / SPEC_HASH_FILE).write_text("hash\n")  # this spec's
    claim(tmp_path, "hash")
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    _saved(tmp_path, 12, False)
    claim(tmp_path, "hash")
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")


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
