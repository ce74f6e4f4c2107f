"""vLLM's own code checks what we hand it (opt-in: vLLM is a multi-gigabyte install in a venv of its own).

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm==0.33.0
    LLAMAOPS_VLLM_PYTHON=/tmp/vllm-venv/bin/python make test

bench/vllm_args.py: our `vllm serve` argument lists parse with vLLM's parser (and a bad rank is refused).
bench/vllm_adapter.py: our trained adapter passes vLLM's PEFT checks and loads, our mounted chat template
renders through vLLM's template code to what the trainer trained on, and adapters vLLM refuses we refuse first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("LLAMAOPS_VLLM_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not (VLLM_PYTHON and Path(VLLM_PYTHON).exists()),
    reason="opt-in: set LLAMAOPS_VLLM_PYTHON to a Python with vllm==0.33.0 installed (a multi-GB venv of its own)")


@pytest.mark.parametrize("script", ["vllm_args.py", "vllm_adapter.py"])
def test_vllm_accepts_what_we_hand_it(script: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), "--vllm-python", VLLM_PYTHON],
                         capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "FAIL" not in out.stdout and " ok " in f" {out.stdout}"
