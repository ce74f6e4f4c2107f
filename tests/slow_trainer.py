"""The real trainer entry point with every micro-step slowed, so a test can act while it trains."""

from __future__ import annotations

import sys
from pathlib import Path

_SCRIPT = """
import sys, time
from llamaops_trainer import training
step = training.LlamaOpsTrainer.training_step
def slow(self, *args, **kwargs):
    time.sleep({delay})
    return step(self, *args, **kwargs)
training.LlamaOpsTrainer.training_step = slow
from llamaops_trainer.main import run
sys.exit(run())
"""


def slow_trainer_command(delay_s: float, *args: str) -> list[str]:
    """`python -m llamaops_trainer ARGS`, each micro-step taking `delay_s` longer."""
    return [sys.executable, "-c", _SCRIPT.format(delay=delay_s), *args]


_SLOW_WORKERS = """
import os
if os.environ.get("LOCAL_RANK") is not None:  # torchrun's workers, not its agent
    import time
    from llamaops_trainer import training
    _step = training.LlamaOpsTrainer.training_step
    def slow(self, *args, **kwargs):
        if self.state.global_step >= {from_step}:
            time.sleep({delay})
        return _step(self, *args, **kwargs)
    training.LlamaOpsTrainer.training_step = slow
"""


def slow_workers_site(directory: Path, delay_s: float, from_step: int = 0) -> Path:
    """A directory for PYTHONPATH whose sitecustomize makes each torchrun worker's micro-steps take `delay_s`
    longer from optimizer step `from_step + 1` on: inside the step, between Trainer's on_step_begin and
    on_step_end, as a slow model's forward and backward would be."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_SLOW_WORKERS.format(delay=delay_s, from_step=from_step))
    return directory
