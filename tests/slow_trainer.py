"""The real trainer entry point with every micro-step slowed, so a test can act while it trains."""

from __future__ import annotations

import sys

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
