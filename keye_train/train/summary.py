"""The table every keye-train run ends with: steps, tokens, time, mean tokens/s and MFU, skipped samples
by reason, checkpoints written. Built from metrics.jsonl (so a resumed run sums all of its segments)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Step records of run_dir/metrics.jsonl in step order; the last record of a step wins (resumes)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def summarise(
    records: Sequence[Mapping[str, Any]],
    *,
    skipped: Mapping[str, int] | None = None,
    checkpoints: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """The numbers of the table (also what tests check)."""
    seconds = sum(r.get("step_time_s") or 0.0 for r in records)
    tokens = sum(int(r.get("tokens") or 0) for r in records)
    mfus = [r["mfu"] for r in records if r.get("mfu") is not None]
    return {
        "steps": len(records),
        "last_step": records[-1]["step"] if records else None,
        "tokens": tokens,
        "time_s": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "final_loss": records[-1].get("loss") if records else None,
        "skipped": dict(sorted((skipped or {}).items())),
        "checkpoints": [str(c) for c in checkpoints],
    }


def format_table(summary: Mapping[str, Any]) -> str:
    def num(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    rows = [
        ("steps", str(summary["steps"])),
        ("tokens", f"{summary['tokens']:,}"),
        ("time", f"{summary['time_s']:.1f} s (sum of step times)"),
        ("mean tokens/s", num(summary["tokens_per_s"], ",.0f")),
        (
            "mean MFU",
            num(summary["mfu"], ".3f") + ("" if summary["mfu"] is not None else " (set peak_tflops)"),
        ),
        ("final loss", num(summary["final_loss"], ".4f")),
    ]
    skipped = summary["skipped"]
    total = sum(skipped.values())
    rows.append(("skipped samples", str(total)))
    rows.extend((f"  {reason}", str(count)) for reason, count in skipped.items() if count)
    rows.append(("checkpoints written", str(len(summary["checkpoints"]))))
    rows.extend(("", path) for path in summary["checkpoints"])
    width = max(len(k) for k, _ in rows)
    body = [f"{key:<{width}}  {value}" for key, value in rows]
    rule = "-" * max(len(line) for line in body)
    return "\n".join(["run summary", rule, *body, rule])


def skipped_by_reason(stream: Any) -> dict[str, int]:
    """The loader's skip counts by reason when it keeps them, else by source."""
    counter = getattr(stream, "counter", None)
    for attr in ("reasons", "skipped"):
        counts = getattr(counter, attr, None)
        if isinstance(counts, Mapping):
            return {str(k): int(v) for k, v in counts.items()}
    return {}


def print_run_summary(trainer: Any, *, out: Any = None) -> dict[str, Any]:
    """Prints the table of a finished (or stopped) run from its trainer; returns the numbers."""
    summary = summarise(
        read_records(trainer.cfg.run_dir),
        skipped=skipped_by_reason(getattr(trainer, "stream", None)),
        checkpoints=getattr(getattr(trainer, "checkpoints", None), "saved", []),
    )
    print(format_table(summary), file=out, flush=True)
    return summary
