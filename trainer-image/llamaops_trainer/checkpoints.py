"""Resuming from the newest checkpoint, and checkpointing on SIGTERM.

Kubernetes sends SIGTERM on node drain, preemption or suspend, then SIGKILL
after the pod's grace period (sized by the Job's builder from the measured step
time; the launcher gives the workers that long). The handler (signals.py) only
raises a flag; at the end of the current optimizer step the callback asks Trainer
to save a checkpoint and stop, and main exits with EXIT_RETRYABLE so the gang
restarts and resumes from it. A SIGKILL just costs the steps since the last save.

A checkpoint counts only once its COMPLETE marker is there: written last (CompleteCheckpoints),
after every file of it is on disk, under a temporary name renamed into place. A kill while
saving leaves a directory without it, which is never resumed; the older ones are deleted only
after the new one is complete, so one whole checkpoint is always left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llamaops.api.contract import COMPLETE_MARKER
from transformers import TrainerCallback

from llamaops_trainer import distributed
from llamaops_trainer.distributed import WorldInfo, any_rank
from llamaops_trainer.signals import StopSignal

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Trainer._save_checkpoint's last file: a checkpoint of a trainer that wrote no marker is whole with it.
_STATE_FILE = "trainer_state.json"


# Names the spec (contract.spec_hash) whose run wrote the checkpoints beside it.
SPEC_HASH_FILE = "spec-hash"
# There once a trainer that marks its checkpoints has claimed the directory: from then on, one without
# its marker was cut short. Before, they are an earlier trainer's, adopted by their own test (_legacy_whole).
MARKED_FILE = "complete-markers"


def claim(checkpoints_dir: Path, spec_hash: str) -> bool:
    """Makes checkpoints_dir this spec's, before any rank looks for a checkpoint (rank 0 only).

    Checkpoints of another spec (the trained sections were edited) cannot be resumed by this
    one, whose LoRA shape, data or schedule differ: they are deleted and the run starts over.
    Returns whether any were.
    """
    marker = checkpoints_dir / SPEC_HASH_FILE
    dropped = False
    if checkpoints_dir.is_dir():
        owner = marker.read_text().strip() if marker.is_file() else None
        stale = [p for p in checkpoints_dir.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
        if owner != spec_hash and stale:
            log.warning("checkpoints in %s belong to another spec (%s): starting over",
                        checkpoints_dir, (owner or "unknown")[:12])
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            dropped = True
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec_hash + "\n")
    _adopt_unmarked(checkpoints_dir)
    return dropped


def _checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint-<step> directory, whole or not, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in checkpoints_dir.iterdir()
                  if (m := _CHECKPOINT.match(p.name)) and p.is_dir())


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _legacy_whole(path: Path) -> bool:
    return (path / _STATE_FILE).is_file() and any(path.glob("adapter_model.*"))


def _adopt_unmarked(checkpoints_dir: Path) -> None:
    """Marks, once, the whole checkpoints of a trainer that wrote no marker, so a run upgraded mid-way resumes."""
    flag = checkpoints_dir / MARKED_FILE
    if flag.exists():
        return
    for step, path in _checkpoints(checkpoints_dir):
        if not is_complete(path) and _legacy_whole(path):
            mark_complete(path, step)
    flag.write_text("checkpoints count once their COMPLETE file is written\n")
    _fsync_dir(checkpoints_dir)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # a filesystem without fsync; an I/O error is raised
            raise
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; their renames are durable
        _fsync(path)


def sync_tree(path: Path) -> None:
    """Every file under path, then every directory, on disk (the files this process wrote, on a shared volume)."""
    dirs = [path]
    for item in sorted(path.rglob("*")):
        if item.is_dir():
            dirs.append(item)
        elif item.is_file():
            _fsync(item)
    for d in reversed(dirs):
        _fsync_dir(d)


def mark_complete(path: Path, step: int) -> None:
    """Makes the checkpoint at path count: its files on disk first, then its marker, atomically.

    The marker is written under a temporary name, synced and renamed into place, and the directory
    synced: a crash leaves either no marker or a whole checkpoint with one.
    """
    sync_tree(path)
    tmp = path / f".{COMPLETE_MARKER}.tmp"
    with tmp.open("w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)
    _fsync_dir(path)
    _fsync_dir(path.parent)


def find_resume_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest complete checkpoint (its marker written); one cut short by a kill is passed over."""
    found = _checkpoints(checkpoints_dir)
    complete = [(step, path) for step, path in found if is_complete(path)]
    newest = complete[-1][0] if complete else -1
    cut_short = [path.name for step, path in found if step > newest]
    if cut_short:
        log.warning("%s incomplete (killed while saving?); %s", ", ".join(cut_short),
                    f"resuming from {complete[-1][1].name}" if complete else "starting from step 0")
    return str(complete[-1][1]) if complete else None


def rotate(checkpoints_dir: Path, keep: int) -> list[str]:
    """Deletes all but the newest `keep` (at least one) complete checkpoints, and any incomplete one older than the
    newest complete one (a save cut short). A marker goes first, so a half-deleted checkpoint never counts.
    Returns the names deleted."""
    found = _checkpoints(checkpoints_dir)
    kept = [step for step, path in found if is_complete(path)][-max(1, keep):]
    if not kept:
        return []
    stale = [path for step, path in found if step not in kept and step < kept[-1]]
    for path in stale:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return [path.name for path in stale]


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once every rank has saved its part, then rotates (Trainer's own rotation is
    off: it would delete the previous checkpoint before this one is whole).

    Before any callback that needs whole checkpoints in on_save (remote_checkpoints.UploadCheckpoints).
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Saving again over a checkpoint (the same step): it stops counting before its files change.
        if control.should_save and state.is_world_process_zero:
            (_directory(args, state) / COMPLETE_MARKER).unlink(missing_ok=True)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = _directory(args, state)
        if not state.is_world_process_zero and path.is_dir():
            sync_tree(path)  # its RNG state; rank 0 syncs the rest in mark_complete
        distributed.barrier()
        if state.is_world_process_zero:
            mark_complete(path, state.global_step)
            dropped = rotate(path.parent, self.keep)
            if dropped:
                log.info("deleted %s (save_total_limit %d)", ", ".join(dropped), self.keep)
        distributed.barrier()  # no rank exits (a stop) before the checkpoint counts


def _directory(args: Any, state: Any) -> Path:
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class StopOnSignalCallback(TrainerCallback):
    """Turns the stop flag into save-and-stop at an optimizer-step boundary, on every rank at the same step."""

    def __init__(self, stop: StopSignal, world: WorldInfo) -> None:
        self.stop = stop
        self.world = world
        self.stopped_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop.training = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Ranks may see the signal at different steps; agreeing keeps their collectives in step.
        if any_rank(self.stop.requested.is_set(), self.world):
            self.stop.requested.set()
            control.should_save = True  # even with save_strategy "no": the restart resumes from it
            control.should_evaluate = False  # the grace period is sized for a step and a save, no more
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
