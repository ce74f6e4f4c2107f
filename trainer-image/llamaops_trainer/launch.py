"""torchrun, wrapped so the contract's exit codes survive it.

torchrun exits 1 whenever a worker fails, which would turn "bad config" (64) or
"bad data" (65) into a retry. Every worker therefore writes its exit code (and
its one-line reason) into the directory named by $LLAMAOPS_EXIT_DIR; the
wrapper exits with the most telling code: a non-retryable one if any worker
had one, else 75 if anything failed, else 0, and leaves that worker's reason in
the container's termination message.

Two ways in:

    python -m llamaops_trainer.launch --nnodes=2 --nproc-per-node=8 ... -m llamaops_trainer --spec ...
        the Job's command: the arguments are torchrun's, verbatim.
    python -m llamaops_trainer --spec ...    with PET_NPROC_PER_NODE / PET_NNODES > 1
        the plain entry point starts torchrun itself (torchrun reads its flags from PET_<FLAG>).

SIGTERM (and SIGINT) go to the workers themselves, not through torchrun. torch 2.15's torchrun
(torch.distributed.elastic) turns a signal into SignalException and its agent's _shutdown:
os.killpg of each worker's process group, then SIGKILL once `shutdown_timeout` has passed
(LaunchConfig: --shutdown-timeout, i.e. PET_SHUTDOWN_TIMEOUT, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
else 30 s). 30 s is shorter than a large model's step, so the step's checkpoint was never
written; and killpg also reaches the DataLoader's worker processes, which die of SIGTERM
and take the training process down mid-step. So the launcher signals each worker process
alone, gives them $LLAMAOPS_STOP_TIMEOUT_SECONDS to finish their step and save, then kills
them; torchrun's own teardown (a worker failed first) gets the same timeout through
PET_SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamaops.api.contract import (
    ENV_STOP_TIMEOUT,
    EXIT_OK,
    EXIT_RETRYABLE,
    NON_RETRYABLE_EXIT_CODES,
    termination_log,
)

ENV_EXIT_DIR = "LLAMAOPS_EXIT_DIR"
# torchrun's --shutdown-timeout as an environment variable (torch.distributed.argparse_util.env).
ENV_TORCHRUN_SHUTDOWN_TIMEOUT = "PET_SHUTDOWN_TIMEOUT"


def _count(value: str | None) -> int:
    if not value:
        return 1
    if value.isdigit():
        return int(value)
    if ":" in value:  # elastic "MIN:MAX" nodes
        return int(value.split(":")[-1])
    # "gpu"/"auto": as many workers as GPUs
    import torch

    return max(1, torch.cuda.device_count())


def is_worker() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def needs_launcher() -> bool:
    if is_worker():
        return False
    return _count(os.environ.get("PET_NPROC_PER_NODE")) * _count(os.environ.get("PET_NNODES")) > 1


def termination_message(text: str) -> None:
    """The one-line reason a run ended: to the launcher when there is one, else to Kubernetes."""
    directory = os.environ.get(ENV_EXIT_DIR)
    if directory:
        return  # record_exit carries it to the launcher, which writes the one that wins
    path = Path(termination_log())  # Kubernetes shows it in the pod's status
    if path.exists() and os.access(path, os.W_OK):
        try:
            path.write_text(text[:4000])
        except OSError:
            pass


def record_exit(code: int, message: str = "") -> None:
    """Called by each worker as it exits."""
    directory = os.environ.get(ENV_EXIT_DIR)
    if directory:
        try:
            Path(directory, f"rank-{os.environ.get('RANK', '0')}").write_text(f"{code}\n{message}")
        except OSError:
            pass


def combine(codes: list[int], launcher_code: int) -> int:
    for code in NON_RETRYABLE_EXIT_CODES:
        if code in codes:
            return code
    if launcher_code == EXIT_OK and all(c == EXIT_OK for c in codes):
        return EXIT_OK
    return EXIT_RETRYABLE


def stop_timeout() -> int | None:
    """$LLAMAOPS_STOP_TIMEOUT_SECONDS: how long the workers get from a stop signal to finish their step and save."""
    value = os.environ.get(ENV_STOP_TIMEOUT, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def torchrun_env(exit_dir: str, timeout: int | None) -> dict[str, str]:
    env = {**os.environ, ENV_EXIT_DIR: exit_dir}
    if timeout is not None:
        env[ENV_TORCHRUN_SHUTDOWN_TIMEOUT] = str(timeout)  # a --shutdown-timeout among the arguments still wins
    return env


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (torchrun's: its workers), from /proc; none where there is no /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 1 and fields[1] == str(parent):
            pids.append(int(stat.parent.name))
    return sorted(pids)


class Stopper:
    """Passes a stop signal to torchrun's workers, and kills them `timeout` seconds later if they are still there."""

    def __init__(self, torchrun: subprocess.Popen, timeout: int | None) -> None:
        self.torchrun, self.timeout = torchrun, timeout
        self.deadline: float | None = None
        self.expired = False

    def forward(self, signum: int, _frame: object = None) -> None:
        workers = child_pids(self.torchrun.pid)
        if not workers:  # none started yet (or no /proc): torchrun ends what there is, with nothing to save
            self.torchrun.send_signal(signum)
        for pid in workers:
            _signal(pid, signum)
        if self.deadline is None and self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        print(f"llamaops launch: {signal.Signals(signum).name} to worker(s) {workers or '(torchrun)'}: they save at "
              f"the end of their step{f' (within {self.timeout} s)' if self.timeout else ''}",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        """Past the deadline: kill the workers (their process groups: DataLoader workers too); torchrun then exits."""
        if self.deadline is None or self.expired or time.monotonic() < self.deadline:
            return
        self.expired = True
        workers = child_pids(self.torchrun.pid)
        print(f"llamaops launch: worker(s) {workers} still running {self.timeout} s after the stop signal: killed",
              file=sys.stderr, flush=True)
        for pid in workers:
            _signal(pid, signal.SIGKILL, group=True)

    def wait(self, poll_s: float = 1.0) -> int:
        while True:
            try:
                return self.torchrun.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                self.check()


def _signal(pid: int, signum: int, group: bool = False) -> None:
    try:
        if group:
            try:
                os.killpg(pid, signum)  # torchrun starts each worker in a session of its own
                return
            except ProcessLookupError:
                pass  # not a group leader: the process alone
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # exited meanwhile


def torchrun(torchrun_args: list[str]) -> int:
    """Runs torchrun with these arguments; returns the combined exit code of its workers."""
    timeout = stop_timeout()
    with tempfile.TemporaryDirectory(prefix="llamaops-exit-") as exit_dir:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args],
                                env=torchrun_env(exit_dir, timeout))
        # Kubernetes signals the container's main process only: the workers checkpoint at the end of
        # their step and exit 75.
        stopper = Stopper(proc, timeout)
        previous = {s: signal.signal(s, stopper.forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            launcher_code = stopper.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        results: list[tuple[int, str]] = []
        for path in sorted(Path(exit_dir).glob("rank-*")):
            head, _, message = path.read_text().partition("\n")
            results.append((int(head) if head.strip().isdigit() else EXIT_RETRYABLE, message))
    code = combine([c for c, _ in results], launcher_code)
    message = next((m for c, m in results if c == code and m), "")
    if stopper.expired and not message:
        message = (f"retryable: the workers did not finish their step and checkpoint within {timeout} s of the "
                   f"stop signal ({ENV_STOP_TIMEOUT})")
    if code != EXIT_OK:
        termination_message(message or f"retryable: torchrun exited {launcher_code}")
    return code


def launch(trainer_args: list[str]) -> int:
    """torchrun over this package's entry point, its flags taken from PET_* (needs_launcher)."""
    return torchrun(["-m", "llamaops_trainer", *trainer_args])


def main() -> None:
    sys.exit(torchrun(sys.argv[1:]))


if __name__ == "__main__":
    main()
