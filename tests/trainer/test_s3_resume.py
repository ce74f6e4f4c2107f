"""An S3 run outlives its pod (a real MinIO): a new pod, its emptyDir fresh, resumes from the newest whole
checkpoint the last one uploaded, and passes over checkpoints cut short or written for another spec."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from llamaops.api.contract import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    EXIT_RETRYABLE,
    METRICS_FILE,
    RUN_INFO_FILE,
)
from llamaops.api.finetune import OutputSpec
from llamaops_trainer import distributed, remote_checkpoints, training
from llamaops_trainer.distributed import WorldInfo
from llamaops_trainer.errors import BadConfig
from llamaops_trainer.main import run
from llamaops_trainer.remote_checkpoints import Remote, UploadCheckpoints
from trainer_helpers import S3Server, losses, manifest, s3_objects, write_spec

TRAINING = {"max_steps": 8, "save_steps": 2, "save_total_limit": 2, "logging_steps": 1}


@pytest.fixture
def new_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], Path]:
    """Starts a pod: a fresh /tmp (config.py stages an S3 run under tempfile.gettempdir()); returns the staging."""
    def start(name: str) -> Path:
        tmp = tmp_path / name
        tmp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        return tmp / "llamaops-output" / "default" / "tiny"
    return start


def _die_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node is lost as step `step` ends (after its checkpoint is saved): the pod exits 75."""
    real = training.LlamaOpsTrainer.training_step

    def step_or_die(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step >= step:
            raise RuntimeError("node lost")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(training.LlamaOpsTrainer, "training_step", step_or_die)


def _steps(server: S3Server, prefix: str) -> list[int]:
    names = {key.split("/")[0] for key in s3_objects(server, f"{prefix}{CHECKPOINTS_DIR}/")}
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("checkpoint-"))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _put(server: S3Server, prefix: str, files: dict[str, bytes]) -> None:
    client = server.client()
    for name, body in files.items():
        client.put_object(Bucket=server.bucket, Key=prefix + name, Body=body)


