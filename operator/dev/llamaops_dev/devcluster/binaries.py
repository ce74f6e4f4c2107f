"""Where the control-plane binaries come from: `$LLAMAOPS_BIN_DIR`, else the
repository's `hack/build-binaries.sh` (which builds them once into a cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llamaops_dev.devcluster.components import BINARIES
from llamaops_dev.devcluster.errors import DevClusterError

BIN_DIR_ENV = "LLAMAOPS_BIN_DIR"


def build_script() -> Path:
    """`hack/build-binaries.sh` of the source tree this package is in."""
    return Path(__file__).resolve().parents[4] / "hack" / "build-binaries.sh"


def missing(bin_dir: Path, names: tuple[str, ...] = BINARIES) -> list[str]:
    return [n for n in names if not os.access(bin_dir / n, os.X_OK)]


def resolve(bin_dir: Path | str | None = None) -> Path:
    """The directory holding etcd, kube-apiserver, ..., kwok and kubectl."""
    source = "the bin_dir argument"
    if bin_dir is None and os.environ.get(BIN_DIR_ENV):
        bin_dir, source = os.environ[BIN_DIR_ENV], f"${BIN_DIR_ENV}"
    if bin_dir is None:
        script = build_script()
        if not script.is_file():
            raise DevClusterError(
                f"no control-plane binaries: set {BIN_DIR_ENV} to a directory holding {', '.join(BINARIES)} "
                f"(the build script {script} is not there to build them)"
            )
        print(f"dev-cluster: locating binaries with {script} (builds them on first use, takes minutes)", file=sys.stderr)
        # The script's progress goes to our stderr; its last stdout line is the directory.
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise DevClusterError(f"{script} failed (exit code {proc.returncode}); see its messages above")
        bin_dir, source = lines[-1], str(script)
    path = Path(bin_dir).expanduser()
    if not path.is_dir():
        raise DevClusterError(f"binary directory {path} (from {source}) does not exist")
    lacking = missing(path)
    if lacking:
        raise DevClusterError(f"binary directory {path} (from {source}) lacks {', '.join(lacking)}")
    return path.resolve()
