"""Resuming from the newest checkpoint, and checkpointing on SIGTERM.

Kubernetes sends SIGTERM on node drain, preemption or suspend, then SIGKILL
after the grace period (30 s by default). The handler (signals.py) only raises
a flag; at the end of the current optimizer step the callback asks Trainer to
save a checkpoint and stop, and main exits with EXIT_RETRYABLE so the gang
restarts and resumes from it. A SIGKILL just costs the steps since the last save.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from llamaops_trainer.distributed import WorldInfo, any_rank
from llamaops_trainer.signals import StopSignal

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Written last by Trainer._save_checkpoint: without it the checkpoint was cut short.
_STATE_FILE = "trainer_state.json"


# Names the spec (contract.spec_hash) whose run wrote the checkpoints beside it.
SPEC_HASH_FILE = "spec-hash"


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
    return dropped


def _complete(path: Path) -> bool:
    return (path / _STATE_FILE).is_file() and any(path.glob("adapter_model.*"))


def find_resume_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest whole checkpoint: get_last_checkpoint's pick, or an older one if that was cut short by a kill."""
    if not checkpoints_dir.is_dir():
        return None
    last = get_last_checkpoint(str(checkpoints_dir))
    if last is None:
        return None
    if _complete(Path(last)):
        return last
    candidates = sorted(
        (int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir())
    for _, path in reversed(candidates):
        if _complete(path):
            log.warning("%s is incomplete (killed while saving?); resuming from %s", last, path)
            return str(path)
    log.warning("no complete checkpoint in %s; starting from step 0", checkpoints_dir)
    return None


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
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
