"""TopologyAwareLoader on gloo ranks: planned batches loaded once, loading topology, elastic resume."""

import builtins
import os

import pytest
import torch

from keye_train.data.loader.encode import SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.loader.planned import TopologyAwareLoader
from keye_train.data.shards.index import build_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.sources import iter_raw
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.distributed.parallel_dims import ParallelDims
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.dist
MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    summary = synth_dataset(SynthConfig(out=tmp_path_factory.mktemp("loader"), samples=25, seed=7))
    for source in load_manifest(summary["manifest"]).sources:
        for shard in source.shards:
            build_index(shard, tokenizer=summary["tokenizer"])
    return summary


def make_loader(summary, dims, **kwargs):
    return TopologyAwareLoader(
        load_manifest(summary["manifest"]),
        dims=dims,
        tokenizer=load_tokenizer(summary["tokenizer"]),
        max_seq_len=MAX_SEQ_LEN,
        microbatches=2,
        **{"prefetch": 1, **kwargs},
    )


def samples_of(batch):
    """(key, input_ids) of the samples packed in a PackedBatch, cut at its cu_seqlens."""
    cu = batch.cu_seqlens.tolist()
    return [(key, batch.input_ids[0, cu[i] : cu[i + 1]]) for i, key in enumerate(batch.sample_keys)]


def count_opens():
    """Record every open() of a shard or shard index in this process (read_record and load_index use it)."""
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and str(file).endswith((".tar", ".idx.jsonl")):
            opened.append(os.path.basename(str(file)))
        return real_open(file, *args, **kwargs)

    builtins.open = counting_open
    return opened


def _dp_ranks(rank, world_size, summary, steps):
    loader = make_loader(summary, ParallelDims(world_size=world_size))
    out = []
    for _ in range(steps):
        step = loader.next_step()
        samples = [pair for batch in step.microbatches for pair in samples_of(batch)]
        refs = [(r.key, r.epoch) for r in step.global_refs]
        out.append({"keys": step.global_keys, "refs": refs, "samples": samples, "microbatches": 2})
        assert len(step.microbatches) == 2
    loader.close()
    return out


def test_every_planned_sample_is_loaded_by_exactly_one_replica(synthetic):
    results = run_ranks(_dp_ranks, world_size=2, args=(synthetic, 4))
    tok = load_tokenizer(synthetic["tokenizer"])
    encoder, counter = SampleEncoder(tok), SkipCounter()
    # Reference: every sample decoded by the plain streaming reader, in this process.
    reference = {
        s.key: s.input_ids
        for source in load_manifest(synthetic["manifest"]).sources
        for s in iter_source_samples(source, encoder=encoder, counter=counter)
    }
    for step in range(4):
        planned = results[0][step]["keys"]
        assert results[1][step]["keys"] == planned
        loaded = [key for r in results for key, _ in r[step]["samples"]]
        assert sorted(loaded) == sorted(planned), f"step {step}"
        refs = results[0][step]["refs"]  # a small epoch: a step can hold a key of epoch 0 and of epoch 1
        assert len(set(refs)) == len(refs) and [k for k, _ in refs] == planned
        for r in results:
            for key, ids in r[step]["samples"]:
                assert torch.equal(ids, reference[key]), key


def _pp_tp_ranks(rank, world_size, summary):
    opened = count_opens()
    dims = ParallelDims(world_size=world_size, pp=2, tp=2)
    loader = make_loader(summary, dims)
    steps = [loader.next_step() for _ in range(3)]
    loader.close()
    return {
        "coords": dims.rank_coordinates,
        "opened": list(opened),
        "steps": steps,
        "state": loader.state_dict(),
    }


def test_only_the_stage0_tp0_rank_opens_shards_and_the_rest_receive(synthetic):
    results = run_ranks(_pp_tp_ranks, world_size=4, args=(synthetic,))
    loaders = [r for r in results if r["coords"]["pp"] == 0 and r["coords"]["tp"] == 0]
    assert len(loaders) == 1
    loader = loaders[0]
    assert any(name.endswith(".tar") for name in loader["opened"])
    for r in results:
        if r is not loader:
            assert r["opened"] == [], r["coords"]
        assert r["state"] == loader["state"]
        for mine, theirs in zip(r["steps"], loader["steps"]):
            assert mine.global_keys == theirs.global_keys
            for a, b in zip(mine.microbatches, theirs.microbatches):
                for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "grid_thw"):
                    assert torch.equal(getattr(a, name), getattr(b, name)), name
                if r["coords"]["pp"] == 0:  # the TP peer feeds the ViT too: it gets the pixels
                    assert torch.equal(a.pixel_values, b.pixel_values)
                else:
                    assert a.pixel_values.numel() == 0
    assert any(b.pixel_values.numel() for s in loader["steps"] for b in s.microbatches)


def _consume_epoch0(loader, dims, steps=None):
    """Run steps (or until epoch 0 is fully consumed); per step the keys this rank's replica loaded."""
    out = []
    while steps is None or len(out) < steps:
        step = loader.next_step()
        loaded = [k for b in step.microbatches for k in b.sample_keys]
        tp0 = dims.rank_coordinates["tp"] == 0  # TP peers hold the same batch: count each replica once
        out.append({"refs": [(r.key, r.epoch) for r in step.global_refs], "loaded": loaded if tp0 else []})
        state = loader.state_dict()
        if steps is None and state["order"]["epoch"] >= 1 and all(d[4] >= 1 for d in state["deferred"]):
            break
    return out, loader.state_dict()


def _elastic_ranks(rank, world_size, summary, stop):
    return {first_dp: _elastic_run(world_size, summary, first_dp, stop) for first_dp in (2, 4)}


def _elastic_run(world_size, summary, first_dp, stop):
    layouts = {2: dict(tp=2), 4: {}}  # DP2 x TP2 and DP4 on the same four ranks
    dims_a = ParallelDims(world_size=world_size, **layouts[first_dp])
    first = make_loader(summary, dims_a, prefetch=2)
    before, state = _consume_epoch0(first, dims_a, steps=stop)
    first.close()
    dims_b = ParallelDims(world_size=world_size, **layouts[6 - first_dp])
    second = make_loader(summary, dims_b)
    second.load_state_dict(state)
    after, _ = _consume_epoch0(second, dims_b)
    second.close()
    return before + after


def test_elastic_resume_consumes_every_sample_of_the_epoch_once(synthetic):
    """DP2 -> DP4 and DP4 -> DP2 after 3 steps: the plans differ, the samples consumed do not."""
    by_run = run_ranks(_elastic_ranks, world_size=4, args=(synthetic, 3))
    written = sorted(
        raw["__key__"] for s in load_manifest(synthetic["manifest"]).sources for raw in iter_raw(s)
    )
    for first_dp in (2, 4):
        check_epoch_once([r[first_dp] for r in by_run], written)


def check_epoch_once(results, written):
    steps = len(results[0])
    assert all(len(r) == steps for r in results)
    epoch0 = []
    for step in range(steps):
        refs = results[0][step]["refs"]
        loaded = sorted(k for r in results for k in r[step]["loaded"])
        assert loaded == sorted(k for k, _ in refs), f"step {step}: loaded samples differ from the plan"
        epoch0 += [k for k, epoch in refs if epoch == 0]
    assert sorted(epoch0) == written
