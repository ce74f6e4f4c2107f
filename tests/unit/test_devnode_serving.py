"""The dev node's serving pieces: probes, pod IPs, bind mounts, and the Service proxy's routing and forwarding."""

from __future__ import annotations

import asyncio
import http.server
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llamaops_dev.devnode.probes import Prober, port_number, run_action
from llamaops_dev.devnode.runner import PodIPs
from llamaops_dev.devnode.services import LocalPod, ServiceProxy, routes
from llamaops_dev.devnode.volumes import bind_argv, can_bind_mount


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"ok " + self.server.server_address[0].encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[http.server.HTTPServer]:
    handler = type("H", (_Handler,), {"status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _container(port: int, **probes: Any) -> dict[str, Any]:
    return {"name": "server", "ports": [{"name": "http", "containerPort": port}], **probes}


def test_port_numbers_and_names() -> None:
    c = _container(11434)
    assert port_number("http", c) == 11434 and port_number(80, c) == 80 and port_number("8000", c) == 8000
    with pytest.raises(ValueError, match="no port named 'metrics'"):
        port_number("metrics", c)


def test_http_and_tcp_actions(http_server: http.server.HTTPServer) -> None:
    port = http_server.server_address[1]
    c = _container(port)
    assert run_action({"httpGet": {"path": "/", "port": "http"}}, c, "127.0.0.1", 2, lambda *_: False) == (True, "")
    assert run_action({"tcpSocket": {"port": port}}, c, "127.0.0.1", 2, lambda *_: False)[0]
    http_server.RequestHandlerClass.status = 503
    ok, why = run_action({"httpGet": {"path": "/", "port": port}}, c, "127.0.0.1", 2, lambda *_: False)
    assert not ok and "503" in why
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    ok, why = run_action({"tcpSocket": {"port": free}}, c, "127.0.0.1", 1, lambda *_: False)
    assert not ok and "Refused" in why
    assert run_action({"grpc": {"port": 1}}, c, "127.0.0.1", 1, lambda *_: True)[1].startswith("the dev node does")


def test_a_startup_probe_gates_readiness_and_a_failing_one_restarts() -> None:
    results: list[bool] = []
    calls: list[list[str]] = []

    def run_exec(command: list[str], timeout: float) -> bool:
        calls.append(command)
        return results.pop(0)

    c = _container(1, startupProbe={"exec": {"command": ["test", "-f", "/ready"]}, "periodSeconds": 10,
                                    "failureThreshold": 3},
                   readinessProbe={"exec": {"command": ["ready"]}, "periodSeconds": 5, "failureThreshold": 2})
    p = Prober(c, host="127.77.0.1", run_exec=run_exec, started_at=0.0)
    assert (p.started, p.ready) == (False, False)
    results[:] = [False, True]
    assert p.tick(0.0) is None and not p.started  # a failure below the threshold
    assert p.tick(5.0) is None and calls == [["test", "-f", "/ready"]]  # not due before its period
    assert p.tick(10.0) is None and p.started and not p.ready  # started; readiness not yet probed
    results[:] = [True, False, False]
    p.tick(20.0)
    assert p.ready
    p.tick(30.0)
    assert p.ready  # one failure: still ready (failureThreshold 2)
    p.tick(40.0)
    assert not p.ready
    assert calls[-1] == ["ready"]

    never = Prober(c, host="x", run_exec=lambda *_: False, started_at=0.0)
    verdicts = [never.tick(t) for t in (0.0, 10.0, 20.0)]
    assert verdicts[:2] == [None, None] and verdicts[2] and verdicts[2].startswith("Startup probe failed 3 times")


def test_a_failing_liveness_probe_restarts() -> None:
    c = _container(1, livenessProbe={"exec": {"command": ["alive"]}, "periodSeconds": 1, "failureThreshold": 2})
    p = Prober(c, host="x", run_exec=lambda *_: False, started_at=0.0)
    assert p.started and p.ready  # no startup or readiness probe
    assert p.tick(0.0) is None
    assert (p.tick(1.0) or "").startswith("Liveness probe failed 2 times")


def test_pod_ips_are_distinct_loopback_addresses_reused_after_release() -> None:
    ips = PodIPs()
    a, b = ips.take("a"), ips.take("b")
    assert a != b and a.startswith("127.77.") and ips.take("a") == a
    ips.release("a")
    assert ips.take("c") == a
    with socket.socket() as s1, socket.socket() as s2:  # both can bind the same port
        s1.bind((b, 0))
        port = s1.getsockname()[1]
        s2.bind((a, port))


@pytest.mark.skipif(not can_bind_mount(), reason="needs mount namespaces (root or CAP_SYS_ADMIN)")
def test_bind_mounts_are_real_directories_in_the_container_only(tmp_path: Path) -> None:
    """What a program that resolves symlinks sees (Ollama refuses files outside the directory it was given):
    the mount points are directories, the data is the volume's, read-only where the mount says so."""
    volume, config = tmp_path / "claim", tmp_path / "cm"
    (volume / "models").mkdir(parents=True)
    (volume / "models" / "weights").write_text("w")
    config.mkdir()
    (config / "model-0").write_text("FROM x")
    root = tmp_path / "root"
    mounts = [{"name": "claim", "mountPath": "/var/lib/models", "subPath": "models", "readOnly": True},
              {"name": "cm", "mountPath": "/etc/app"}]
    script = ('import os, sys; p = sys.argv[1]; print(os.path.realpath(p + "/weights") == p + "/weights", '
              'open(p + "/weights").read(), open(sys.argv[2]).read()); open(p + "/new", "w")')
    argv, paths = bind_argv(root, mounts, {"claim": volume, "cm": config},
                            ["python3", "-c", script, str(root / "var/lib/models"), str(root / "etc/app/model-0")])
    assert paths == ["/var/lib/models", "/etc/app"]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "w", "FROM", "x"]
    assert "Read-only file system" in out.stderr  # readOnly: true holds
    assert not (root / "var/lib/models/weights").exists()  # outside the container: only an empty mount point


def _service(name: str, selector: dict[str, str], target: Any = "http", annotations: dict[str, str] | None = None
             ) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "annotations": annotations or {}},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": target}]}}


