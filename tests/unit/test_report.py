"""keye-report draws the curves of several runs into one PNG; the run summary sums their records."""

import math
from pathlib import Path

import numpy as np
from PIL import Image

from keye_train.cli.report import main as report_main
from keye_train.train.metrics import LoggingConfig, MetricsLogger, WandbConfig
from keye_train.train.summary import format_table, read_records, summarise

QUIET = dict(progress_bar=False, wandb=WandbConfig(mode="disabled"), log_interval=1000)


def _run(run_dir, *, steps: int, scale: float) -> None:
    with MetricsLogger(LoggingConfig(**QUIET), run_dir=run_dir) as logger:
        for step in range(steps):
            logger.log_step(
                step,
                loss=scale * math.exp(-step / 5),
                lr=1e-3 * min(1.0, (step + 1) / 3),
                grad_norm=1.0 + step % 3,
                tokens=1000,
                samples=4,
                step_time_s=0.5,
                sample_keys=[f"k{step}"],
                flops_per_step=1e12,
                peak_flops=4e12,
                skipped_samples=step // 4,
                rank_step_times_s=[0.5, 0.4 + 0.01 * step],
                rank_tokens=[500.0, 400.0],
            )


def test_report_renders_a_png_comparing_runs(tmp_path, capsys):
    _run(tmp_path / "mix_a", steps=12, scale=3.0)
    _run(tmp_path / "mix_b", steps=8, scale=2.0)
    out = tmp_path / "report.png"
    assert report_main([str(tmp_path / "mix_a"), str(tmp_path / "mix_b"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    image = Image.open(out).convert("RGB")
    assert image.size == (1200, 1280)  # 12 x 12.8 inches at 100 dpi: 7 panels on a 2 x 4 grid
    pixels = np.asarray(image).astype(int)
    not_white = (pixels.min(axis=2) < 200).mean()
    assert 0.01 < not_white < 0.5  # axes, text and curves; not blank, not a solid fill
    # Two runs -> two line colours (matplotlib's first two: blue and orange) somewhere on the page.
    blue = ((abs(pixels[..., 0] - 31) < 30) & (abs(pixels[..., 1] - 119) < 30) & (pixels[..., 2] > 150)).sum()
    orange = ((pixels[..., 0] > 220) & (abs(pixels[..., 1] - 127) < 30) & (pixels[..., 2] < 60)).sum()
    assert blue > 100 and orange > 100


def test_report_prints_the_file_it_wrote(tmp_path, capsys):
    _run(tmp_path / "run", steps=2, scale=1.0)
    assert report_main([str(tmp_path / "run"), "--out", str(tmp_path / "curves")]) == 0
    written = capsys.readouterr().out.split("wrote ")[1].split(" (")[0]
    assert written == str(tmp_path / "curves.png") and Path(written).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run"]


def test_report_refuses_a_dir_without_metrics(tmp_path, capsys):
    assert report_main([str(tmp_path / "nothing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_summary_sums_the_records_of_a_resumed_run(tmp_path):
    _run(tmp_path / "run", steps=6, scale=1.0)
    _run(tmp_path / "run", steps=4, scale=1.0)  # a resume that re-did steps 0-3 (last record wins)
    records = read_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(6))
    summary = summarise(records, skipped={"caption": 2, "video": 0}, checkpoints=["c/step-6", "c/final"])
    assert summary["steps"] == 6 and summary["tokens"] == 6000 and summary["time_s"] == 3.0
    assert summary["tokens_per_s"] == 2000 and summary["mfu"] == 0.5  # 1e12 / (0.5 s * 4e12)
    table = format_table(summary)
    assert "6,000" in table and "caption" in table and "video" not in table and "c/final" in table
