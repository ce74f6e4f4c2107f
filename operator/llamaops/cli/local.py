"""`llamaops run --local -f FILE`: the trainer on this machine, with the contract a cluster run gets.

What a training pod gets, and what a local run gets instead:

  the spec       ConfigMap <name>-spec at /etc/llamaops/spec.yaml  ->  <output>/llamaops-spec.yaml, the same
                 document (builders.finetune.spec_document: every default spelled out)
  the command    python -m llamaops_trainer.launch --nnodes=1 --nproc-per-node=N --standalone
                 -m llamaops_trainer --spec <spec>   (the same launcher and torchrun flags, one node)
  claims         pvc://<claim>/<path> mounted at /mnt/pvc/<claim>  ->  <pvc-root>/<claim>/<path>
                 ($LLAMAOPS_PVC_ROOT)
  output         the output claim's <path>  ->  --output-dir ($LLAMAOPS_OUTPUT_DIR); an S3 output is
                 still uploaded at the end, with the AWS_* credentials of this shell
  status         rank 0 patches the LlamaFineTune  ->  nothing (no LLAMAOPS_NAME/NAMESPACE): metrics.jsonl only
  exit code      the trainer's contract code (0, 64 bad config, 65 bad data, 75 retryable), passed through
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from llamaops.api.contract import (
    ADAPTER_DIR,
    ENV_NAME,
    ENV_NAMESPACE,
    ENV_OUTPUT_DIR,
    ENV_PVC_ROOT,
    ENV_SPEC,
    METRICS_FILE,
    parse_pvc_uri,
)

SPEC_FILE = "llamaops-spec.yaml"
DEFAULT_RUNS_DIR = "llamaops-runs"  # ./llamaops-runs/<name>: where `llamaops plot NAME` looks
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"llamaops run: {message}", err=True)
    return typer.Exit(code)


def pick(docs: list[Any], name: str | None, path: str) -> dict[str, Any]:
    finetunes = [d for d in docs if isinstance(d, dict) and d.get("kind") == "LlamaFineTune"]
    if name:
        finetunes = [d for d in finetunes if (d.get("metadata") or {}).get("name") == name]
    if len(finetunes) != 1:
        which = f' named "{name}"' if name else ""
        raise fail(f"{path} holds {len(finetunes)} LlamaFineTune(s){which}; expected one (use --name)")
    return finetunes[0]


def set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """spec.<dotted> = value (dotted relative to spec, e.g. training.max_steps)."""
    keys = dotted.removeprefix("spec.").split(".")
    node = doc.setdefault("spec", {})
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise fail(f"--set {dotted}: spec.{key} is not a mapping")
    node[keys[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise fail(f"--set {item!r}: expected KEY=VALUE, e.g. training.max_steps=5")
    from llamaops.api.manifests import load_all

    parsed = load_all(f"v: {raw}")  # YAML like the manifest: numbers, booleans, 1e-3
    return key, parsed[0]["v"] if parsed else None


def claim_paths(spec: Any, pvc_root: Path) -> list[tuple[str, Path]]:
    """(field, local path) of each input the run reads from a claim."""
    out = []
    if spec.model.base_model.startswith("pvc://"):
        claim, sub = parse_pvc_uri(spec.model.base_model)
        out.append(("spec.model.base_model", pvc_root / claim / sub))
    if spec.dataset.pvc is not None:
        out.append(("spec.dataset.pvc", pvc_root / spec.dataset.pvc.claim_name / spec.dataset.pvc.path))
    return out


def local_command(spec_path: str, nproc: str, python: str = sys.executable) -> list[str]:
    """The Job container's command and args for one node, with this interpreter and the local spec path."""
    from llamaops.builders.finetune import launch_command, torchrun_args

    return [*launch_command(python), *torchrun_args(1, nproc, spec_path=spec_path)]


def local_env(base: dict[str, str], spec_path: str, pvc_root: Path, output_dir: Path, nproc: str,
              cpu: bool) -> dict[str, str]:
    """This shell's environment with the pod's fixed trainer variables (this shell's NCCL settings win)."""
    from llamaops.builders.finetune import TRAINER_ENV

    env = dict(base)
    for var in (ENV_NAME, ENV_NAMESPACE):  # no status to patch: this run has no object
        env.pop(var, None)
    env.update({ENV_SPEC: spec_path, ENV_PVC_ROOT: str(pvc_root), ENV_OUTPUT_DIR: str(output_dir),
                "PYTHONUNBUFFERED": TRAINER_ENV["PYTHONUNBUFFERED"]})
    for var, value in TRAINER_ENV.items():
        env.setdefault(var, value)
    if nproc != "1" and sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: rendezvous on loopback
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _wait(proc: subprocess.Popen) -> int:
    """The trainer's exit code. Ctrl-C reaches it too (same process group): it checkpoints and exits 75;
    a second Ctrl-C kills it."""
    interrupted = False
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            if interrupted:
                proc.kill()
                return proc.wait()
            interrupted = True
            typer.echo("llamaops run: stopping after the current step (Ctrl-C again to kill)", err=True)


