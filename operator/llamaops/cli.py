"""The `llamaops` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from llamaops.devcluster.cli import app as dev_cluster_app

app = typer.Typer(no_args_is_help=True, help="LlamaOps: Llama LoRA/QLoRA fine-tuning and vLLM serving on Kubernetes.")
app.add_typer(dev_cluster_app, name="dev-cluster")


@app.command()
def validate(
    files: Annotated[list[Path], typer.Option("-f", "--filename", help="LlamaFineTune/LlamaServe YAML files.")],
) -> None:
    """Validate manifests offline with the operator's checks; exit 1 on any error, 2 on unreadable input."""
    from llamaops.api.manifests import load_file
    from llamaops.api.validation import validate_manifest

    failed = False
    for path in files:
        try:
            docs = load_file(path)
        except (OSError, yaml.YAMLError) as exc:
            typer.echo(f"{path}: cannot read: {exc}", err=True)
            raise typer.Exit(2) from None
        for doc in docs:
            result = validate_manifest(doc)
            status = "ok" if result.ok else "invalid"
            typer.echo(f"{path}: {result.kind}/{result.name}: {status}")
            for problem in result.problems:
                typer.echo(f"  {problem.severity}: {problem}")
            failed |= not result.ok
    raise typer.Exit(1 if failed else 0)


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
