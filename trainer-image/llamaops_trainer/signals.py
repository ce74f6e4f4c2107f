"""SIGTERM/SIGINT handling that needs no heavy import, so it is in place from the first second."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """Raised by the signal handler before training starts.

    A BaseException, like KeyboardInterrupt, so no library's `except Exception` swallows it.
    """


class StopSignal:
    """SIGTERM/SIGINT -> a flag. Before training starts there is nothing to save, so it raises at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.training = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. when run inside a test thread)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self.requested.set()
        if not self.training:
            raise Terminated(f"received {signal.Signals(signum).name} before training started")
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)
