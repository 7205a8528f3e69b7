"""Held-out evaluation during training: written at its interval, finite, and it follows the training."""

import json
import math

import pytest
from conftest import train

pytestmark = pytest.mark.slow


def test_eval_loss_is_written_at_its_interval(synthetic, tmp_path):
    run_dir = tmp_path / "run"
    train(
        overrides=[
            "recipe=stage2_multitask",
            f"run_dir={run_dir}",
            "steps=4",
            "schedule.total_steps=4",
            f"data.manifest={synthetic['manifest']}",
            f"data.eval_manifest={synthetic['manifest']}",
            "data.eval_interval=2",
            "data.eval_batches=2",
            "parallel=single",
            "optim.lr.llm=3e-3",
        ]
    )
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in records)
    # the same held-out rows, a model trained two more steps: the loss must have moved
    assert records[0]["eval_loss"] != records[1]["eval_loss"]
