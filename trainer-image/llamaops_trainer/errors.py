"""Errors that end a run, each carrying the exit code the Job's podFailurePolicy reads."""

from __future__ import annotations

from llamaops.api.contract import EXIT_BAD_CONFIG, EXIT_BAD_DATA, EXIT_RETRYABLE


class TrainerError(Exception):
    exit_code = EXIT_RETRYABLE
    kind = "error"


class BadConfig(TrainerError):
    """The spec cannot work: the run fails without retries. Always names the field."""

    exit_code = EXIT_BAD_CONFIG
    kind = "bad config"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class BadData(TrainerError):
    """The dataset is malformed: retrying cannot help."""

    exit_code = EXIT_BAD_DATA
    kind = "bad data"


class Retryable(TrainerError):
    """Infrastructure trouble: the gang restarts and resumes from the newest checkpoint."""

    exit_code = EXIT_RETRYABLE
    kind = "retryable"


class Interrupted(Retryable):
    """SIGTERM/SIGINT (node drain, preemption, suspend)."""

    kind = "interrupted"
