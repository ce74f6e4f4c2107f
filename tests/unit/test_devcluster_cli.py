"""The launcher's CLI paths that need no binaries running."""

from __future__ import annotations

import socket

import pytest
from llamaops.cli import app
from llamaops_dev.devcluster import DevClusterError, binaries
from typer.testing import CliRunner


def test_taken_port_fails_before_starting_anything(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(app, ["dev-cluster", "up", "--apiserver-port", str(port)])
    assert result.exit_code == 1
    assert f"{port} (kube-apiserver)" in result.output
    assert "already in use" in result.output
    assert not (env / "dev-cluster" / "run").exists()


def test_status_of_a_cluster_never_started(env):
    result = CliRunner().invoke(app, ["dev-cluster", "status"])
    assert result.exit_code == 1
    assert "kube-apiserver" in result.output and "stopped" in result.output
    assert "(missing)" in result.output


def test_down_without_a_cluster(env):
    result = CliRunner().invoke(app, ["dev-cluster", "down", "--purge"])
    assert result.exit_code == 0
    assert not (env / "dev-cluster").exists()


def test_bin_dir_lacking_a_binary(stub_bin, monkeypatch):
    (stub_bin / "kwok").unlink()
    monkeypatch.setenv("LLAMAOPS_BIN_DIR", str(stub_bin))
    with pytest.raises(DevClusterError, match="lacks kwok"):
        binaries.resolve()


def test_build_script_is_found_in_the_source_tree():
    assert binaries.build_script().is_file()
