"""`keye-report RUN_DIR... [--out report.png]`: training curves of one or several runs from metrics.jsonl.

One PNG with a panel per metric (loss, learning rate, grad norm, tokens/s, MFU, per-rank imbalance,
skipped samples); every run is a line, labelled by its directory, so runs compare on one page (e.g. the
two stage-3 anneals). Metrics a run did not record (MFU without peak_tflops) are left out of its panel.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from keye_train.train.summary import read_records

# (title, metrics.jsonl keys drawn in the panel, log scale)
PANELS = (
    ("loss", ("loss",), False),
    ("learning rate", ("lr",), False),
    ("grad norm", ("grad_norm",), True),
    ("tokens / s", ("tokens_per_s",), False),
    ("MFU", ("mfu",), False),
    ("per-rank imbalance (max / mean)", ("step_time_imbalance", "tokens_imbalance"), False),
    ("skipped samples (cumulative)", ("skipped_samples",), False),
)


def _label(run_dir: Path, runs: Sequence[Path]) -> str:
    names = [r.name for r in runs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def draw(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Renders the report of `runs` to the PNG `out` (`.png` added when it has another suffix or none);
    returns the file written; ValueError when no run has a step record."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    data = {run: read_records(run) for run in runs}
    empty = [str(r) for r, records in data.items() if not records]
    if len(empty) == len(runs):
        raise ValueError(f"no step records in {', '.join(empty)}/metrics.jsonl: nothing to draw")
    columns = 2
    rows = (len(PANELS) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (title, keys, log_scale) in zip(axes.flat, PANELS):
        drawn = 0
        for run, records in data.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if not points:
                    continue
                steps, values = zip(*points)
                suffix = f" {key}" if len(keys) > 1 else ""
                ax.plot(steps, values, label=_label(run, runs) + suffix, linewidth=1.2)
                drawn += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn and log_scale:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(PANELS) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    if out.suffix.lower() != ".png":  # savefig would add it itself: the path printed must be the file
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keye-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each holding metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="PNG to write; .png is added if missing (default: FIRST_RUN_DIR/report.png)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.jsonl").is_file()]
    if missing:
        print(f"keye-report: error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 1
    out = args.out or str(Path(args.runs[0]) / "report.png")
    try:
        path = draw(args.runs, out)
    except (ValueError, OSError) as err:
        print(f"keye-report: error: {err}", file=sys.stderr)
        return 1
    print(f"keye-report: wrote {path} ({len(args.runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
