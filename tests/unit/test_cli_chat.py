"""`llamaops chat` against a real OpenAI-style server (aiohttp, in a thread, on an ephemeral port): the streamed
and whole answers on stdout alone, the request it sends, the server's errors, how it finds the endpoint
(--endpoint, the dev node's annotation, kubectl port-forward), and the model names each runtime serves."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import Result
from llamaops.api import LlamaServe
from llamaops.api.constants import ANNOTATION_LOCAL_ENDPOINT
from llamaops.builders.serve import ResolvedAdapter, ServeContext
from llamaops.builders.serve.ollama import modelfiles
from llamaops.builders.serve.vllm import vllm_args
from llamaops.cli import app, chat
from typer.testing import CliRunner

BASE = "meta-llama/Llama-3.1-8B-Instruct"
DELTAS = ["A Pod ", "is the smallest ", "deployable unit", " — ünïcode ok."]
ANSWER = "A whole answer, not streamed."


def serve(runtime: str = "vllm", adapters: tuple[str, ...] = ("k8s-assistant", "retired"), **spec: Any) -> LlamaServe:
    return LlamaServe.model_validate({
        "apiVersion": "llamaops.io/v1alpha1", "kind": "LlamaServe",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "uid-1"},
        "spec": {"model": {"base_model": BASE}, "runtime": runtime,
                 "adapters": [{"name": a, "uri": f"pvc://adapters/{a}"} for a in adapters], **spec}})


# ---------------------------------------------------------------- the server


class Server:
    """POST /v1/chat/completions as vLLM answers it; knows the base model and k8s-assistant only."""

    models = (BASE, "k8s-assistant", "broken")

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = 0
        self.objects: dict[str, dict[str, Any]] = {}  # the API server's part: its objects by URL path

    async def get_object(self, request: web.Request) -> web.Response:
        obj = self.objects.get(request.path)
        if obj is None:
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                      "message": "not found", "code": 404}, status=404)
        return web.json_response(obj)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body["model"] not in self.models:
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                "type": "NotFoundError", "param": None, "code": 404}}, status=404)
        if body["model"] == "broken" and not body.get("stream"):
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if not body.get("stream"):
            return web.json_response({"id": "c1", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": ANSWER}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await event({"role": "assistant", "content": ""})
        if body["model"] == "broken":  # vLLM reports a failure after the 200 as one more event
            await event({"content": DELTAS[0]})
            await resp.write(b'data: {"error": {"message": "CUDA out of memory", "code": 500}}\n\n')
            return resp
        for text in DELTAS:
            await event({"content": text})
        await event({}, "stop")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def run(self, started: threading.Event, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self.completions)
            app.router.add_get("/{path:ap.*}", self.get_object)  # /api/v1/..., /apis/llamaops.io/...
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            started.set()
            await stop.wait()
            await runner.cleanup()

        loop.run_until_complete(main())


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # A thread of its own: the command runs its own event loop (asyncio.run) in the test's thread.
    srv, started, loop = Server(), threading.Event(), asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=srv.run, args=(started, stop, loop), daemon=True)
    thread.start()
    assert started.wait(5)
    yield srv
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)
    loop.close()


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The cluster's answer to read_serve (what it was asked is recorded): a vLLM LlamaServe, and its Service."""
    state: dict[str, Any] = {"lsv": serve(), "service": {"metadata": {"name": "llama", "annotations": {}}}}

    async def read_serve(name: str, namespace: str, kubeconfig: str | None, context: str | None,
                         with_service: bool) -> tuple[LlamaServe, dict[str, Any] | None]:
        state["asked"] = (name, namespace, with_service)
        return state["lsv"], state["service"] if with_service else None

    monkeypatch.setattr(chat, "read_serve", read_serve)
    return state


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, ["chat", "llama", *args], input=input)


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


# ---------------------------------------------------------------- the conversation


def test_streamed_answer_and_the_request(server: Server, cluster: dict[str, Any]) -> None:
    result = invoke("What is a Pod?", "-n", "ml", "--endpoint", url(server))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "".join(DELTAS) + "\n"  # the answer alone: pipeable
    assert f"endpoint: {url(server)} model: {BASE}" in result.stderr
    assert cluster["asked"] == ("llama", "ml", False)  # --endpoint: no Service read
    assert server.bodies[-1] == {"model": BASE, "messages": [{"role": "user", "content": "What is a Pod?"}],
                                 "stream": True, "max_tokens": 256, "temperature": 0.0}


def test_whole_answer_of_an_adapter_with_a_system_message(server: Server, cluster: dict[str, Any]) -> None:
    result = invoke("Scale it.", "-n", "ml", "--endpoint", url(server), "--adapter", "k8s-assistant",
                    "--system", "Answer in one line.", "--no-stream", "--temperature", "0.7", "--max-tokens", "32")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ANSWER + "\n"
    assert server.bodies[-1] == {"model": "k8s-assistant", "stream": False, "max_tokens": 32, "temperature": 0.7,
                                 "messages": [{"role": "system", "content": "Answer in one line."},
                                              {"role": "user", "content": "Scale it."}]}


