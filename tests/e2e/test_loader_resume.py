"""Exact resume of the TopologyAwareLoader: random stop steps, and a crash after the last saved state."""

import random

import pytest
import torch

from keye_train.data.loader.planned import TopologyAwareLoader
from keye_train.data.shards.index import build_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.distributed.parallel_dims import ParallelDims

STEPS = 9


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    summary = synth_dataset(SynthConfig(out=tmp_path_factory.mktemp("loader_resume"), samples=20, seed=9))
    for source in load_manifest(summary["manifest"]).sources:
        for shard in source.shards:
            build_index(shard, tokenizer=summary["tokenizer"])
    return summary


def make_loader(summary, **kwargs):
    return TopologyAwareLoader(
        load_manifest(summary["manifest"]),
        dims=ParallelDims(world_size=1),
        tokenizer=load_tokenizer(summary["tokenizer"]),
        max_seq_len=512,
        microbatches=2,
        **{"prefetch": 2, **kwargs},
    )


def run(loader, steps):
    out = []
    for _ in range(steps):
        step = loader.next_step()
        out.append((step.global_keys, [b.input_ids for b in step.microbatches]))
    return out


def same(a, b):
    assert [keys for keys, _ in a] == [keys for keys, _ in b]
    for (_, ids_a), (_, ids_b) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ids_a, ids_b))


@pytest.fixture(scope="module")
def uninterrupted(synthetic):
    loader = make_loader(synthetic, prefetch=0)
    steps = run(loader, STEPS)
    assert loader.state_dict()["order"]["epoch"] >= 1, "the run must cross an epoch boundary; add steps"
    return steps


def test_resume_at_random_steps_consumes_the_same_samples(synthetic, uninterrupted):
    for stop in sorted(random.Random(1).sample(range(1, STEPS), 3)):
        first = make_loader(synthetic)  # prefetch runs ahead of what the state reports
        same(run(first, stop), uninterrupted[:stop])
        state = first.state_dict()
        first.close()
        resumed = make_loader(synthetic)
        resumed.load_state_dict(state)
        same(run(resumed, STEPS - stop), uninterrupted[stop:])
        resumed.close()


def test_restart_after_a_crash_replays_from_the_last_saved_state(synthetic, uninterrupted):
    k = 3
    crashed = make_loader(synthetic)
    run(crashed, k)
    saved = crashed.state_dict()
    run(crashed, 3)  # steps k+1..k+3 are lost with the process (kill -9): no state saved after k
    crashed.close()
    restarted = make_loader(synthetic, workers=2)  # decoding in worker processes must not change a thing
    restarted.load_state_dict(saved)
    same(run(restarted, STEPS - k), uninterrupted[k:])
    restarted.close()


def test_io_config_decodes_through_the_io_path_identically(synthetic, uninterrupted):
    from keye_train.data.ioserver.config import IOServerConfig

    loader = make_loader(synthetic, io=IOServerConfig())  # no addresses: decode_many decodes locally
    same(run(loader, 4), uninterrupted[:4])
    loader.close()


def _planner(summary, dp, microbatches=1):
    from keye_train.data.media.image import ImageConfig
    from keye_train.data.media.video import VideoConfig
    from keye_train.data.plan.cost import CostModel
    from keye_train.data.plan.order import GlobalOrder, build_tables
    from keye_train.data.plan.steps import StepPlanner

    cfg = load_manifest(summary["manifest"])
    tables = build_tables(cfg, image_cfg=ImageConfig(), video_cfg=VideoConfig(), cost_model=CostModel())
    order = GlobalOrder(cfg, tables=tables)
    return StepPlanner(order, dp=dp, microbatches=microbatches, max_seq_len=512)


def test_dp2_dp1_dp2_resumes_consume_every_sample_of_an_epoch_exactly_once(synthetic):
    """The loader state saved under DP2, resumed under DP1 (fewer rows per step), then DP2 again: every
    sample of each finished epoch is consumed (or skipped with a reason) exactly once, compared with the
    keys the plain tar reader lists."""
    from keye_train.data.shards.sources import iter_raw

    written = sorted(
        (s.name, raw["__key__"]) for s in load_manifest(synthetic["manifest"]).sources for raw in iter_raw(s)
    )
    consumed, state = [], None
    for dp, steps in ((2, 3), (1, 5), (2, 40)):
        planner = _planner(synthetic, dp)
        if state is not None:
            planner.load_state_dict(state)
        for _ in range(steps):
            step = planner.next_step()
            consumed += [(r.epoch, r.source, r.key) for r in step.global_refs]
            consumed += [(r.epoch, r.source, r.key) for r, _ in step.skipped]
        state = planner.state_dict()
    assert state["order"]["epoch"] >= 3 and all(d[4] >= 2 for d in state["deferred"])
    for epoch in (0, 1):
        assert sorted((s, k) for e, s, k in consumed if e == epoch) == written, f"epoch {epoch}"
    # and two seeds give two different orders of the same samples
    other = _planner(synthetic, 2)
    other.order.seed = 1 + other.order.seed
    keys = [r.key for r in other.next_step().global_refs]
    first = [k for e, s, k in consumed[: len(keys)]]
    assert keys != first
