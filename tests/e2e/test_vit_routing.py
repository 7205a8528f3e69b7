"""keye-train on 2 ranks under DP2, TP2, CP2 and PP2: the heterogeneous ViT encodes each image and frame of
the global batch once in the world (per-rank patch counts in metrics.jsonl add up to the global count, and
no rank encodes them all), and the losses equal the single process on the same global batch."""

import pytest
from conftest import metrics, train

pytestmark = [pytest.mark.slow, pytest.mark.dist]
STEPS = 2

# Every layout consumes the same global batch per step: 2 packed rows (dp x data.microbatches).
LAYOUTS = {
    "dp2": ["parallel.dp_shard=2", "data.microbatches=1"],
    "tp2": ["parallel.tp=2", "parallel.dp_shard=1", "data.microbatches=2"],
    "cp2": ["parallel.cp=2", "parallel.dp_shard=1", "data.microbatches=2"],
    "pp2": [
        "parallel.pp=2",
        "parallel.dp_shard=1",
        "data.microbatches=2",
        "parallel.pipeline.microbatches=2",
    ],
}


def overrides(synthetic, run_dir, layout):
    return [
        "recipe=stage2_multitask",
        f"run_dir={run_dir}",
        f"steps={STEPS}",
        f"schedule.total_steps={STEPS}",
        f"data.manifest={synthetic['manifest']}",
        "checkpoint.interval_steps=100",
        *layout,
    ]


@pytest.fixture(scope="module")
def single(synthetic, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vit_single")
    train(overrides=overrides(synthetic, run_dir, ["parallel=single", "data.microbatches=2"]))
    return metrics(run_dir)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_image_is_encoded_once_and_losses_match_one_process(synthetic, single, tmp_path, name):
    port = 29710 + sorted(LAYOUTS).index(name)
    train(nproc=2, port=port, overrides=overrides(synthetic, tmp_path, LAYOUTS[name]))
    records = metrics(tmp_path)
    assert sorted(records) == list(range(STEPS))
    for step, record in records.items():
        reference = single[step]
        per_rank, total = record["vit_patches"], record["vit_patches_global"]
        assert len(per_rank) == 2, record
        # The single process encodes the whole global batch itself: the same total, split over 2 ranks.
        assert total == reference["vit_patches_global"] == sum(reference["vit_patches"]), (name, step)
        assert sum(per_rank) == total, (name, step, per_rank)
        assert all(0 < p < total for p in per_rank), (name, step, per_rank)  # no rank duplicates it all
        assert record["step_hash"] == reference["step_hash"], (name, step)  # the same samples
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-5), (name, step)
