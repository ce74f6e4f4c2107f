"""The chaos soak's short variant (bench/chaos.py): 12 runs while the operator is SIGKILLed and restarted, a GPU
node is deleted and re-added, the API server restarts and a Job is deleted by hand; no invariant may break."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]


def test_short_chaos_soak_keeps_every_invariant(tmp_path: Path) -> None:
    if os.environ.get("KUBECONFIG"):
        pytest.skip("the soak deletes nodes and restarts the API server: only on its own local control plane")
    spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = chaos  # its dataclasses look their module up
    spec.loader.exec_module(chaos)  # type: ignore[union-attr]
    report = chaos.soak(runs=12, seconds=45, nodes=4, seed=3, work=tmp_path)
    print(f"faults: {dict(report.faults)}; outcomes: {dict(report.outcomes)}; samples: {report.samples}")
    assert report.faults["operator SIGKILL"] >= 2 and report.faults["API server restart"] == 1
    assert report.faults["GPU node deleted"] == 1 and report.faults["GPU node re-added"] == 1
    assert report.samples > 20
    assert report.violations == []
    assert sum(report.outcomes.values()) == 12
