"""Packing: every token exactly once, no cross-sample attention, per-sample positions, over-long policy."""

import torch

from keye_train.data.batch import IGNORE_INDEX, EncodedSample
from keye_train.data.loader.packing import Packer, PackingConfig, build_batch, pack
from keye_train.models.rope import mrope_position_ids

VS, VE, PAD_IMG = 900, 901, 902  # vision start/end and image pad ids of these hand-made samples


def sample(key: str, n_text: int, *, base: int, image_at: int | None = None) -> EncodedSample:
    """Text tokens base, base+1, ...; optionally a 2x2-merged 4x4 image block (4 pads) at image_at."""
    ids = list(range(base, base + n_text))
    grids = []
    if image_at is not None:
        ids[image_at:image_at] = [VS, PAD_IMG, PAD_IMG, PAD_IMG, PAD_IMG, VE]
        grids = [(4, 4)]
    input_ids = torch.tensor(ids)
    labels = torch.cat([input_ids[1:], torch.tensor([IGNORE_INDEX])])
    return EncodedSample(
        key=key,
        source="s",
        kind="text",
        input_ids=input_ids,
        labels=labels,
        position_ids=mrope_position_ids(input_ids, grids_hw=grids, visual_token_ids=[PAD_IMG]),
        pixel_values=torch.randn(16 * len(grids), 3, 14, 14),
        grid_thw=torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long).reshape(-1, 3),
    )


def make_samples():
    lengths = [5, 17, 3, 30, 8, 12, 1, 25, 9, 14, 6, 22]
    out = []
    for i, n in enumerate(lengths):
        out.append(sample(f"k{i}", n, base=1000 * (i + 1), image_at=1 if i % 3 == 0 else None))
    return out


def test_every_token_once_and_boundaries():
    samples = make_samples()
    batches = list(
        pack(iter(samples), cfg=PackingConfig(max_seq_len=40, open_bins=3), vision_start=VS, vision_end=VE)
    )
    seen_keys = [k for b in batches for k in b.sample_keys]
    assert sorted(seen_keys) == sorted(s.key for s in samples)  # no sample lost, none twice
    by_key = {s.key: s for s in samples}
    text_tokens = []
    for b in batches:
        assert (
            b.input_ids.shape == (1, 40) and b.labels.shape == (1, 40) and b.position_ids.shape == (3, 1, 40)
        )
        cu = b.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == 40 and b.cu_seqlens.dtype == torch.int32
        n_real = len(b.sample_keys)
        # each real segment is exactly one sample, in order; the rest is one padding segment
        for j, key in enumerate(b.sample_keys):
            s = by_key[key]
            lo, hi = cu[j], cu[j + 1]
            assert torch.equal(b.input_ids[0, lo:hi], s.input_ids)
            assert torch.equal(b.labels[0, lo:hi], s.labels)
            assert torch.equal(b.position_ids[:, 0, lo:hi], s.position_ids)
            assert b.position_ids[:, 0, lo].tolist() == [0, 0, 0]  # positions restart per sample
        if len(cu) - 1 > n_real:
            assert len(cu) - 1 == n_real + 1
            assert (b.labels[0, cu[n_real] :] == IGNORE_INDEX).all()
        text_tokens += [t for t in b.input_ids[0, : cu[n_real]].tolist() if t >= 1000]
        # visual items travel with their samples, in order
        expected_grids = [g for k in b.sample_keys for g in by_key[k].grid_thw.tolist()]
        assert b.grid_thw.tolist() == expected_grids
        assert b.pixel_values.shape[0] == sum(h * w for _, h, w in expected_grids)
    all_text = [t for s in samples for t in s.input_ids.tolist() if t >= 1000]
    assert sorted(text_tokens) == sorted(all_text) and len(set(all_text)) == len(all_text)


def test_no_cross_sample_attention():
    samples = make_samples()
    batch = next(iter(pack(iter(samples), cfg=PackingConfig(max_seq_len=64), vision_start=VS, vision_end=VE)))
    owner = torch.full((64,), -1)
    for j in range(len(batch.cu_seqlens) - 1):
        owner[batch.cu_seqlens[j] : batch.cu_seqlens[j + 1]] = j
    # the causal varlen mask implied by cu_seqlens: i attends j iff j <= i in the same segment
    seg = torch.bucketize(torch.arange(64), batch.cu_seqlens[1:].long(), right=True)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(64, 64, dtype=torch.bool).tril()
    i, j = mask.nonzero(as_tuple=True)
    assert (owner[i] == owner[j]).all()
    token_sample = {t: s.key for s in samples for t in s.input_ids.tolist() if t >= 1000}
    ids = batch.input_ids[0]
    for a, b in zip(i.tolist(), j.tolist()):
        ta, tb = int(ids[a]), int(ids[b])
        if ta >= 1000 and tb >= 1000:
            assert token_sample[ta] == token_sample[tb]


def test_overlong_skip_is_counted():
    packer = Packer(PackingConfig(max_seq_len=10, overlong="skip"), vision_start=VS, vision_end=VE)
    out = list(packer.add(sample("long", 11, base=1000)))
    out += list(packer.add(sample("ok", 10, base=2000)))
    out += list(packer.flush())
    assert [b.sample_keys for b in out] == [["ok"]]
    assert packer.stats.skipped["overlong"] == 1 and packer.stats.skipped_keys == ["long"]


def test_truncate_text_cuts_trailing_text_only():
    packer = Packer(PackingConfig(max_seq_len=10, overlong="truncate_text"), vision_start=VS, vision_end=VE)
    # image block occupies positions 1..6, text after it: cut at 10 removes text only
    cut_ok = sample("cut", 8, base=1000, image_at=1)  # 14 tokens
    out = list(packer.add(cut_ok)) + list(packer.flush())
    assert len(out) == 1 and out[0].sample_keys == ["cut"]
    got = out[0]
    assert got.input_ids[0].tolist() == [1000, VS, PAD_IMG, PAD_IMG, PAD_IMG, PAD_IMG, VE, 1001, 1002, 1003]
    assert got.labels[0].tolist() == [
        VS,
        PAD_IMG,
        PAD_IMG,
        PAD_IMG,
        PAD_IMG,
        VE,
        1001,
        1002,
        1003,
        IGNORE_INDEX,
    ]
    assert packer.stats.truncated == 1
    # an image block crossing the cut cannot be truncated: skipped and counted
    packer = Packer(PackingConfig(max_seq_len=10, overlong="truncate_text"), vision_start=VS, vision_end=VE)
    crossing = sample("cross", 8, base=1000, image_at=6)  # block at 6..11
    assert list(packer.add(crossing)) == [] and list(packer.flush()) == []
    assert packer.stats.skipped["overlong, not truncatable"] == 1 and packer.stats.skipped_keys == ["cross"]


def test_exact_fit_has_no_padding_segment():
    batch = build_batch(
        [sample("a", 4, base=1000), sample("b", 6, base=2000)], max_seq_len=10, pad_token_id=0
    )
    assert batch.cu_seqlens.tolist() == [0, 4, 10]
    padded = build_batch([sample("a", 4, base=1000)], max_seq_len=10, pad_token_id=0)
    assert padded.cu_seqlens.tolist() == [0, 4, 10]
    assert padded.input_ids[0, 4:].tolist() == [0] * 6 and padded.num_target_tokens == 3
