"""The global sample order: permutations per epoch, token shares, resume from cursors, share changes."""

import random

import pytest
import webdataset as wds
import yaml

from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig
from keye_train.data.plan.cost import CostModel
from keye_train.data.plan.order import GlobalOrder, build_tables
from keye_train.data.shards.index import build_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.sources import iter_raw
from keye_train.data.synth.shards import SynthConfig, synth_dataset

LENGTHS = {"short": (10, 30), "medium": (40, 80), "long": (100, 200)}  # words per text sample
SHARES = {"short": 0.2, "medium": 0.3, "long": 0.5}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    summary = synth_dataset(SynthConfig(out=tmp_path_factory.mktemp("order"), samples=25, seed=5))
    for source in load_manifest(summary["manifest"]).sources:
        for shard in source.shards:
            build_index(shard, tokenizer=summary["tokenizer"])
    return summary


@pytest.fixture(scope="module")
def text_mix(tmp_path_factory):
    """Three text sources of very different lengths, two shards each (fast to write and index)."""
    out = tmp_path_factory.mktemp("text_mix")
    rng = random.Random(0)
    sources = []
    for name, (lo, hi) in LENGTHS.items():
        for shard in range(2):
            with wds.TarWriter(str(out / f"{name}-{shard}.tar"), encoder=False) as writer:
                for i in range(150):
                    words = " ".join(
                        rng.choice("abcdefgh") * rng.randint(1, 6) for _ in range(rng.randint(lo, hi))
                    )
                    writer.write({"__key__": f"{name}{shard}_{i:04d}", "txt": words.encode()})
            build_index(out / f"{name}-{shard}.tar")
        shards = f"{name}-{{0..1}}.tar"
        sources.append({"name": name, "kind": "text", "shards": shards, "token_share": SHARES[name]})
    (out / "manifest.yaml").write_text(yaml.safe_dump({"seed": 11, "sources": sources}))
    return out / "manifest.yaml"


def make_order(manifest, *, shares=None, seed=None):
    cfg = load_manifest(manifest)
    if seed is not None:
        cfg.seed = seed
    tables = build_tables(cfg, image_cfg=ImageConfig(), video_cfg=VideoConfig(), cost_model=CostModel())
    return GlobalOrder(cfg, tables=tables, shares=shares)


def tar_keys(manifest):
    """Every sample key of the manifest, read by the plain webdataset reader (not through the index)."""
    return sorted(raw["__key__"] for s in load_manifest(manifest).sources for raw in iter_raw(s))


def test_each_epoch_is_a_permutation_of_every_sample(synthetic):
    order = make_order(synthetic["manifest"])
    written = tar_keys(synthetic["manifest"])
    refs = [next(order) for _ in range(2 * len(written))]
    epoch0 = [r.key for r in refs if r.epoch == 0]
    epoch1 = [r.key for r in refs if r.epoch == 1]
    assert sorted(epoch0) == written
    assert sorted(epoch1) == written
    assert epoch0 != epoch1, "each epoch must reshuffle"
    again = make_order(synthetic["manifest"])
    assert [next(again).key for _ in refs] == [r.key for r in refs]
    other = make_order(synthetic["manifest"], seed=99)
    assert [next(other).key for _ in epoch0] != epoch0


def test_token_shares_follow_the_targets(text_mix):
    order = make_order(text_mix)
    tokens = dict.fromkeys(LENGTHS, 0)
    for _ in range(300):  # at these shares no source runs out before
        ref = next(order)
        tokens[ref.source] += ref.tokens
    total = sum(tokens.values())
    realised = {k: v / total for k, v in tokens.items()}
    for name, target in SHARES.items():
        assert abs(realised[name] - target) < 0.03, realised
    counts = {name: order.cursors[name] for name in LENGTHS}
    assert counts["short"] > counts["medium"] > counts["long"], "sample counts must follow tokens, not shares"


def test_resume_from_the_cursors_continues_exactly(synthetic):
    reference = make_order(synthetic["manifest"])
    states, keys = [], []
    for _ in range(70):  # crosses two epoch boundaries
        states.append(reference.state_dict())
        keys.append(next(reference).key)
    for stop in random.Random(3).sample(range(70), 6) + [0, 25, 50]:
        resumed = make_order(synthetic["manifest"])
        resumed.load_state_dict(states[stop])
        assert [next(resumed).key for _ in range(70 - stop)] == keys[stop:], f"stop {stop}"