def run(
    local: Annotated[bool, typer.Option("--local", help="Run on this machine (the only mode: on a cluster, "
                                        "kubectl apply -f FILE, then llamaops watch NAME).")] = False,
    filename: Annotated[Path | None, typer.Option("-f", "--filename", help="The LlamaFineTune manifest.",
                                                  show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Which LlamaFineTune of the file.", show_default=False)] = None,
    pvc_root: Annotated[Path | None, typer.Option(
        "--pvc-root", envvar=ENV_PVC_ROOT,
        help="pvc://<claim>/<path> is read from DIR/<claim>/<path>.", show_default="./pvc")] = None,
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", help="Checkpoints, metrics.jsonl and the adapter.",
        show_default=f"./{DEFAULT_RUNS_DIR}/<name>")] = None,
    nproc: Annotated[str, typer.Option(help="Worker processes (torchrun --nproc-per-node): a number, or 'gpu' for "
                                       "one per local GPU.")] = "1",
    cpu: Annotated[bool, typer.Option("--cpu", help="Hide local GPUs (CUDA_VISIBLE_DEVICES=\"\").")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Override training.max_steps (a short trial run).",
                                                  show_default=False)] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a spec field: KEY=VALUE, KEY relative to spec (training.logging_steps=1).",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the spec, print the command; run nothing.")] = False,
) -> None:
    """Train a LlamaFineTune on this machine, exactly as a cluster run would (run --local -f FILE).

    CPU or local GPUs, torchrun for several processes, with the spec document, launcher and environment a
    training pod gets: debug a recipe before spending cluster GPUs.

    Exits with the trainer's code: 0, 64 (bad config), 65 (bad data), 75 (retryable); 2 for usage errors.
    """
    from llamaops.api.manifests import load_file
    from llamaops.api.validation import validate_finetune
    from llamaops.builders.finetune import spec_document

    if not local:
        raise fail("only --local is supported here; for the cluster: kubectl apply -f FILE && llamaops watch NAME")
    if filename is None:
        raise fail("-f FILE is required")
    if not (nproc.isdigit() and int(nproc) >= 1) and nproc not in ("gpu", "auto"):
        raise fail(f"--nproc {nproc!r}: a number >= 1, 'gpu' or 'auto'")
    try:
        docs = load_file(filename)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"cannot read {filename}: {' '.join(str(exc).split())}") from None
    doc = pick(docs, name, str(filename))
    if max_steps is not None:
        set_path(doc, "training.max_steps", max_steps)
    for item in overrides or []:
        set_path(doc, *parse_set(item))

    result = validate_finetune(doc)
    for p in result.problems:
        typer.echo(f"{p.severity}: {p}", err=True)
    if not result.ok:
        raise fail(f"{filename}: invalid spec (see above)", 1)
    lft = result.obj
    run_name = lft.metadata.name or "local"
    root = (pvc_root or Path("pvc")).resolve()
    missing = [(f, p) for f, p in claim_paths(lft.spec, root) if not p.exists()]
    for field, path in missing:
        typer.echo(f"llamaops run: {field}: {path} does not exist (pvc://<claim>/<path> is read from "
                   f"--pvc-root/<claim>/<path>)", err=True)
    if missing:
        raise typer.Exit(1)

    out = (output_dir or Path(DEFAULT_RUNS_DIR) / run_name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    spec_path.write_text(spec_document(lft))
    command = local_command(str(spec_path), nproc)
    env = local_env(dict(os.environ), str(spec_path), root, out, nproc, cpu)
    if lft.spec.resources.nodes > 1:
        typer.echo(f"note: the spec asks for {lft.spec.resources.nodes} nodes; locally it runs as one node with "
                   f"{nproc} process(es)", err=True)
    if lft.spec.output.s3 is not None:
        typer.echo(f"note: spec.output is {lft.spec.output.s3.uri}: the adapter is uploaded there at the end",
                   err=True)
    if dry_run:
        typer.echo(f"spec: {spec_path}")
        for var in (ENV_SPEC, ENV_PVC_ROOT, ENV_OUTPUT_DIR):
            typer.echo(f"{var}={env[var]}")
        typer.echo(" ".join(command))
        return
    if importlib.util.find_spec("llamaops_trainer") is None or importlib.util.find_spec("torch") is None:
        raise fail("the trainer is not installed here: pip install 'llamaops[trainer]'")
    typer.echo(f"llamaops run: {run_name}: training locally, output in {out}", err=True)
    code = _wait(subprocess.Popen(command, env=env))
    adapter = out / ADAPTER_DIR
    if code == 0:
        typer.echo(f"adapter: {adapter}")
        typer.echo(f"metrics: {out / METRICS_FILE}  (llamaops plot {out} -o loss.png)")
    else:
        typer.echo(f"llamaops run: the trainer exited {code}", err=True)
    raise typer.Exit(code)