def _pod(name: str, labels: dict[str, str], port: int = 11434, ns: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]}}


def test_routes_lead_to_the_ready_pods_a_service_selects() -> None:
    pods = [LocalPod(_pod("a", {"app": "s", "v": "1"}), "127.77.0.2", True),
            LocalPod(_pod("b", {"app": "s"}), "127.77.0.3", False),  # starting, or terminating
            LocalPod(_pod("c", {"app": "s"}, ns="other"), "127.77.0.4", True),
            LocalPod(_pod("d", {"app": "t"}), "127.77.0.5", True)]
    out = routes([_service("s", {"app": "s"}, annotations={"llamaops.io/local-endpoint": "127.0.0.1:5"}),
                  _service("t", {"app": "t"}, target=9000), _service("u", {"app": "u"}),
                  _service("headless-none", {})], pods)
    assert set(out) == {("ns", "s"), ("ns", "t")}
    assert out[("ns", "s")].backends == (("127.77.0.2", 11434),) and out[("ns", "s")].published == "127.0.0.1:5"
    assert out[("ns", "t")].backends == (("127.77.0.5", 9000),)


class _Api:
    def __init__(self) -> None:
        self.services: list[dict[str, Any]] = []
        self.annotations: dict[tuple[str, str], str] = {}

    def list_services(self) -> list[dict[str, Any]]:
        return self.services

    def annotate_service(self, namespace: str, name: str, key: str, value: str) -> None:
        self.annotations[(namespace, name)] = value


def test_the_proxy_forwards_round_robin_skips_a_refusing_pod_and_closes_with_the_service(
        http_server: http.server.HTTPServer) -> None:
    port = http_server.server_address[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens there once closed
    api = _Api()
    api.services = [_service("s", {"app": "s"}, target=port)]
    pods = [LocalPod(_pod("a", {"app": "s"}, port), "127.0.0.1", True)]
    proxy = ServiceProxy(api, lambda: pods)

    async def scenario() -> None:
        await proxy.sync()
        published = api.annotations[("ns", "s")]
        host, local = published.split(":")
        assert host == "127.0.0.1" and proxy.listeners[("ns", "s")].route.backends == (("127.0.0.1", port),)

        async def get() -> bytes:
            reader, writer = await asyncio.open_connection(host, int(local))
            writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            await writer.drain()
            data = await reader.read()
            writer.close()
            return data

        assert (await get()).endswith(b"ok 127.0.0.1")
        # A second endpoint that refuses: every request still succeeds (the proxy tries the next).
        api.services = [_service("s", {"app": "s"}, target="http")]
        pods[:] = [LocalPod(_pod("a", {"app": "s"}, port), "127.0.0.1", True),
                   LocalPod(_pod("b", {"app": "s"}, dead), "127.0.0.1", True)]
        await proxy.sync()
        assert len(proxy.listeners[("ns", "s")].route.backends) == 2
        for _ in range(4):
            assert (await get()).endswith(b"ok 127.0.0.1")
        api.services = []
        await proxy.sync()
        assert not proxy.listeners
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(local))

    asyncio.run(scenario())