def test_prompt_from_stdin(server: Server, cluster: dict[str, Any]) -> None:
    result = invoke("-n", "ml", "--endpoint", url(server), "--no-stream", input="piped question\n")
    assert result.exit_code == 0, result.stderr
    assert server.bodies[-1]["messages"] == [{"role": "user", "content": "piped question"}]


def test_no_prompt_at_all(server: Server, cluster: dict[str, Any]) -> None:
    count = len(server.bodies)
    result = invoke("-n", "ml", "--endpoint", url(server), input="")
    assert result.exit_code == 2 and "give a PROMPT" in result.stderr
    assert len(server.bodies) == count


@pytest.mark.parametrize("stream", [True, False])
def test_a_failure_inside_a_200(stream: bool, server: Server, cluster: dict[str, Any]) -> None:
    cluster["lsv"] = serve(adapters=("broken",))
    result = invoke("hi", "-n", "ml", "--endpoint", url(server), "--adapter", "broken",
                    *([] if stream else ["--no-stream"]))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    if stream:  # what arrived before the failure was printed
        assert result.stdout == DELTAS[0]
        assert "the server failed mid-answer: CUDA out of memory" in result.stderr
    else:
        assert result.stdout == ""
        assert "answered something other than a chat completion: <html>oops</html>" in result.stderr


def test_server_error_status_and_message(server: Server, cluster: dict[str, Any]) -> None:
    result = invoke("hi", "-n", "ml", "--endpoint", url(server), "--adapter", "retired")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "404 Not Found: The model `retired` does not exist." in result.stderr
    assert "Traceback" not in result.stderr


