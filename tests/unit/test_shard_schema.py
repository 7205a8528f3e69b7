"""docs/data.md's schema as the loader applies it: the field at fault is named, a cut tar loses only what
the cut removed (and names it), overlong samples are counted skips."""

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from keye_train.data.loader.encode import LengthLimit, SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.media.image import ImageConfig
from keye_train.data.shards.index import build_index
from keye_train.data.shards.manifest import SourceConfig
from keye_train.data.shards.sources import iter_records, parse_raw
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text.tokenizer import load_tokenizer

N = 30


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 30 + seed).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("cut") / "caption.tar"
    with wds.TarWriter(str(path), encoder=False) as w:
        for i in range(N):
            w.write({"__key__": f"s{i:03d}", "png": _png(i), "txt": ("caption" + " word" * i).encode()})
    return path


def _conv(doc) -> dict:
    return {"__key__": "k", "json": json.dumps(doc).encode()}


CONV = SourceConfig(name="c", kind="conversation", shards=["-"], weight=1)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            r"content\[0\]\.text: expected a string, got int 5",
        ),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content: expected a string or"),
        ({"messages": "hello"}, "json.messages: expected a non-empty list"),
        ([1, 2], "json: expected an object"),
        ({"messages": [{"role": "user", "content": [{"type": "box", "box": [1, 2, "3", 4]}]}]}, "box"),
        ({"messages": [{"role": "user", "content": [{"type": "ref"}]}]}, r"content\[0\].text: missing"),
        ({"messages": [{"role": "user", "content": [{"type": "sound"}]}]}, r"content\[0\].type"),
    ],
)
def test_field_at_fault_is_named(doc, field):
    with pytest.raises(ValueError, match=field):
        parse_raw(_conv(doc), source=CONV)


def _cut(shard, tmp_path, *, at: str, fraction: float, with_index: bool):
    """A copy of the shard cut `fraction` into member `at`'s data, with or without the full index."""
    with tarfile.open(shard) as tar:
        offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    start, size = offsets[at]
    out = tmp_path / "cut.tar"
    out.write_bytes(shard.read_bytes()[: start + int(size * fraction)])
    if with_index:
        build_index(shard)  # of the whole shard, as if it was indexed before it was cut
        (tmp_path / "cut.tar.idx.jsonl").write_text((shard.parent / "caption.tar.idx.jsonl").read_text())
    return out


@pytest.mark.parametrize(
    ("at", "fraction", "kept"),
    [("s012.txt", 0.5, 12), ("s012.png", 0.5, 12), ("s012.png", 0.0, 12), ("s013.png", -0.01, 13)],
)
def test_cut_tar_keeps_every_sample_before_the_cut_and_names_the_rest(shard, tmp_path, at, fraction, kept):
    # -0.01 of a member: the cut falls inside its header block, after the previous sample's last member
    cut = _cut(shard, tmp_path, at=at, fraction=fraction, with_index=True)
    errors = []
    src = SourceConfig(name="cut", kind="caption", shards=[str(cut)], weight=1)
    keys = [r.key for r in iter_records(src, on_error=lambda k, r: errors.append((k, r)))]
    assert keys == [f"s{i:03d}" for i in range(kept)]
    assert [k for k, _ in errors] == [f"s{i:03d}" for i in range(kept, N)]
    assert all(r.startswith("truncated shard") for _, r in errors)


def test_cut_tar_without_index_reports_the_cut_sample_and_the_lost_tail(shard, tmp_path):
    cut = _cut(shard, tmp_path, at="s020.png", fraction=0.3, with_index=False)
    errors = []
    src = SourceConfig(name="cut", kind="caption", shards=[str(cut)], weight=1)
    keys = [r.key for r in iter_records(src, on_error=lambda k, r: errors.append((k, r)))]
    assert keys == [f"s{i:03d}" for i in range(20)]
    assert [k for k, _ in errors] == ["s020", f"<{cut}>"]
    assert "no index names them" in errors[1][1]


def test_overlong_samples_are_counted_skips(shard, tmp_path):
    build_tokenizer(["caption words " * 20], vocab_size=512, out_dir=tmp_path / "tok")
    enc = SampleEncoder(load_tokenizer(tmp_path / "tok"), image_cfg=ImageConfig(max_tokens=16))
    src = SourceConfig(name="cap", kind="caption", shards=[str(shard)], weight=1)
    lengths = [s.num_tokens for s in iter_source_samples(src, encoder=enc, counter=SkipCounter())]
    limit = sorted(lengths)[N // 2]
    assert min(lengths) < limit < max(lengths)
    counter = SkipCounter(max_skip_rate=1.0)
    kept = list(iter_source_samples(src, encoder=enc, counter=counter, limit=LengthLimit(max_seq_len=limit)))
    assert len(kept) == sum(n <= limit for n in lengths)
    assert counter.skipped["cap"] == sum(n > limit for n in lengths) > 0
    assert counter.reasons["cap"] == {"overlong": counter.skipped["cap"]}