def test_a_new_pod_resumes_from_the_newest_whole_checkpoint_in_s3(
        s3_env: S3Server, trainer_env: dict[str, str], new_pod: Callable[[str], Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = "runs/resume/"
    doc = manifest(training=TRAINING, output={"pvc": None, "s3": {"uri": f"s3://{s3_env.bucket}/{prefix}",
                                                                    "endpoint": s3_env.endpoint}})
    spec = write_spec(tmp_path / "spec.yaml", doc)

    first = new_pod("pod-1")
    with monkeypatch.context() as m:
        _die_after(6, m)
        assert run(["--spec", str(spec)]) == EXIT_RETRYABLE
    # Saved at 2, 4 and 6; S3 keeps the newest save_total_limit, every file of each.
    assert _steps(s3_env, prefix) == [4, 6]
    for step in (4, 6):
        name = f"checkpoint-{step}"
        assert s3_objects(s3_env, f"{prefix}{CHECKPOINTS_DIR}/{name}/") == _files(first / CHECKPOINTS_DIR / name)
    # A newer one whose upload was cut short: every file but its marker.
    cut_short = s3_objects(s3_env, f"{prefix}{CHECKPOINTS_DIR}/checkpoint-6/")
    del cut_short[COMPLETE_MARKER]
    _put(s3_env, f"{prefix}{CHECKPOINTS_DIR}/checkpoint-7/", cut_short)

    second = new_pod("pod-2")
    assert run(["--spec", str(spec)]) == 0
    info = json.loads((second / ADAPTER_DIR / RUN_INFO_FILE).read_text())
    assert info["metrics"]["resumed_from"] == "checkpoint-6"
    assert info["metrics"]["global_step"] == TRAINING["max_steps"]
    assert losses(second / METRICS_FILE)[0][0] == 7, "went on from step 6, not from the start"
    assert _steps(s3_env, prefix) == [6, 8], "the cut-short checkpoint went with the older ones"
    assert COMPLETE_MARKER in s3_objects(s3_env, f"{prefix}{ADAPTER_DIR}/")


def test_restore_fetches_only_whole_checkpoints_of_this_spec(s3_env: S3Server, tmp_path: Path) -> None:
    location = OutputSpec.model_validate(
        {"s3": {"uri": f"s3://{s3_env.bucket}/runs/claimed", "endpoint": s3_env.endpoint}}).s3
    remote = Remote.of(location)
    whole = {"adapter_model.safetensors": b"weights", "optimizer.pt": b"state", "trainer_state.json": b"{}",
             COMPLETE_MARKER: b"{}"}
    checkpoints = f"runs/claimed/{CHECKPOINTS_DIR}/"

    # Another spec's checkpoints are deleted, not resumed, and the prefix becomes this spec's.
    _put(s3_env, checkpoints, {"spec-hash": b"another\n", **{f"checkpoint-4/{k}": v for k, v in whole.items()}})
    assert remote_checkpoints.restore(remote, tmp_path / "pod-1", "mine", WorldInfo()) is None
    assert s3_objects(s3_env, checkpoints) == {"spec-hash": b"mine\n"}

    # This spec's newest whole one is fetched, every file; a newer one without its marker is not.
    _put(s3_env, checkpoints, {f"checkpoint-4/{k}": v for k, v in whole.items()})
    _put(s3_env, checkpoints, {f"checkpoint-6/{k}": v for k, v in whole.items() if k != COMPLETE_MARKER})
    local = tmp_path / "pod-2"
    assert remote_checkpoints.restore(remote, local, "mine", WorldInfo()) == 4
    assert _files(local) == {f"checkpoint-4/{k}": v for k, v in whole.items()}
    # A staging directory already holding it (the same pod running again) fetches nothing.
    assert remote_checkpoints.restore(remote, local, "mine", WorldInfo()) is None




def _saved(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, body in files.items():
        (directory / name).write_bytes(body)
    return directory


def test_two_nodes_upload_their_parts_and_each_fetches_the_whole(s3_env: S3Server, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 saves the checkpoint but for the other node's RNG states, which that node uploads; Trainer reads
    the checkpoint on every rank, so at start each node's local rank 0 fetches all of it into its emptyDir."""
    remote = Remote.of(OutputSpec.model_validate(
        {"s3": {"uri": f"s3://{s3_env.bucket}/runs/nodes", "endpoint": s3_env.endpoint}}).s3)
    sent: list[Any] = []  # what rank 0 broadcasts, as torch.distributed would hand it to the others
    monkeypatch.setattr(distributed, "broadcast_object",
                        lambda value, world: sent.append(value) or value if world.is_main else sent[0])

    def world(rank: int) -> WorldInfo:  # two nodes of two ranks
        return WorldInfo(rank=rank, local_rank=rank % 2, world_size=4, local_world_size=2)

    main = {"adapter_model.safetensors": b"weights", "trainer_state.json": b"{}", "rng_state_0.pth": b"0",
            "rng_state_1.pth": b"1", COMPLETE_MARKER: b'{"step": 4}'}
    other = {"rng_state_2.pth": b"2", "rng_state_3.pth": b"3"}
    remote_checkpoints.claim(remote, "mine")  # as the run's start did
    _saved(tmp_path / "node-0" / "checkpoint-4", main)
    _saved(tmp_path / "node-1" / "checkpoint-4", other)
    for rank, node in ((2, "node-1"), (0, "node-0")):  # on_save's barrier: the other node's part goes first
        UploadCheckpoints(remote, world(rank), keep=1).on_save(
            SimpleNamespace(output_dir=str(tmp_path / node)), SimpleNamespace(global_step=4), None)
    in_s3 = s3_objects(s3_env, remote.checkpoint(4))
    assert in_s3 == {**main, **other}

    assert [remote_checkpoints.restore(remote, tmp_path / f"pod-{rank // 2}", "mine", world(rank))
            for rank in range(4)] == [4, None, 4, None]  # each node's local rank 0 fetches it
    for pod in ("pod-0", "pod-1"):
        assert _files(tmp_path / pod / "checkpoint-4") == in_s3


def test_a_failed_upload_is_logged_and_training_goes_on(s3_env: S3Server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    def save(bucket: str) -> None:
        remote = Remote.of(OutputSpec.model_validate({"s3": {"uri": f"s3://{bucket}/x", "endpoint": s3_env.endpoint}}).s3)
        UploadCheckpoints(remote, WorldInfo(), keep=1).on_save(
            SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=2), None)

    _saved(tmp_path / "checkpoint-2", {"adapter_model.safetensors": b"w", COMPLETE_MARKER: b"{}"})
    with pytest.raises(BadConfig, match="spec.output.s3.uri: s3://no-such-bucket/x: NoSuchBucket"):
        save("no-such-bucket")  # it will not be there for the adapter either
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated")
    save(s3_env.bucket)  # refused credentials may come back: the next checkpoint tries again
    assert "checkpoint-2 not uploaded: S3 refused the credentials" in caplog.text
