"""Two processes under torchrun (gloo on CPU) take the same optimizer steps as one at the same global batch."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from llamaops.api.contract import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    EXIT_BAD_DATA,
    EXIT_RETRYABLE,
    RUN_INFO_FILE,
)
from slow_trainer import slow_workers_site
from trainer_helpers import manifest, run_in_process, write_spec


def _steps_and_tokens(out: Path) -> tuple[int, int]:
    info = json.loads((out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    return info["metrics"]["global_step"], info["metrics"]["num_tokens"]


def test_two_process_ddp_matches_single_process_steps(tmp_path: Path, trainer_env: dict[str, str]) -> None:
    # Epoch-based, so the step count comes from how the data is sharded, not from max_steps.
    training = {"max_steps": -1, "num_train_epochs": 2, "gradient_accumulation_steps": 2, "logging_steps": 2,
                "save_steps": 1000}
    single_doc = manifest(training={**training, "per_device_train_batch_size": 4})
    (tmp_path / "single").mkdir()
    code, single_out = run_in_process(single_doc, tmp_path / "single")
    assert code == 0

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    spec = write_spec(ddp_dir / "spec.yaml", manifest(training={**training, "per_device_train_batch_size": 2}))
    # As in the pod: the plain entry point, torchrun's flags from PET_* (the launcher starts torchrun).
    env = {**trainer_env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PET_NPROC_PER_NODE": "2", "PET_STANDALONE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llamaops_trainer", "--spec", str(spec), "--output-dir", str(ddp_dir / "out")],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single_steps, single_tokens = _steps_and_tokens(single_out)
    ddp_steps, ddp_tokens = _steps_and_tokens(ddp_dir / "out")
    print(f"optimizer steps: single {single_steps}, ddp {ddp_steps}; tokens {single_tokens} vs {ddp_tokens}")
    # 256 examples pack into N sequences; global batch 4 x 2 accumulation either way.
    assert ddp_steps == single_steps > 0
    assert ddp_tokens == single_tokens  # every rank's real tokens are counted once
    info = json.loads((ddp_dir / "out" / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    single_info = json.loads((single_out / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["world_size"] == 2
    # Same global batches (DistributedSampler shards the same permutation), so the same mean loss.
    assert abs(info["metrics"]["train_loss"] - single_info["metrics"]["train_loss"]) < 1e-3
    assert (ddp_dir / "out" / ADAPTER_DIR / COMPLETE_MARKER).is_file()
    state = json.loads(next((ddp_dir / "out" / CHECKPOINTS_DIR).glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == ddp_steps
    assert " ERROR " not in proc.stderr


def test_launcher_keeps_contract_exit_codes(tmp_path: Path, trainer_env: dict[str, str], pvc_root: Path) -> None:
    """The Job's command (llamaops_trainer.launch + torchrun's flags): torchrun alone would exit 1 here."""
    bad = pvc_root / "demo" / "ddp-bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    spec = write_spec(tmp_path / "spec.yaml", manifest(dataset={"pvc": {"path": "ddp-bad.jsonl"}}))
    env = {**trainer_env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "llamaops_trainer.launch", "--nnodes=1", "--nproc-per-node=2",
                           "--standalone", "-m", "llamaops_trainer", "--spec", str(spec),
                           "--output-dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_DATA, proc.stderr[-3000:]
    assert "no assistant turn" in proc.stderr


def test_combine_exit_codes() -> None:
    from llamaops_trainer.launch import combine

    assert combine([0, 0], 0) == 0
    assert combine([65, 75], 1) == 65 and combine([75, 64], 1) == 64
    assert combine([0, 75], 1) == 75 and combine([], 1) == 75 and combine([0], 1) == 75




def test_sigterm_to_the_launcher_checkpoints_every_rank_at_one_step(tmp_path: Path,
                                                                     trainer_env: dict[str, str]) -> None:
    site = slow_workers_site(tmp_path / "site", 0.3)
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.yaml", manifest(training={"max_steps": 40, "save_steps": 4, "logging_steps": 1}))
    env = {**trainer_env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PET_NPROC_PER_NODE": "2",
           "PET_STANDALONE": "1", "PYTHONPATH": str(site)}
    proc = subprocess.Popen([sys.executable, "-m", "llamaops_trainer", "--spec", str(spec), "--output-dir", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / CHECKPOINTS_DIR / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 180
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # as the kubelet does, to the container's main process
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == EXIT_RETRYABLE, output[-4000:]
    stops = re.findall(r"rank(\d) WARNING llamaops_trainer: interrupted: stopped at step (\d+)", output)
    assert sorted(r for r, _ in stops) == ["0", "1"], output[-4000:]
    assert len({s for _, s in stops}) == 1, f"ranks stopped at different steps: {stops}"
    step = int(stops[0][1])
    assert (out / CHECKPOINTS_DIR / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()  # every rank's part synced
