"""`llamaops validate -f FILE...`: the operator's checks, offline, with the GPU memory plan.

Exit codes, for CI pipelines and pre-commit hooks:
  0  every manifest is valid (warnings allowed, unless --strict)
  1  at least one manifest is invalid
  2  a file could not be read or parsed (the other files are still checked)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2


class Output(str, Enum):
    text = "text"
    json = "json"


@dataclass
class FileReport:
    path: str
    error: str | None = None  # unreadable
    results: list[Any] = field(default_factory=list)  # llamaops.api.validation.Result


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; a directory stands for its *.yaml/*.yml files (not recursive), like kubectl -f DIR."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            out.append(path)
    return out


def check_file(path: Path) -> FileReport:
    from llamaops.api.manifests import load_all
    from llamaops.api.validation import Problem, Result
    from llamaops.builders.serve import validate_manifest  # the serving runtimes' own checks too

    report = FileReport(str(path))
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        docs = load_all(text)
    except (OSError, UnicodeDecodeError) as exc:
        report.error = f"cannot read: {exc}"
        return report
    except yaml.YAMLError as exc:
        report.error = "not valid YAML: " + " ".join(str(exc).split())
        return report
    if not docs:
        report.error = "holds no YAML document"
        return report
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            report.results.append(Result("(document)", f"#{i + 1}", None, [
                Problem("(document)", f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")]))
        else:
            report.results.append(validate_manifest(doc))
    return report


def plan_rows(plan: Any) -> dict[str, Any] | None:
    """The memory plan as plain data: per-GPU components, total, the usable budget and the verdict."""
    from llamaops.api.memory import ServingPlan, TrainingPlan

    if isinstance(plan, TrainingPlan):
        return {
            "kind": "training", "strategy": plan.strategy, "gpus": plan.gpus,
            "gradientCheckpointing": plan.gradient_checkpointing,
            "gpuMemoryGB": plan.gpu_memory_gb, "gpuMemoryAssumed": plan.gpu_memory_assumed,
            "components": {k: round(v, 3) for k, v in plan.rows.items()},
            "perGpuGB": round(plan.per_gpu_gb, 3), "budgetGB": round(plan.budget_gb, 3), "fits": plan.fits,
            "minGpus": plan.min_gpus,
        }
    if isinstance(plan, ServingPlan):
        return {
            "kind": "serving", "tensorParallelSize": plan.tensor_parallel_size,
            "gpuMemoryGB": plan.gpu_memory_gb, "gpuMemoryAssumed": plan.gpu_memory_assumed,
            "components": {k: round(v, 3) for k, v in plan.rows.items()},
            "perGpuGB": round(plan.per_gpu_gb, 3), "budgetGB": round(plan.budget_gb, 3), "fits": plan.fits,
            "minTensorParallelSize": plan.min_tensor_parallel_size,
        }
    return None


def _title(plan: dict[str, Any], model: str) -> str:
    gpu = f"{plan['gpuMemoryGB']:.0f} GB GPU" + (" (assumed: unknown product)" if plan["gpuMemoryAssumed"] else "")
    if plan["kind"] == "training":
        how = "sharded (FSDP)" if plan["strategy"] == "fsdp" else "replicated (data parallel)"
        checkpointing = "on" if plan["gradientCheckpointing"] else "off"
        return f"GPU memory plan: {model}, {plan['gpus']} x {gpu}, {how}, gradient checkpointing {checkpointing}"
    return f"GPU memory plan: {model}, tensor_parallel_size {plan['tensorParallelSize']} x {gpu}"


def plan_table(plan: dict[str, Any], model: str) -> Any:
    from rich.table import Table

    table = Table(title=_title(plan, model), title_justify="left", show_footer=False)
    table.add_column("per GPU")
    table.add_column("GB", justify="right")
    labels = {"weights": "weights", "lora + optimizer": "adapters + gradients + optimizer (fp32)",
              "activations": "activations", "logits": "logits (loss)", "runtime": "CUDA context / runtime",
              "fsdp gather": "FSDP: one layer gathered whole (+ the next, prefetched)"}
    for name, gb in plan["components"].items():
        table.add_row(labels.get(name, name), f"{gb:.2f}")
    verdict = "[green]fits[/]" if plan["fits"] else "[red]does not fit[/]"
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{plan['perGpuGB']:.2f}[/]")
    usable = "usable (90% of GPU memory)" if plan["kind"] == "training" else "vLLM may use (gpu_memory_utilization)"
    table.add_row(usable, f"{plan['budgetGB']:.2f}")
    table.add_row("GPU memory", f"{plan['gpuMemoryGB']:.2f}")
    table.add_row("verdict", verdict)
    if plan["kind"] == "training":
        minimum = plan["minGpus"]
        table.add_row("GPUs needed (sharded)", str(minimum) if minimum is not None else "[red]none suffice[/]")
    else:
        minimum = plan["minTensorParallelSize"]
        table.add_row("smallest tensor_parallel_size", str(minimum) if minimum is not None else "[red]none[/]")
    return table


def _model_name(result: Any) -> str:
    obj = result.obj
    return getattr(getattr(getattr(obj, "spec", None), "model", None), "base_model", "") or "?"


def to_json(reports: list[FileReport]) -> list[dict[str, Any]]:
    out = []
    for rep in reports:
        entry: dict[str, Any] = {"file": rep.path}
        if rep.error:
            entry["error"] = rep.error
        entry["documents"] = [{
            "kind": r.kind, "name": r.name, "valid": r.ok,
            "problems": [{"field": p.field, "message": p.message, "severity": p.severity} for p in r.problems],
            "memoryPlan": plan_rows(r.plan),
        } for r in rep.results]
        out.append(entry)
    return out


def exit_code(reports: list[FileReport], strict: bool = False) -> int:
    if any(r.error for r in reports):
        return EXIT_UNREADABLE
    bad = any(not res.ok or (strict and res.warnings) for rep in reports for res in rep.results)
    return EXIT_INVALID if bad else EXIT_OK


def print_text(reports: list[FileReport], show_plan: bool) -> None:
    from rich.console import Console
    from rich.markup import escape

    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)
    for rep in reports:
        if rep.error:
            err.print(f"[bold red]{escape(rep.path)}[/]: {escape(rep.error)}")
            continue
        for res in rep.results:
            verdict = "[green]valid[/]" if res.ok else "[bold red]invalid[/]"
            counts = []
            if res.errors:
                counts.append(f"{len(res.errors)} error(s)")
            if res.warnings:
                counts.append(f"{len(res.warnings)} warning(s)")
            suffix = f" ({', '.join(counts)})" if counts else ""
            out.print(f"{escape(rep.path)}: {escape(res.kind)}/{escape(res.name or '?')}: {verdict}{suffix}")
            for p in res.problems:
                colour = "red" if p.severity == "error" else "yellow"
                out.print(f"  [{colour}]{p.severity}[/] [bold]{escape(p.field)}[/]: {escape(p.message)}")
            plan = plan_rows(res.plan)
            if show_plan and plan:
                out.print(plan_table(plan, _model_name(res)))


def validate(
    files: Annotated[list[Path], typer.Option("-f", "--filename", help="LlamaFineTune/LlamaServe YAML files "
                                              "(a directory: its *.yaml; '-': stdin).")],
    output: Annotated[Output, typer.Option("--output", "-o", help="text, or json for CI tools.")] = Output.text,
    plan: Annotated[bool, typer.Option("--plan/--no-plan", help="Print the GPU memory plan.")] = True,
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too (exit 1).")] = False,
) -> None:
    """Validate manifests offline with the operator's checks, naming every problem's field.

    The checks: the CRD schema and CEL rules, the Llama catalog, context length, and the GPU memory plan
    (weights, adapters with their gradients and optimizer state, activations, per GPU), printed as a table.

    Exit 0: valid (warnings allowed unless --strict); 1: invalid; 2: a file could not be read or parsed.
    """
    reports = [check_file(p) for p in expand(files)]
    if output is Output.json:
        typer.echo(json.dumps(to_json(reports), indent=2))
    else:
        print_text(reports, plan)
    raise typer.Exit(exit_code(reports, strict))
