"""Finding the cluster for the CLI, as kubectl does.

--kubeconfig, else $KUBECONFIG, else ~/.kube/config (with --context, else the
current context and its namespace); inside a pod with no kubeconfig, the pod's
service account. The client is kubernetes_asyncio, the operator's own, so the
CLI needs no second Kubernetes library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from llamaops.api.contract import SERVICEACCOUNT_DIR

T = TypeVar("T")

# The pod's own service account. The fixed path, not contract.serviceaccount_dir(): load_incluster_config
# reads its credentials from there whatever LLAMAOPS_SERVICEACCOUNT_DIR says.
_SA_DIR = Path(SERVICEACCOUNT_DIR)

# Options shared by the commands that talk to a cluster.
KubeconfigOpt = Annotated[str | None, typer.Option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, "
                                                   "else ~/.kube/config).", show_default=False)]
ContextOpt = Annotated[str | None, typer.Option("--context", help="Kubeconfig context (default: the current one).",
                                                show_default=False)]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's, "
                                                  "else default).", show_default=False)]


class ClusterError(Exception):
    """The cluster cannot be reached or refused a request: exit 2 with this message."""


def _config_file(kubeconfig: str | None) -> str | None:
    value = kubeconfig or os.environ.get("KUBECONFIG") or None
    if value:
        return value
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.is_file() else None


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (_SA_DIR / "token").is_file()


def current_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace kubectl would use: the context's, else the pod's, else "default"."""
    from kubernetes_asyncio import config

    path = _config_file(kubeconfig)
    if path is None:
        if _in_cluster() and (_SA_DIR / "namespace").is_file():
            return (_SA_DIR / "namespace").read_text().strip() or "default"
        return "default"
    try:
        contexts, active = config.list_kube_config_contexts(path)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


@contextlib.asynccontextmanager
async def connect(kubeconfig: str | None = None, context: str | None = None) -> AsyncIterator[Any]:
    """A kubernetes_asyncio ApiClient for the cluster, closed on exit."""
    from kubernetes_asyncio import client, config

    path = _config_file(kubeconfig)
    try:
        if path is None and _in_cluster():
            config.load_incluster_config()
            api = client.ApiClient()
        elif path is None:
            raise ClusterError("no kubeconfig: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config "
                               "(`llamaops dev-cluster up` prints one for the local control plane)")
        else:
            api = await config.new_client_from_config(config_file=path, context=context)
    except config.ConfigException as exc:
        raise ClusterError(f"kubeconfig {path}: {exc}") from None
    try:
        yield api
    finally:
        await api.close()


async def raise_for_status(resp: Any) -> None:
    """ApiException for an error status of a call made with _preload_content=False (which does not raise
    by itself), its body read for the message."""
    from kubernetes_asyncio.client.exceptions import ApiException

    if resp.status >= 400:
        error = ApiException(status=resp.status, reason=resp.reason)
        error.body = await resp.text()
        raise error


async def raw_json(resp: Any) -> Any:
    """The JSON of a call made with _preload_content=False."""
    await raise_for_status(resp)
    return await resp.json()


def api_message(exc: BaseException) -> str:
    """The message of the Status an ApiException carries in its body ("" when there is none)."""
    import json

    try:
        status = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return ""
    return str(status.get("message") or "") if isinstance(status, dict) else ""


def describe_api_error(exc: BaseException) -> str | None:
    """A one-line message for the errors a cluster call can end in, or None for anything else."""
    from aiohttp import ClientError
    from kubernetes_asyncio.client.exceptions import ApiException

    if isinstance(exc, ClusterError):
        return str(exc)
    if isinstance(exc, ApiException):
        message = api_message(exc)
        return f"the API server answered {exc.status} {exc.reason}" + (f": {message}" if message else "")
    if isinstance(exc, ClientError | asyncio.TimeoutError | OSError):
        return f"cannot reach the cluster: {exc or type(exc).__name__}"
    return None


def run(coro: Awaitable[T], what: str) -> T:
    """Runs a coroutine; cluster errors become `llamaops <what>: error: ...` and exit code 2."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        message = describe_api_error(exc)
        if message is None:
            raise
        typer.echo(f"llamaops {what}: error: {message}", err=True)
        raise typer.Exit(2) from None
