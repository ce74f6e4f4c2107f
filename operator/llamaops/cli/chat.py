"""`llamaops chat NAME [PROMPT]`: one question to a LlamaServe, through its OpenAI-compatible API.

The server is found at --endpoint; else at the address the dev node publishes its Service on (the
Service's local-endpoint annotation); else through `kubectl port-forward` to the Service, stopped at exit.
The model asked is the base model, or --adapter, under the name the serving runtime gives it.

Only the answer goes to stdout, so it can be piped; where it came from goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from llamaops.api.constants import ANNOTATION_LOCAL_ENDPOINT, GROUP, SERVES, VERSION
from llamaops.cli.common import ContextOpt, KubeconfigOpt, NamespaceOpt, run

if TYPE_CHECKING:
    from llamaops.api import LlamaServe

EXIT_FAILED, EXIT_USAGE = 1, 2
FORWARD_SECONDS = 30  # for kubectl port-forward to report its local port
READ_SECONDS = 600  # between two reads of the answer: the first token may wait for a busy server
_FORWARDING = re.compile(r"^Forwarding from 127\.0\.0\.1:(\d+) ->")


class ChatError(Exception):
    """Ends the command: `llamaops chat: error: <message>` and exit `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- pure helpers


def served_model(lsv: LlamaServe, adapter: str | None = None) -> str:
    """The `model` of a request for the base model (adapter None), or for one of the LlamaServe's adapters.

    The names are the builders': vLLM serves the base under --served-model-name and each adapter under its
    --lora-modules name; Ollama creates the base as `model_name` and one model per adapter, named after it.
    Both name an adapter by spec.adapters[].name.
    """
    from llamaops.builders.serve import ollama, vllm

    if adapter is not None:
        known = [a.name for a in lsv.spec.adapters]
        if adapter not in known:
            listed = ", ".join(known) if known else "none: it serves the base model only"
            raise ChatError(f'LlamaServe "{lsv.metadata.name}" has no adapter "{adapter}" (adapters: {listed})',
                            EXIT_USAGE)
        return adapter
    base = {"vllm": vllm.served_model_name, "ollama": ollama.model_name}.get(lsv.spec.runtime)
    if base is None:
        raise ChatError(f"this llamaops does not know how runtime {lsv.spec.runtime!r} names its models", EXIT_USAGE)
    return base(lsv)


def local_endpoint(service: dict[str, Any]) -> str | None:
    """The base URL the dev node publishes the Service at on this machine, if it does."""
    where = ((service.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_LOCAL_ENDPOINT)
    return f"http://{where}/v1" if where else None


def forwarded_port(line: str) -> int | None:
    """The local port of kubectl port-forward's "Forwarding from 127.0.0.1:NNNNN -> PORT" line."""
    m = _FORWARDING.match(line.strip())
    return int(m.group(1)) if m else None


def error_message(text: str) -> str:
    """The server's message: OpenAI's {"error": {"message"}}, vLLM's {"message"}, Ollama's {"error": "..."}."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if doc.get("message"):
            return str(doc["message"])
    return text.strip()[:500]


# ---------------------------------------------------------------- the cluster


async def read_serve(name: str, namespace: str, kubeconfig: str | None, context: str | None,
                     with_service: bool) -> tuple[LlamaServe, dict[str, Any] | None]:
    """The LlamaServe (spec only: the status may lag it), and its Service when asked for."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException
    from pydantic import ValidationError

    from llamaops import kube
    from llamaops.api import LlamaServe
    from llamaops.builders.serve import names

    async with kube.connect(kubeconfig, context) as api:
        try:
            body = await client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                                   SERVES, name)
        except ApiException as exc:
            if exc.status == 404:
                raise ChatError(f'LlamaServe "{name}" not found in namespace {namespace}', EXIT_USAGE) from None
            raise
        meta = body.get("metadata") or {}
        try:
            lsv = LlamaServe.model_validate({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                                             "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
                                             "spec": body.get("spec") or {}})
        except ValidationError as exc:
            raise ChatError(f"LlamaServe {namespace}/{name} does not parse: {exc}", EXIT_USAGE) from None
        phase = (body.get("status") or {}).get("phase") or "not reconciled yet"
        if phase != "Ready":
            typer.echo(f"llamaops chat: LlamaServe {namespace}/{name} is {phase}: it may not answer", err=True)
        if not with_service:
            return lsv, None
        service = names(lsv)["service"]
        try:
            resp = await client.CoreV1Api(api).read_namespaced_service(service, namespace, _preload_content=False)
            return lsv, await kube.raw_json(resp)
        except ApiException as exc:
            if exc.status == 404:
                raise ChatError(f"LlamaServe {namespace}/{name} has no Service {service} yet (it is {phase})",
                                EXIT_USAGE) from None
            raise


@contextlib.asynccontextmanager
async def port_forward(namespace: str, service: str, port: int, kubeconfig: str | None,
                       context: str | None) -> AsyncIterator[str]:
    """`kubectl port-forward` to the Service on a free local port; yields its base URL, stops kubectl at exit."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise ChatError(f"kubectl is not on PATH, and reaching Service {namespace}/{service} from here takes "
                        "`kubectl port-forward`: install kubectl, or pass --endpoint with a URL that reaches the "
                        "server (http://HOST:PORT/v1)")
    args = [kubectl, "port-forward", "-n", namespace, f"service/{service}", f":{port}"]
    args += ["--kubeconfig", kubeconfig] if kubeconfig else []  # else KUBECONFIG, inherited
    args += ["--context", context] if context else []
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        try:
            local = await asyncio.wait_for(_local_port(proc), FORWARD_SECONDS)
        except TimeoutError:
            raise ChatError(f"kubectl port-forward to service/{service} reported no port in "
                            f"{FORWARD_SECONDS}s") from None
        yield f"http://127.0.0.1:{local}/v1"
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _local_port(proc: asyncio.subprocess.Process) -> int:
    assert proc.stdout is not None and proc.stderr is not None
    async for raw in proc.stdout:
        port = forwarded_port(raw.decode(errors="replace"))
        if port is not None:
            return port
    why = (await proc.stderr.read()).decode(errors="replace").strip()  # stdout ended: kubectl is exiting
    raise ChatError(f"kubectl port-forward failed: {why or f'exit {await proc.wait()}'}")


# ---------------------------------------------------------------- the request


async def _deltas(lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, str | None]]:
    """(content, finish_reason) of each Server-Sent Event chunk, until `data: [DONE]`."""
    async for raw in lines:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ChatError(f"the server sent an event that is not JSON: {data[:200]}") from None
        if "error" in chunk:  # a failure after the 200 arrives as one more event
            raise ChatError(f"the server failed mid-answer: {error_message(data)}")
        for choice in chunk.get("choices") or []:
            yield (choice.get("delta") or {}).get("content") or "", choice.get("finish_reason")
    raise ChatError("the answer ended before the server's [DONE]: the connection was cut")


async def complete(endpoint: str, body: dict[str, Any], out: TextIO) -> None:
    """POST /chat/completions; the answer's text goes to `out` (as it arrives when streaming), then a newline."""
    import aiohttp

    url = endpoint.rstrip("/") + "/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=READ_SECONDS)
    finish = None
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(url, json=body) as resp:
            if resp.status >= 400:
                raise ChatError(f"{url} answered {resp.status} {resp.reason}: {error_message(await resp.text())}")
            if body["stream"]:
                async for text, reason in _deltas(resp.content):
                    out.write(text)
                    out.flush()
                    finish = reason or finish
            else:
                text = await resp.text()
                try:
                    choice = json.loads(text)["choices"][0]
                    answer = choice["message"].get("content") or ""
                except (ValueError, LookupError, TypeError, AttributeError):
                    raise ChatError(f"{url} answered something other than a chat completion: {text[:200]}") \
                        from None
                out.write(answer)
                finish = choice.get("finish_reason")
    except aiohttp.ClientConnectorError as exc:
        why = os.strerror(exc.os_error.errno).lower() if exc.os_error.errno else str(exc.os_error)
        raise ChatError(f"cannot connect to {url}: {why}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ChatError(f"{url}: {exc or type(exc).__name__}") from None
    out.write("\n")
    out.flush()
    if finish == "length":
        typer.echo(f"llamaops chat: the answer was cut at --max-tokens {body['max_tokens']}", err=True)


async def _chat(name: str, namespace: str, adapter: str | None, body: dict[str, Any], endpoint: str | None,
                kubeconfig: str | None, context: str | None) -> None:
    from llamaops.builders.serve import names, runtime_of

    lsv, service = await read_serve(name, namespace, kubeconfig, context, with_service=endpoint is None)
    body["model"] = served_model(lsv, adapter)
    async with contextlib.AsyncExitStack() as stack:
        if endpoint is None:
            assert service is not None
            endpoint = local_endpoint(service) or await stack.enter_async_context(
                port_forward(namespace, names(lsv)["service"], runtime_of(lsv).port(lsv), kubeconfig, context))
        typer.echo(f"endpoint: {endpoint} model: {body['model']}", err=True)
        await complete(endpoint, body, sys.stdout)


def chat(
    name: Annotated[str, typer.Argument(help="The LlamaServe.")],
    prompt: Annotated[str | None, typer.Argument(help="The question (default: stdin, when it is not a terminal).",
                                                 show_default=False)] = None,
    namespace: NamespaceOpt = None,
    adapter: Annotated[str | None, typer.Option(help="Ask this adapter (a name in spec.adapters), not the base "
                                                "model.", show_default=False)] = None,
    system: Annotated[str | None, typer.Option(help="A system message first (default: none, and the server "
                                               "applies the prompt the adapters were trained with).",
                                               show_default=False)] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the answer as it is generated.")] = True,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 gives the same answer "
                                               "every time.")] = 0.0,
    endpoint: Annotated[str | None, typer.Option(help="The server's OpenAI base URL, ending in /v1 (default: the "
                                                 "dev node's address of the Service, else kubectl port-forward).",
                                                 show_default=False)] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Ask a LlamaServe one question through its OpenAI-compatible API and print the answer.

    Only the answer goes to stdout; the endpoint and model asked go to stderr.

    Exit 0: answered; 1: the server could not be reached or answered an error; 2: no prompt, no such
    LlamaServe or adapter, or no cluster.
    """
    from llamaops import kube

    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if not (prompt or "").strip():
        typer.echo("llamaops chat: give a PROMPT, or pipe one to stdin", err=True)
        raise typer.Exit(EXIT_USAGE)
    # No system message unless asked: the server's chat template already applies the trained prompt.
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": (prompt or "").strip()})
    body = {"messages": messages, "stream": stream, "max_tokens": max_tokens, "temperature": temperature}
    ns = namespace or kube.current_namespace(kubeconfig, context)
    try:
        run(_chat(name, ns, adapter, body, endpoint, kubeconfig, context), "chat")
    except ChatError as exc:
        typer.echo(f"llamaops chat: error: {exc}", err=True)
        raise typer.Exit(exc.code) from None
