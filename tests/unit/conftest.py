"""Fixtures of the launcher's unit tests: a state directory and stand-in binaries."""

from __future__ import annotations

import pytest
from llamaops_dev.devcluster.components import BINARIES


@pytest.fixture
def stub_bin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    for name in BINARIES:
        f = d / name
        f.write_text("#!/bin/sh\nexit 1\n")
        f.chmod(0o755)
    return d


@pytest.fixture
def env(tmp_path, stub_bin, monkeypatch):
    """LLAMAOPS_HOME and LLAMAOPS_BIN_DIR of a launcher that cannot start anything."""
    monkeypatch.setenv("LLAMAOPS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMAOPS_BIN_DIR", str(stub_bin))
    for var in ("LLAMAOPS_DEV_CLUSTER_PORT_OFFSET", "LLAMAOPS_DEV_CLUSTER_APISERVER_PORT", "LLAMAOPS_DEV_CLUSTER_KUEUE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"
