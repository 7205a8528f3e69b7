"""Held-out evaluation during training: written at its interval, finite, and it follows the training."""

import json
import math

import pytest
from conftest import train

pytestmark = pytest.mark.slow


def evaluated(synthetic, run_dir, *, nproc=1, port=29700, layout=("parallel=single",)) -> list[dict]:
    train(
        nproc=nproc,
        port=port,
        overrides=[
            "recipe=stage2_multitask",
            f"run_dir={run_dir}",
            "steps=4",
            "schedule.total_steps=4",
            f"data.manifest={synthetic['manifest']}",
            f"data.eval_manifest={synthetic['manifest']}",
            "data.eval_interval=2",
            "data.eval_batches=2",
            "data.microbatches=2",
            "optim.lr.llm=3e-3",
            *layout,
        ],
    )
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(synthetic, tmp_path_factory):
    return evaluated(synthetic, tmp_path_factory.mktemp("eval") / "single")


def test_eval_loss_is_written_at_its_interval(single):
    assert [r["step"] for r in single] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in single)
    # the same held-out rows, a model trained two more steps: the loss must have moved
    assert single[0]["eval_loss"] != single[1]["eval_loss"]


@pytest.mark.dist
def test_eval_under_pipeline_parallelism_equals_one_process(synthetic, single, tmp_path):
    pipeline = ("parallel.pp=2", "parallel.dp_shard=1", "parallel.pipeline.microbatches=2")
    records = evaluated(synthetic, tmp_path / "pp2", nproc=2, port=29741, layout=pipeline)
    assert [r["step"] for r in records] == [2, 4]
    for got, ref in zip(records, single, strict=True):
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), got["step"]
