"""keye-train on 2 ranks under DP2, TP2, CP2 and PP2: the heterogeneous ViT encodes each image and frame of
the global batch once in the world (per-rank patch counts in metrics.jsonl add up to the global count, and
no rank encodes them all), and the losses equal the single process on the same global batch.

Under PP2 only stage 0 loads: both ranks encoding on every step means the pixels of the items given to
stage 1 were shipped to it."""

import pytest
from conftest import LAYOUT_STEPS, metrics

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.mark.parametrize("name", ["cp2", "dp2", "pp2", "tp2"])
def test_each_image_is_encoded_once_and_losses_match_one_process(layout_run, name):
    single = metrics(layout_run("single"))
    records = metrics(layout_run(name))
    assert sorted(records) == sorted(single) == list(range(LAYOUT_STEPS))
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
