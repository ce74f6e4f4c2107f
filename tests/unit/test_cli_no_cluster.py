"""The cluster commands with no reachable cluster: one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaops", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.mark.parametrize("args", [["watch", "x"], ["queue"], ["logs", "x"]])
def test_unreachable_cluster(args: list[str], tmp_path: Path) -> None:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "x",
              "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:1"}}],
              "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x", "namespace": "team"}}],
              "users": [{"name": "x", "user": {"token": "t"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "KUBECONFIG": str(path)}
    result = _run(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"llamaops {args[0]}: error: cannot reach the cluster"), result.stderr
    assert "Traceback" not in result.stderr


def test_no_kubeconfig_at_all(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(tmp_path)
    result = _run("queue", env=env)
    assert result.returncode == 2 and "no kubeconfig" in result.stderr, result.stderr


def test_the_contexts_namespace_is_the_default(tmp_path: Path) -> None:
    from llamaops.kube import current_namespace

    config = {"apiVersion": "v1", "kind": "Config", "current-context": "a",
              "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
              "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
                           {"name": "b", "context": {"cluster": "c", "user": "u"}}],
              "users": [{"name": "u", "user": {}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    assert current_namespace(str(path)) == "team-a"
    assert current_namespace(str(path), "b") == "default"
