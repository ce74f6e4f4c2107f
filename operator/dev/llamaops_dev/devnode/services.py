"""Services of the dev node's pods, reachable from this machine (the part of kube-proxy the dev node needs).

Every second the proxy reads the cluster's Services. A Service whose selector
matches a pod of this node gets a listener on 127.0.0.1 (a free port, kept for
the Service's life and across agent restarts where it is still free) for its
first port, and is annotated llamaops.io/local-endpoint=127.0.0.1:PORT, which
`llamaops chat` and the demo read. Each connection goes to one of the matching
pods that is Ready and not terminating, round robin, at the pod's own IP and the
Service's targetPort; one that refuses is skipped (nothing was sent yet), so a
replica that stopped listening costs no request. Deleting the Service closes its
listener and frees the port.

The endpoints come from the agent's own pods, not from EndpointSlices: the pods'
IPs here are loopback addresses, which the API server does not accept as endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamaops.api.constants import ANNOTATION_LOCAL_ENDPOINT

from llamaops_dev.devnode.env import LOCALHOST
from llamaops_dev.devnode.probes import port_number

log = logging.getLogger(__name__)
SYNC_S = 1.0
CONNECT_TIMEOUT_S = 2.0


class ServiceApi(Protocol):
    def list_services(self) -> list[dict[str, Any]]: ...
    def annotate_service(self, namespace: str, name: str, key: str, value: str) -> None: ...


@dataclass(frozen=True)
class LocalPod:
    """A pod this node runs, as the proxy sees it."""

    pod: Mapping[str, Any]
    ip: str
    ready: bool  # Ready and not terminating


@dataclass(frozen=True)
class Route:
    """Where one Service's first port leads on this node: (IP, port) of its ready pods."""

    uid: str
    backends: tuple[tuple[str, int], ...]
    published: str | None  # the annotation's value now


def _target(port: Mapping[str, Any], pod: Mapping[str, Any]) -> int | None:
    target = port.get("targetPort", port.get("port"))
    for c in (pod.get("spec") or {}).get("containers") or []:
        with contextlib.suppress(ValueError):
            return port_number(target, c)
    return None


def routes(services: list[Mapping[str, Any]], pods: list[LocalPod]) -> dict[tuple[str, str], Route]:
    """(namespace, name) -> Route, for each Service whose selector matches a pod of this node. Pure."""
    out: dict[tuple[str, str], Route] = {}
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        selector, ports = spec.get("selector") or {}, spec.get("ports") or []
        if not selector or not ports:
            continue
        matching = [p for p in pods if (p.pod.get("metadata") or {}).get("namespace") == meta["namespace"]
                    and selector.items() <= ((p.pod.get("metadata") or {}).get("labels") or {}).items()]
        if not matching:
            continue
        backends = {(p.ip, port) for p in matching if p.ready and (port := _target(ports[0], p.pod)) is not None}
        out[(meta["namespace"], meta["name"])] = Route(meta.get("uid", ""), tuple(sorted(backends)),
                                                       (meta.get("annotations") or {}).get(ANNOTATION_LOCAL_ENDPOINT))
    return out


@dataclass
class Listener:
    route: Route
    service: Mapping[str, Any]  # as of the last sync: connections route by it and the pods of that moment
    server: asyncio.base_events.Server
    port: int
    turn: itertools.count = field(default_factory=itertools.count)


class ServiceProxy:
    def __init__(self, api: ServiceApi, pods: Callable[[], list[LocalPod]]) -> None:
        self.api, self.pods = api, pods
        self.listeners: dict[tuple[str, str], Listener] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="service-proxy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        while not self._stop.is_set():
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - the API server may be restarting; next round retries
                log.warning("service proxy: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SYNC_S)
        for key in list(self.listeners):
            await self._close(key)

    async def sync(self) -> None:
        services = await asyncio.to_thread(self.api.list_services)
        by_key = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
        wanted = routes(services, self.pods())
        for key in [k for k, lst in self.listeners.items() if k not in wanted or wanted[k].uid != lst.route.uid]:
            await self._close(key)
        for key, route in wanted.items():
            lst = self.listeners.get(key)
            if lst is None:
                lst = await self._open(key, route, by_key[key])
            elif lst.route.backends != route.backends:
                log.info("service %s/%s: %s:%d -> %s", key[0], key[1], LOCALHOST, lst.port,
                         route.backends or "no ready endpoint")
            lst.route, lst.service = route, by_key[key]
            value = f"{LOCALHOST}:{lst.port}"
            if route.published != value:
                await asyncio.to_thread(self.api.annotate_service, key[0], key[1], ANNOTATION_LOCAL_ENDPOINT, value)

    async def _open(self, key: tuple[str, str], route: Route, service: Mapping[str, Any]) -> Listener:
        handler = lambda r, w, key=key: self._forward(key, r, w)  # noqa: E731
        server = None
        if route.published and route.published.startswith(f"{LOCALHOST}:"):
            with contextlib.suppress(OSError, ValueError):  # the port it had before this agent: keep it if free
                server = await asyncio.start_server(handler, LOCALHOST, int(route.published.rsplit(":", 1)[1]))
        if server is None:
            server = await asyncio.start_server(handler, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        self.listeners[key] = Listener(route, service, server, port)
        log.info("service %s/%s: %s:%d -> %s", key[0], key[1], LOCALHOST, port, route.backends or "no ready endpoint")
        return self.listeners[key]

    async def _close(self, key: tuple[str, str]) -> None:
        lst = self.listeners.pop(key)
        lst.server.close()
        await lst.server.wait_closed()
        log.info("service %s/%s: closed %s:%d", key[0], key[1], LOCALHOST, lst.port)

    async def _forward(self, key: tuple[str, str], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        lst = self.listeners.get(key)
        # Readiness as of now (the agent's own pods, no API call): a pod Ready a moment ago already serves.
        route = routes([lst.service], self.pods()).get(key) if lst else None
        backends = list(route.backends) if route else []
        upstream = None
        if backends:
            start = next(lst.turn) % len(backends)  # type: ignore[union-attr]
            for host, port in backends[start:] + backends[:start]:
                with contextlib.suppress(OSError, TimeoutError):
                    upstream = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
                    break
        if upstream is None:
            log.warning("service %s/%s: no ready endpoint answered (%s); connection closed", key[0], key[1],
                        backends or "none")
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError):
                pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()
