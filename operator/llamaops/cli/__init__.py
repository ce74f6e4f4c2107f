"""The `llamaops` command line.

    validate   offline validation and the GPU memory plan        (validate.py)
    watch      live progress of fine-tuning runs                   (watch.py)
    queue      the GPU queue and capacity per GPU product          (queue.py)
    run        a LlamaFineTune trained on this machine (--local)   (local.py)
    plot       loss and learning-rate curves from metrics.jsonl    (plot.py)
    logs       the training pods' logs, rank-prefixed              (logs.py)
    chat       one question to a LlamaServe, the answer on stdout  (chat.py)
    operator   the operator itself

Other distributions add commands through the `llamaops.commands` entry point group: the dev tooling
(operator/dev) adds `dev-cluster`, a local control plane with simulated GPU nodes.

Heavy imports (kubernetes_asyncio, matplotlib, torch) happen inside the
commands, so `llamaops validate` stays quick.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Annotated

import typer

from llamaops.cli import chat, local, logs, plot, queue, validate, watch

COMMANDS_GROUP = "llamaops.commands"

app = typer.Typer(no_args_is_help=True, help="LlamaOps: Llama LoRA/QLoRA fine-tuning and vLLM serving on Kubernetes.")
app.command()(validate.validate)
app.command()(watch.watch)
app.command()(queue.queue)
app.command()(local.run)
app.command()(plot.plot)
app.command()(logs.logs)
app.command()(chat.chat)
for _plugin in entry_points(group=COMMANDS_GROUP):
    # Each entry point is a typer app; its name is the command (dev-cluster: llamaops_dev).
    app.add_typer(_plugin.load(), name=_plugin.name)


@app.command()
def operator(
    namespaces: Annotated[str, typer.Option(envvar="LLAMAOPS_NAMESPACES",
                                            help="Comma-separated namespaces to manage; empty: all.")] = "",
    queue_mode: Annotated[str, typer.Option(envvar="LLAMAOPS_QUEUE_MODE", help="builtin or kueue.")] = "builtin",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the operator (in-cluster credentials, else KUBECONFIG like kubectl)."""
    import os

    from llamaops.operator import run
    from llamaops.settings import Settings

    env = dict(os.environ, LLAMAOPS_NAMESPACES=namespaces, LLAMAOPS_QUEUE_MODE=queue_mode)
    try:
        settings = Settings.from_env(env)
    except ValueError as exc:
        typer.echo(f"operator: {exc}", err=True)
        raise typer.Exit(2) from None
    run(settings, verbose=verbose)


def main() -> None:
    app()