def test_connection_refused_names_the_url(cluster: dict[str, Any]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = invoke("hi", "-n", "ml", "--endpoint", f"http://127.0.0.1:{port}/v1")
    assert result.exit_code == 1
    assert f"cannot connect to http://127.0.0.1:{port}/v1/chat/completions: connection refused" in result.stderr


def test_unknown_adapter_lists_the_names(server: Server, cluster: dict[str, Any]) -> None:
    count = len(server.bodies)
    result = invoke("hi", "-n", "ml", "--endpoint", url(server), "--adapter", "k8s")
    assert result.exit_code == 2
    assert 'has no adapter "k8s" (adapters: k8s-assistant, retired)' in result.stderr
    assert len(server.bodies) == count  # refused before asking the server


# ---------------------------------------------------------------- finding the endpoint


def test_the_dev_nodes_address_of_the_service(server: Server, cluster: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl: the annotation alone must do
    cluster["service"]["metadata"]["annotations"][ANNOTATION_LOCAL_ENDPOINT] = f"127.0.0.1:{server.port}"
    result = invoke("hi", "-n", "ml", "--no-stream")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ANSWER + "\n"
    assert cluster["asked"] == ("llama", "ml", True)


def test_port_forward_through_kubectl(server: Server, cluster: dict[str, Any], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A kubectl that records its arguments and pid, reports the test server's port as the one it forwards, and
    # would stay for 30 s if it were not stopped.
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho $$ > {tmp_path}/pid\n'
                       f'echo "Forwarding from 127.0.0.1:{server.port} -> 8000"\n'
                       f'echo "Forwarding from [::1]:{server.port} -> 8000"\nexec sleep 30\n')
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    started = time.monotonic()
    result = invoke("hi", "-n", "ml", "--no-stream", "--context", "dev")
    assert result.exit_code == 0, result.stderr
    assert time.monotonic() - started < 10  # kubectl was stopped, not waited for
    assert result.stdout == ANSWER + "\n"
    assert (tmp_path / "args").read_text().split() == ["port-forward", "-n", "ml", "service/llama", ":8000",
                                                       "--context", "dev"]
    with pytest.raises(ProcessLookupError):  # stopped (and reaped) at exit
        os.kill(int((tmp_path / "pid").read_text()), 0)


def test_port_forward_failure_is_kubectls_message(cluster: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text('#!/bin/sh\necho "error: unable to forward port because pod is not running" >&2\nexit 1\n')
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = invoke("hi", "-n", "ml")
    assert result.exit_code == 1
    assert "kubectl port-forward failed: error: unable to forward port because pod is not running" in result.stderr


def test_without_kubectl_the_error_says_how_to_reach_the_server(cluster: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = invoke("hi", "-n", "ml")
    assert result.exit_code == 1
    assert "kubectl is not on PATH" in result.stderr and "--endpoint" in result.stderr


def write_kubeconfig(tmp_path: Path, server: str, namespace: str | None = None) -> Path:
    context = {"cluster": "t", "user": "t", **({"namespace": namespace} if namespace else {})}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "t",
                                "clusters": [{"name": "t", "cluster": {"server": server}}],
                                "contexts": [{"name": "t", "context": context}],
                                "users": [{"name": "t", "user": {"token": "x"}}]}))
    return path


def test_found_through_the_cluster(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No stand-in for read_serve: the test server answers the API calls too (kubeconfig pointing at it)."""
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, f"http://127.0.0.1:{server.port}", "ml")))
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl
    lsv_path = "/apis/llamaops.io/v1alpha1/namespaces/ml/llamaserves/llama"
    svc_path = "/api/v1/namespaces/ml/services/llama"
    server.objects.clear()
    result = invoke("hi")
    assert result.exit_code == 2
    assert 'LlamaServe "llama" not found in namespace ml' in result.stderr  # the context's namespace

    lsv = serve().model_dump(mode="json", by_alias=True, exclude_none=True)
    server.objects[lsv_path] = {**lsv, "metadata": {**lsv["metadata"], "resourceVersion": "7", "generation": 1},
                                "status": {"phase": "Deploying"}}
    result = invoke("hi")
    assert result.exit_code == 2
    assert "LlamaServe ml/llama is Deploying: it may not answer" in result.stderr
    assert "has no Service llama yet (it is Deploying)" in result.stderr

    server.objects[svc_path] = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "llama", "namespace": "ml", "annotations": {ANNOTATION_LOCAL_ENDPOINT: f"127.0.0.1:{server.port}"}},
        "spec": {"ports": [{"name": "http", "port": 8000}]}}
    server.objects[lsv_path]["status"]["phase"] = "Ready"
    result = invoke("hi", "--adapter", "k8s-assistant", "--no-stream")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ANSWER + "\n"
    assert result.stderr == f"endpoint: {url(server)} model: k8s-assistant\n"  # and no warning: it is Ready
    server.objects.clear()


def test_not_found(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = write_kubeconfig(tmp_path, f"http://127.0.0.1:{server.port}")
    result = invoke("hi", "-n", "team", "--kubeconfig", str(kubeconfig), "--endpoint", url(server))
    assert result.exit_code == 2
    assert result.stderr == 'llamaops chat: error: LlamaServe "llama" not found in namespace team\n'


def test_unreachable_cluster(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path, "https://127.0.0.1:1")
    result = invoke("hi", "--kubeconfig", str(kubeconfig))
    assert result.exit_code == 2
    assert result.stderr.startswith("llamaops chat: error: cannot reach the cluster"), result.stderr


# ---------------------------------------------------------------- the model names


def _context(lsv: LlamaServe) -> ServeContext:
    adapters = [ResolvedAdapter(a.name, a.uri or "", "uri", BASE) for a in lsv.spec.adapters]
    return ServeContext(adapters, {a.name: f"/adapters/{a.name}" for a in adapters}, BASE, "/config")


def test_model_names_of_vllm() -> None:
    lsv = serve()
    args = vllm_args(lsv, _context(lsv), None)
    lora_names = [json.loads(x)["name"] for x in args if x.startswith("{")]
    assert chat.served_model(lsv) == BASE == args[args.index("--served-model-name") + 1]
    assert chat.served_model(lsv, "retired") == "retired" and "retired" in lora_names
    named = serve(vllm={"served_model_name": "llama-8b"})
    assert chat.served_model(named) == "llama-8b" == vllm_args(named, _context(named), None)[
        vllm_args(named, _context(named), None).index("--served-model-name") + 1]


def test_model_names_of_ollama() -> None:
    lsv = serve("ollama")
    created = [name for name, _ in modelfiles(lsv, _context(lsv))]
    assert chat.served_model(lsv) == "llama" == created[0]  # the LlamaServe's name, not the repo id
    assert chat.served_model(lsv, "k8s-assistant") == "k8s-assistant" and "k8s-assistant" in created[1:]
    assert chat.served_model(serve("ollama", ollama={"served_model_name": "llama3.1:8b"})) == "llama3.1:8b"


def test_an_adapter_of_a_serve_without_adapters() -> None:
    with pytest.raises(chat.ChatError, match=r'no adapter "x" \(adapters: none'):
        chat.served_model(serve(adapters=()), "x")


def test_endpoint_helpers() -> None:
    assert chat.local_endpoint({"metadata": {"annotations": {ANNOTATION_LOCAL_ENDPOINT: "127.0.0.1:31234"}}}) \
        == "http://127.0.0.1:31234/v1"
    assert chat.local_endpoint({"metadata": {}}) is None
    assert chat.forwarded_port("Forwarding from 127.0.0.1:40123 -> 8000\n") == 40123
    assert chat.forwarded_port("Forwarding from [::1]:40123 -> 8000") is None
    assert chat.error_message('{"object": "error", "message": "bad temperature"}') == "bad temperature"
    assert chat.error_message('{"error": "model not found"}') == "model not found"
    assert chat.error_message("<html>502</html>") == "<html>502</html>"
