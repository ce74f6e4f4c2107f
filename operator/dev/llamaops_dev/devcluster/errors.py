"""The one error type the launcher raises for conditions a user can act on."""

from __future__ import annotations


class DevClusterError(RuntimeError):
    """A failure with a message meant for the person running the launcher."""
