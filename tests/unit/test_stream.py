"""PackedStream: deterministic epochs and an exact resume from its two-integer state."""

import pytest

from keye_train.data.loader.packing import PackingConfig
from keye_train.data.loader.stream import PackedStream
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synth_dataset(SynthConfig(out=tmp_path_factory.mktemp("stream"), samples=20, seed=4))


def make_stream(summary):
    tok = load_tokenizer(summary["tokenizer"])
    return PackedStream(
        load_manifest(summary["manifest"]),
        tokenizer=tok,
        packing=PackingConfig(max_seq_len=512, pad_token_id=0),
    )


def test_resume_continues_exactly_across_an_epoch_boundary(synthetic):
    reference = make_stream(synthetic)
    keys = [reference.next_batch().sample_keys for _ in range(12)]
    assert reference.state.epoch >= 1, "the test must cross an epoch boundary; add steps"

    for stop in (3, 9):
        first = make_stream(synthetic)
        for _ in range(stop):
            first.next_batch()
        resumed = make_stream(synthetic)
        resumed.load_state_dict(first.state_dict())
        assert [resumed.next_batch().sample_keys for _ in range(12 - stop)] == keys[stop:]


def test_every_sample_of_an_epoch_appears_once(synthetic):
    stream = make_stream(synthetic)
    keys = []
    while True:
        batch = stream.next_batch()
        if stream.state.epoch > 0:  # this batch is the first of epoch 1
            break
        keys += batch.sample_keys
    assert len(keys) == len(set(keys))
    written = sum(synthetic["counts"].values())
    skipped = sum(s["skipped"] for s in stream.counter.summary().values())
    assert len(keys) + skipped == written
