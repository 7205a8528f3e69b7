"""Held-out evaluation during training: written at its interval, finite, and it follows the training."""

import json
import math

import pytest

pytestmark = pytest.mark.slow


def evaluated(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def test_eval_loss_is_written_at_its_interval(layout_run):
    single = evaluated(layout_run("single"))  # data.eval_interval=2 over 4 steps (conftest.LAYOUTS)
    assert [r["step"] for r in single] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in single)
    # the same held-out rows, a model trained two more steps: the loss must have moved
    assert single[0]["eval_loss"] != single[1]["eval_loss"]


@pytest.mark.dist
def test_eval_under_pipeline_parallelism_equals_one_process(layout_run):
    single, records = evaluated(layout_run("single")), evaluated(layout_run("pp2"))
    assert [r["step"] for r in records] == [2, 4]
    for got, ref in zip(records, single, strict=True):
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), got["step"]
