"""hack/build-binaries.sh without a Go toolchain fails at once, naming Go."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_missing_go_is_reported(tmp_path):
    # A PATH with only what the script needs before its Go check.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "dirname"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed for this test"
        (tools / tool).symlink_to(found)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"PATH": str(tools), "HOME": str(tmp_path), "LLAMAOPS_CACHE": str(cache)}
    proc = subprocess.run(
        [str(tools / "bash"), str(REPO / "hack" / "build-binaries.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Go" in proc.stderr
    assert "go.dev" in proc.stderr
    assert not any(cache.iterdir())
