"""`llamaops plot SOURCE [-o loss.png]`: loss and learning-rate curves from a run's metrics.jsonl.

The trainer (rank 0) appends one JSON record per logging step to
<output>/metrics.jsonl: {"time", "step", "epoch", "loss", "grad_norm",
"learning_rate", "tokens_per_second", "num_tokens"}, evaluation records with
"eval_loss", and {"event": "start", ...} at each (re)start. A resumed run logs
the steps after its checkpoint again: the newest record of a step wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from llamaops.api.contract import METRICS_FILE
from llamaops.cli.local import DEFAULT_RUNS_DIR, SPEC_FILE

BLOCKS = "▁▂▃▄▅▆▇█"


@dataclass
class Curves:
    name: str
    loss: dict[int, float] = field(default_factory=dict)  # step -> value
    learning_rate: dict[int, float] = field(default_factory=dict)
    eval_loss: dict[int, float] = field(default_factory=dict)
    restarts: int = 0  # "start" events after the first


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_metrics(path: Path, name: str = "") -> Curves:
    curves = Curves(name or path.parent.name)
    starts = 0
    for raw in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue  # a line cut short by a crash
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "start":
            starts += 1
            continue
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for key, series in (("loss", curves.loss), ("learning_rate", curves.learning_rate),
                            ("eval_loss", curves.eval_loss)):
            value = _finite(rec.get(key))
            if value is not None:
                series[step] = value
    curves.restarts = max(starts - 1, 0)
    return curves


def resolve(source: str) -> Path:
    """A metrics.jsonl file, a run directory holding one, or NAME: ./llamaops-runs/NAME (a `run --local`)."""
    path = Path(source)
    candidates = [path, path / METRICS_FILE, Path(DEFAULT_RUNS_DIR) / source / METRICS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(source)


def _run_name(metrics: Path) -> str:
    """The run's name from the spec `run --local` leaves beside its metrics, else the directory's name."""
    import yaml

    try:
        return str(yaml.safe_load((metrics.parent / SPEC_FILE).read_text())["metadata"]["name"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return metrics.parent.resolve().name


def sparkline(values: list[float], width: int = 60) -> str:
    """Values as block characters, averaged into at most `width` buckets."""
    if not values:
        return ""
    if len(values) > width:
        n = len(values)
        chunks = [values[i * n // width:(i + 1) * n // width] for i in range(width)]
        values = [sum(c) / len(c) for c in chunks]
    lo, hi = min(values), max(values)
    if hi == lo:
        return BLOCKS[len(BLOCKS) // 2] * len(values)
    return "".join(BLOCKS[round((v - lo) / (hi - lo) * (len(BLOCKS) - 1))] for v in values)


def _fmt(value: float) -> str:
    return f"{value:.3e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4g}"


def summary(curves: Curves, width: int = 60) -> list[str]:
    lines = []
    for label, series in (("loss", curves.loss), ("eval loss", curves.eval_loss),
                          ("learning rate", curves.learning_rate)):
        if not series:
            continue
        steps = sorted(series)
        values = [series[s] for s in steps]
        best = min(steps, key=lambda s: series[s])
        extra = f"  min {_fmt(series[best])} at step {best}" if label != "learning rate" else ""
        lines.append(f"{label:<13} {_fmt(values[0]):>9} {sparkline(values, width)} {_fmt(values[-1])}"
                     f"  (steps {steps[0]}-{steps[-1]}){extra}")
    if curves.restarts:
        lines.append(f"resumed {curves.restarts} time(s) from a checkpoint")
    return lines


def save_png(curves: Curves, out: Path, width_px: int = 1000, height_px: int = 700) -> None:
    """Loss (and eval loss) above, learning rate below, both against the optimizer step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    panels = 2 if curves.learning_rate else 1
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    steps = sorted(curves.loss)
    ax.plot(steps, [curves.loss[s] for s in steps], color="tab:blue", linewidth=1.5, label="training loss")
    if curves.eval_loss:
        ev = sorted(curves.eval_loss)
        ax.plot(ev, [curves.eval_loss[s] for s in ev], "o-", color="tab:orange", label="eval loss")
    ax.set_ylabel("loss")
    ax.set_title(f"{curves.name}: loss" + (" and learning rate" if panels == 2 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    if panels == 2:
        lr = sorted(curves.learning_rate)
        axes[1].plot(lr, [curves.learning_rate[s] for s in lr], color="tab:green", linewidth=1.5)
        axes[1].set_ylabel("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axes[1].grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(out, dpi=dpi)


def plot(
    source: Annotated[str, typer.Argument(help="A metrics.jsonl file, a run's output directory, or NAME: the "
                                         f"output of `llamaops run --local` in ./{DEFAULT_RUNS_DIR}/NAME.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the plot here (.png, .svg, .pdf); "
                                                "without it, sparklines in the terminal.", show_default=False)] = None,
    width: Annotated[int, typer.Option(help="Sparkline width in characters.")] = 60,
) -> None:
    """Loss and learning-rate curves from a run's metrics.jsonl: a PNG with -o, else sparklines.

    metrics.jsonl lives in the run's output directory. For a cluster run that is its output volume
    (pvc://<claim>/<path>/metrics.jsonl, or the S3 staging area of the pod), which this command cannot reach:
    copy the file out (e.g. kubectl cp from a pod that mounts the claim) and pass its path. The live
    numbers of a running cluster run are in `llamaops watch NAME`.
    """
    try:
        path = resolve(source)
    except FileNotFoundError:
        typer.echo(f"llamaops plot: no {METRICS_FILE} at {source} (nor ./{DEFAULT_RUNS_DIR}/{source}). A cluster "
                   f"run's metrics are on its output volume: copy {METRICS_FILE} from there and pass the file.",
                   err=True)
        raise typer.Exit(2) from None
    curves = read_metrics(path, name=_run_name(path))
    if not curves.loss:
        typer.echo(f"llamaops plot: {path} has no loss records yet", err=True)
        raise typer.Exit(1)
    if output is None:
        for text in summary(curves, width):
            typer.echo(text)
        return
    try:
        save_png(curves, output)
    except ImportError:
        typer.echo("llamaops plot: -o needs matplotlib: pip install 'llamaops[cli]'", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{output}: {len(curves.loss)} loss points, steps {min(curves.loss)}-{max(curves.loss)}")
