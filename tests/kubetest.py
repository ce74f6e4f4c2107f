"""Helpers of the cluster tests: waiting on eventually-consistent state, throwaway namespaces."""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


@contextlib.contextmanager
def fresh_namespace(api_client: object, test_name: str, prefix: str = "t") -> Iterator[str]:
    """A new namespace named after the test, deleted (without waiting) afterwards.

    Waits for its default ServiceAccount, so pods can be created right away.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
    name = f"{prefix}-{slug[:48].rstrip('-')}-{secrets.token_hex(3)}"
    core.create_namespace(body={"metadata": {"name": name, "labels": {"llamaops.dev/test": "true"}}})
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
