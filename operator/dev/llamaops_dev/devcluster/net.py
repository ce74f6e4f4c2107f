"""Loopback port checks and a minimal HTTPS client for the API server.

The launcher talks to the API server with the standard library only, so it
does not depend on a Kubernetes client library.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something listens on (or holds) `host:port`.

    SO_REUSEADDR mirrors what the Go servers set, so a port merely in
    TIME_WAIT after a previous run does not count as taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_ports_free(ports: Iterable[int], timeout: float) -> list[int]:
    """Poll until none of `ports` is in use; returns those still taken at the deadline."""
    ports = list(ports)
    deadline = time.monotonic() + timeout
    while True:
        taken = [p for p in ports if port_in_use(p)]
        if not taken or time.monotonic() >= deadline:
            return taken
        time.sleep(0.1)


class APIError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class APIClient:
    """JSON over HTTPS to the API server, authenticated with a client certificate."""

    def __init__(self, host: str, port: int, ca_cert: Path, client_cert: Path, client_key: Path, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=str(ca_cert))
        self._ctx.load_cert_chain(str(client_cert), str(client_key))

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ctx, timeout=self.timeout)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        text = raw.decode(errors="replace")
        try:
            parsed: Any = json.loads(text) if text else None
        except ValueError:
            parsed = text
        return resp.status, parsed

    def call(self, method: str, path: str, body: Any = None, *, ok: Iterable[int] = (200, 201), content_type: str = "application/json") -> Any:
        status, parsed = self.request(method, path, body, content_type)
        if status not in set(ok):
            raise APIError(status, parsed)
        return parsed

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def ready(self) -> bool:
        """`/readyz` answers 200 ok."""
        try:
            status, _ = self.request("GET", "/readyz")
        except (OSError, http.client.HTTPException, ssl.SSLError):
            return False
        return status == 200

    def create_or_replace(self, collection: str, obj: dict[str, Any]) -> Any:
        """POST, or PUT over an existing object of the same name."""
        status, parsed = self.request("POST", collection, obj)
        if status == 409:
            name = obj["metadata"]["name"]
            current = self.get(f"{collection}/{name}")
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
            return self.call("PUT", f"{collection}/{name}", obj)
        if status not in (200, 201):
            raise APIError(status, parsed)
        return parsed


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """A GET of `url` (http or https, certificate not checked) answers 200."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200
    except (OSError, http.client.HTTPException, ssl.SSLError):
        return False
    finally:
        conn.close()
