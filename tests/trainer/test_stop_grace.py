"""A stop (SIGTERM to the launcher, as the kubelet sends it) waits for the step in progress and its checkpoint,
however long the step: torchrun's 30 s shutdown timer no longer decides, the stop timeout the Job sets does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llamaops.api.contract import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    ENV_STOP_TIMEOUT,
    EXIT_RETRYABLE,
    METRICS_FILE,
    RUN_INFO_FILE,
)
from llamaops.builders.finetune import TERMINATION_GRACE_SECONDS, stop_timeout
from llamaops_trainer import launch
from llamaops_trainer.checkpoints import find_resume_checkpoint, is_complete
from slow_trainer import slow_workers_site
from trainer_helpers import losses, manifest, run_in_process, write_spec

STEP_S = 45  # past torchrun's 30 s; a 70B step takes 75-130 s
TORCHRUN_DEFAULT_SHUTDOWN_S = 30
SPEC = manifest(training={"max_steps": 3, "save_steps": 100, "logging_steps": 1})


# ---------------------------------------------------------------- the launcher's timing, without a trainer


def test_torchrun_kills_after_30s_unless_the_stop_timeout_raises_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the installed torchrun reads: --shutdown-timeout, i.e. PET_SHUTDOWN_TIMEOUT, which the launcher sets."""
    from torch.distributed.run import config_from_args, parse_args

    def shutdown_timeout(env: dict[str, str]) -> int:
        for var in (launch.ENV_TORCHRUN_SHUTDOWN_TIMEOUT, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        args = parse_args(["--standalone", "--nproc-per-node=1", "-m", "llamaops_trainer"])
        return config_from_args(args)[0].shutdown_timeout

    monkeypatch.delenv(ENV_STOP_TIMEOUT, raising=False)
    assert launch.stop_timeout() is None
    before = launch.torchrun_env("/x", None)
    assert shutdown_timeout({k: v for k, v in before.items() if k.startswith("PET_")}) == TORCHRUN_DEFAULT_SHUTDOWN_S

    monkeypatch.setenv(ENV_STOP_TIMEOUT, str(stop_timeout(TERMINATION_GRACE_SECONDS)))
    env = launch.torchrun_env("/x", launch.stop_timeout())
    assert shutdown_timeout({k: v for k, v in env.items() if k.startswith("PET_")}) == 105
    monkeypatch.setenv(ENV_STOP_TIMEOUT, "soon")
    assert launch.stop_timeout() is None


# A stand-in for torchrun: one worker in a session of its own; a signal to it would exit 99.
FAKE_TORCHRUN = """
import signal, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(99))
sys.exit(worker.wait())
"""
SAVES = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(75)); time.sleep(60)"
HANGS = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def _fake_torchrun(worker: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN, worker])
    deadline = time.monotonic() + 30
    while not launch.child_pids(proc.pid):
        assert time.monotonic() < deadline and proc.poll() is None, "the fake worker did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # its signal handler is set
    return proc


def test_the_launcher_signals_the_workers_not_torchrun() -> None:
    proc = _fake_torchrun(SAVES)
    stopper = launch.Stopper(proc, timeout=30)
    stopper.forward(signal.SIGTERM)
    assert stopper.wait(poll_s=0.1) == EXIT_RETRYABLE and not stopper.expired


def test_the_launcher_kills_workers_still_there_after_the_stop_timeout() -> None:
    proc = _fake_torchrun(HANGS)
    stopper = launch.Stopper(proc, timeout=1)
    start = time.monotonic()
    stopper.forward(signal.SIGTERM)
    assert stopper.wait(poll_s=0.1) != 0 and stopper.expired
    assert 1 <= time.monotonic() - start < 15


# ---------------------------------------------------------------- the real trainer, one step slowed to 45 s


def _launch(tmp_path: Path, env: dict[str, str], timeout_s: int) -> tuple[subprocess.Popen, Path]:
    """The Job's command on CPU: launcher, torchrun, one worker whose second step takes STEP_S."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", SPEC)
    site = slow_workers_site(tmp_path / "site", STEP_S, from_step=1)
    env = {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site), ENV_STOP_TIMEOUT: str(timeout_s)}
    proc = subprocess.Popen([sys.executable, "-m", "llamaops_trainer.launch", "--nnodes=1", "--nproc-per-node=1",
                             "--standalone", "-m", "llamaops_trainer", "--spec", str(spec), "--output-dir", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _sigterm_during_step_2(proc: subprocess.Popen, out: Path, wait_s: float) -> tuple[str, float]:
    """SIGTERM to the launcher once step 1 is logged (step 2 is under way); returns (output, seconds to exit)."""
    deadline = time.monotonic() + 240
    while not ((out / METRICS_FILE).is_file() and losses(out / METRICS_FILE)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"step 1 was never logged:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return output, time.monotonic() - sent


@pytest.mark.slow
def test_slow_45s_step_sigterm_saves_after_30s_and_resumes_with_no_lost_step(tmp_path: Path,
                                                                             trainer_env: dict[str, str]) -> None:
    timeout_s = stop_timeout(TERMINATION_GRACE_SECONDS)  # what the Job sets before a step time is measured
    proc, out = _launch(tmp_path, trainer_env, timeout_s)
    output, took = _sigterm_during_step_2(proc, out, wait_s=timeout_s + 30)
    print(f"exited {proc.returncode} {took:.1f} s after SIGTERM")
    assert proc.returncode == EXIT_RETRYABLE, output[-4000:]
    assert took > TORCHRUN_DEFAULT_SHUTDOWN_S, "the step ran to its end, past torchrun's default timer"
    assert "stopped at step 2 by a termination signal" in output, output[-4000:]
    checkpoint = out / CHECKPOINTS_DIR / "checkpoint-2"
    assert is_complete(checkpoint) and find_resume_checkpoint(out / CHECKPOINTS_DIR) == str(checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert [s for s, _ in losses(out / METRICS_FILE)] == [1, 2]

    code, _ = run_in_process(SPEC, tmp_path, output=out)  # the restarted pod (no slow step)
    assert code == 0
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["metrics"]["resumed_from"] == "checkpoint-2" and info["metrics"]["global_step"] == 3
    # Every step trained once: nothing lost, nothing repeated.
    assert [s for s, _ in losses(out / METRICS_FILE)] == [1, 2, 3]


@pytest.mark.slow
def test_slow_45s_step_with_a_stop_timeout_shorter_than_the_step_saves_nothing(tmp_path: Path,
                                                                               trainer_env: dict[str, str]) -> None:
    """The timeout decides: shorter than the step (as torchrun's 30 s was), the workers are killed mid-step."""
    proc, out = _launch(tmp_path, trainer_env, timeout_s=5)
    output, took = _sigterm_during_step_2(proc, out, wait_s=60)
    print(f"exited {proc.returncode} {took:.1f} s after SIGTERM")
    assert proc.returncode == EXIT_RETRYABLE, output[-4000:]
    assert took < STEP_S - 10
    assert "still running 5 s after the stop signal: killed" in output
    assert find_resume_checkpoint(out / CHECKPOINTS_DIR) is None
    assert [s for s, _ in losses(out / METRICS_FILE)] == [1]
