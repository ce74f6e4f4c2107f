"""What the cluster commands share: their --kubeconfig/--context/--namespace options, and running one.

The cluster is found and spoken to through llamaops.kube, the operator's own client module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, TypeVar

import typer

T = TypeVar("T")

KubeconfigOpt = Annotated[str | None, typer.Option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, "
                                                   "else ~/.kube/config).", show_default=False)]
ContextOpt = Annotated[str | None, typer.Option("--context", help="Kubeconfig context (default: the current one).",
                                                show_default=False)]
NamespaceOpt = Annotated[str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's, "
                                                  "else default).", show_default=False)]


def run(coro: Awaitable[T], what: str) -> T:
    """Runs a coroutine; cluster errors become `llamaops <what>: error: ...` and exit code 2."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        from llamaops.kube import describe_api_error  # kubernetes_asyncio: imported only by cluster commands

        message = describe_api_error(exc)
        if message is None:
            raise
        typer.echo(f"llamaops {what}: error: {message}", err=True)
        raise typer.Exit(2) from None
