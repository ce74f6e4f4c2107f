"""Starting and stopping the control-plane processes.

Each process runs in a session (and so a process group) of its own, with its
output in `<state>/logs/<name>.log` and its pid in `<state>/run/<name>.pid`.
Stopping terminates the whole group, then kills it after a grace period, so
nothing a component started is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamaops_dev.devcluster.errors import DevClusterError


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None


def start(spec: ProcessSpec, *, log_file: Path, pid_file: Path, cwd: Path) -> subprocess.Popen:
    """Start `spec` detached from the caller's terminal; its output goes to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if spec.env:
        env.update(spec.env)
    with open(log_file, "wb") as log:
        log.write(("# " + " ".join(spec.argv) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise DevClusterError(f"cannot start {spec.name} ({spec.argv[0]}): {exc}") from exc
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> bool:
    """Collect `pid` if it is a finished child of ours; True when it was."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _argv0(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def is_running(pid: int | None, binary: str | None = None) -> bool:
    """Whether `pid` is a live process (and, where /proc tells, one running `binary`).

    Zombies count as dead; a pid reused by some other program does not count.
    """
    if pid is None or pid <= 0:
        return False
    if _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: the pid was reused
    if sys.platform.startswith("linux"):
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            return False
        if binary is not None:
            argv0 = _argv0(pid)
            if argv0 is not None and Path(argv0).name != Path(binary).name:
                return False
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by `pid` (each process here leads one)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _live_groups(pgids: Iterable[int]) -> set[int]:
    """Which of the process groups `pgids` still hold a process that is not a zombie."""
    candidates = set()
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            continue
        candidates.add(pgid)
    if not candidates or not sys.platform.startswith("linux"):
        return candidates
    # killpg(0) succeeds while only zombies are left in a group.
    live = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) in candidates:
            live.add(int(fields[2]))
    return live


def stop(pids: Iterable[int], *, grace: float = 10.0) -> list[int]:
    """SIGTERM each process group, SIGKILL those still there after `grace`
    seconds; returns the pids that needed SIGKILL."""
    pgids = list(dict.fromkeys(pids))
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    killed: list[int] = []
    deadline = time.monotonic() + grace
    while True:
        for pgid in pgids:
            _reap(pgid)
        left = sorted(_live_groups(pgids))
        if not left:
            break
        if time.monotonic() >= deadline:
            for pgid in left:
                _signal_group(pgid, signal.SIGKILL)
            killed = left
            end = time.monotonic() + 5
            while time.monotonic() < end and _live_groups(left):
                for pgid in left:
                    _reap(pgid)
                time.sleep(0.05)
            break
        time.sleep(0.05)
    for pgid in pgids:
        _reap(pgid)
    return killed


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return f"(no log at {path})\n"
