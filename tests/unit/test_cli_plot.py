"""`llamaops plot`: curves from metrics.jsonl as the trainer writes it, as a PNG or sparklines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llamaops.cli import app
from llamaops.cli.plot import BLOCKS, read_metrics, sparkline
from typer.testing import CliRunner


def write_metrics(run_dir: Path, steps: int = 40, resume_at: int | None = None) -> Path:
    """Records shaped like llamaops_trainer.progress writes them (a start event, log records, a summary)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [{"time": "t", "event": "start", "spec_hash": "h", "world_size": 1, "resume_from": None,
                "planned_steps": steps}]
    for step in range(1, steps + 1):
        records.append({"time": "t", "step": step, "epoch": step / steps, "loss": 3.0 / step + 0.1,
                        "grad_norm": 1.0, "learning_rate": 1e-3 * (1 - (step - 1) / steps),
                        "tokens_per_second": 900.0, "num_tokens": step * 100})
        if step % 10 == 0:
            records.append({"time": "t", "step": step, "epoch": step / steps, "eval_loss": 3.2 / step + 0.2,
                            "num_tokens": step * 100})
    if resume_at:
        records.append({"time": "t", "event": "start", "resume_from": f"checkpoint-{resume_at}"})
        records += [{"time": "t", "step": s, "epoch": 1.0, "loss": 0.05, "learning_rate": 1e-5, "num_tokens": 0}
                    for s in range(resume_at + 1, steps + 1)]
    records.append({"time": "t", "step": steps, "epoch": 1.0, "train_runtime": 12.0, "train_loss": 0.4})
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"time": "t", "step": 41, "lo')
    return path


def test_read_metrics_keeps_the_newest_record_of_each_step(tmp_path: Path) -> None:
    curves = read_metrics(write_metrics(tmp_path / "run", resume_at=30))
    assert sorted(curves.loss) == list(range(1, 41))
    assert curves.loss[31] == 0.05 and curves.loss[30] == pytest.approx(0.2)
    assert sorted(curves.eval_loss) == [10, 20, 30, 40]
    assert curves.learning_rate[1] == 1e-3
    assert curves.restarts == 1


def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([1, 1, 1]) == BLOCKS[4] * 3
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BLOCKS
    line = sparkline([float(x) for x in range(1000)], width=50)
    assert len(line) == 50 and line[0] == BLOCKS[0] and line[-1] == BLOCKS[-1]


def test_png_is_valid_and_sized(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run")
    out = tmp_path / "loss.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG" and image.size == (1000, 700)
        # Not blank: the curves and labels draw many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (700, 1000)


def test_terminal_sparklines_without_output(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "run")
    result = CliRunner().invoke(app, ["plot", str(path), "--width", "20"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    loss = next(line for line in lines if line.startswith("loss"))
    assert "(steps 1-40)" in loss and "min 0.175 at step 40" in loss
    assert any(line.startswith("eval loss") for line in lines)
    assert any(line.startswith("learning rate") and "1.000e-03" in line for line in lines)


def test_name_means_the_local_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_metrics(tmp_path / "llamaops-runs" / "my-run")
    result = CliRunner().invoke(app, ["plot", "my-run"])
    assert result.exit_code == 0 and "loss" in result.output


def test_missing_source_and_empty_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plot", "nowhere"])
    assert result.exit_code == 2 and "output volume" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"event": "start"}\n')
    result = CliRunner().invoke(app, ["plot", "empty"])
    assert result.exit_code == 1 and "no loss records" in result.output
