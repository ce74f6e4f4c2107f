"""Pure helpers for status: conditions and phase patches."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# Condition types of a LlamaFineTune.
VALID = "Valid"
QUEUED = "Queued"
ADMITTED = "Admitted"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
CONFLICT = "Conflict"  # a child's name is taken by an object LlamaOps does not control (both kinds)
# Condition types of a LlamaServe (with VALID and FAILED above).
ADAPTERS_READY = "AdaptersReady"
AVAILABLE = "Available"
PROGRESSING = "Progressing"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp of the API server ("2026-01-01T12:00:00Z"); None when empty or malformed."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def set_condition(conditions: list[dict[str, Any]] | None, type_: str, status: bool | str, reason: str,
                  message: str = "", generation: int | None = None, at: str | None = None) -> list[dict[str, Any]]:
    """The conditions with one set; lastTransitionTime moves only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions or []]
    existing = next((c for c in out if c.get("type") == type_), None)
    new = {"type": type_, "status": value, "reason": reason, "message": message[:32768],
           "lastTransitionTime": at or now()}
    if generation is not None:
        new["observedGeneration"] = generation
    if existing is None:
        out.append(new)
    else:
        if existing.get("status") == value:
            new["lastTransitionTime"] = existing.get("lastTransitionTime", new["lastTransitionTime"])
        existing.clear()
        existing.update(new)
    return out


def condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def clear_condition(conditions: list[dict[str, Any]], type_: str, reason: str,
                    generation: int | None = None) -> list[dict[str, Any]]:
    """The conditions with `type_` set to False, if it is there at all (an absent condition stays absent)."""
    if condition(conditions, type_) is None:
        return conditions
    return set_condition(conditions, type_, False, reason, "", generation)


def admitted(conditions: list[dict[str, Any]] | None, reason: str, message: str,
             generation: int | None = None) -> list[dict[str, Any]]:
    """A run's conditions once it is admitted (out of the queue)."""
    conditions = set_condition(conditions, QUEUED, False, reason, message, generation)
    return set_condition(conditions, ADMITTED, True, reason, message, generation)


def requeued(conditions: list[dict[str, Any]] | None, reason: str, message: str,
             generation: int | None = None) -> list[dict[str, Any]]:
    """A run's conditions once it is back in the queue (not running, not admitted)."""
    conditions = set_condition(conditions, RUNNING, False, reason, message, generation)
    conditions = set_condition(conditions, ADMITTED, False, reason, message, generation)
    return set_condition(conditions, QUEUED, True, reason, message, generation)


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    c = condition(conditions, type_)
    return bool(c and c.get("status") == "True")