def test_new_shares_continue_every_source_at_its_cursor(text_mix):
    reference = make_order(text_mix)
    refs = [next(reference) for _ in range(600)]
    per_source = {n: [r.key for r in refs if r.source == n] for n in LENGTHS}
    first = make_order(text_mix)
    for _ in range(200):
        next(first)
    state = first.state_dict()
    changed = make_order(text_mix, shares={"short": 0.1, "medium": 0.1, "long": 0.8})
    changed.load_state_dict(state)
    assert changed.bases == state["cursors"]
    after = [next(changed) for _ in range(150)]
    for name in LENGTHS:
        mine = [r.key for r in after if r.source == name]
        start = state["cursors"][name]
        assert mine == per_source[name][start : start + len(mine)], name
    tokens = {n: sum(r.tokens for r in after if r.source == n) for n in LENGTHS}
    assert tokens["long"] / sum(tokens.values()) > 0.7, tokens


def test_a_stale_state_is_refused(synthetic, text_mix):
    order = make_order(synthetic["manifest"])
    state = order.state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_order(synthetic["manifest"], seed=state["seed"] + 1).load_state_dict(state)
    state["sizes"]["text"] += 1
    with pytest.raises(ValueError, match="'text' had"):
        make_order(synthetic["manifest"]).load_state_dict(state)
    with pytest.raises(ValueError, match="shares"):
        make_order(synthetic["manifest"], shares={"text": 1.0})


@pytest.mark.parametrize("by_tokens", [True, False])
def test_vectorised_take_draws_exactly_what_next_draws(by_tokens):
    """GlobalOrder.take (windows of due times merged in numpy) against the one-by-one rule of __next__,
    with unusable samples (index errors, too long) in the stream and across epoch boundaries."""
    import numpy as np

    from keye_train.data.plan.tables import _SourceTable
    from keye_train.data.shards.manifest import DataConfig, SourceConfig

    class Entry:
        def __init__(self, key, error):
            self.key, self.error = key, error

    rng = np.random.default_rng(3)
    share = {"token_share": 1.0} if by_tokens else {"weight": 1.0}
    sources, tables = [], {}
    for s, n in enumerate((37, 120, 5)):
        cfg = SourceConfig(
            name=f"src{s}", kind="text", shards=["a", "b"], **{k: v * (s + 1) for k, v in share.items()}
        )
        sources.append(cfg)
        errors = rng.random(n) < 0.1
        tokens = np.where(errors, 0, rng.integers(1, 300, n))
        tables[cfg.name] = _SourceTable(
            config=cfg,
            shard_start=np.asarray([0, n // 2, n]),
            entries=[Entry(f"{cfg.name}/{i}", "bad" if errors[i] else None) for i in range(n)],
            tokens=tokens.astype(np.int64),
            costs=tokens.astype(np.float64) * 2,
        )
    data = DataConfig(sources=sources, seed=4)
    max_len = 250
    one, many = GlobalOrder(data, tables=tables), GlobalOrder(data, tables=tables)

    def usable(src, flat):
        tok = many.column(src, flat, "tokens")
        return ~many.column(src, flat, "errors") & (tok <= max_len)

    for need in (1, 500, 3000, 7, 12000, 40000):
        drawn = many.take(need, usable=usable)
        got = [(r.source, r.key, r.epoch) for r in many.refs(drawn)]
        expected, total = [], 0
        while total < need:
            ref = next(one)
            expected.append((ref.source, ref.key, ref.epoch))
            if ref.error is None and ref.tokens <= max_len:
                total += ref.tokens
        assert got == expected, need
        assert one.state_dict() == many.state_dict()
    assert many.epoch >= 2, "the draws must cross epoch boundaries"


def test_two_seeds_give_different_orders_within_every_source(synthetic):
    a, b = make_order(synthetic["manifest"], seed=1), make_order(synthetic["manifest"], seed=2)
    for name in a.names:
        pa, pb = a.permutation(name, 0), b.permutation(name, 0)
        assert sorted(pa.tolist()) == sorted(pb.tolist()) == list(range(len(a.tables[name])))
        if len(pa) > 3:
            assert pa.tolist() != pb.tolist(), name
