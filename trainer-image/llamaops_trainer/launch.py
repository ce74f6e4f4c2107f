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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from llamaops.api.contract import EXIT_OK, EXIT_RETRYABLE, NON_RETRYABLE_EXIT_CODES, termination_log

ENV_EXIT_DIR = "LLAMAOPS_EXIT_DIR"


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


def torchrun(torchrun_args: list[str]) -> int:
    """Runs torchrun with these arguments; returns the combined exit code of its workers."""
    with tempfile.TemporaryDirectory(prefix="llamaops-exit-") as exit_dir:
        env = {**os.environ, ENV_EXIT_DIR: exit_dir}
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args], env=env)

        def forward(signum: int, _frame: object) -> None:
            # Kubernetes signals the container's main process only: pass it on. torchrun hands it
            # to the workers, which checkpoint at the end of their step and exit 75.
            proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            launcher_code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        results: list[tuple[int, str]] = []
        for path in sorted(Path(exit_dir).glob("rank-*")):
            head, _, message = path.read_text().partition("\n")
            results.append((int(head) if head.strip().isdigit() else EXIT_RETRYABLE, message))
    code = combine([c for c, _ in results], launcher_code)
    message = next((m for c, m in results if c == code and m), "")
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
