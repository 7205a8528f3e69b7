"""Synthetic shards read back for every kind; labels of the synthetic data are true to the pixels."""

import io
import json

import pytest
import torch
from PIL import Image

from keye_train.data.loader.encode import SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig
from keye_train.data.shards.manifest import SourceConfig, load_manifest, parse_manifest
from keye_train.data.shards.sources import iter_raw, iter_records
from keye_train.data.synth.media import COLORS
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.models.configs import tiny


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth_dataset(SynthConfig(out=out, samples=40, seed=1, shards_per_kind=2))
    return out


def test_manifest_and_counts(synth_dir):
    cfg = load_manifest(synth_dir / "manifest.yaml")
    assert [s.kind for s in cfg.sources] == ["caption", "conversation", "interleaved", "video", "text"]
    assert all(len(s.shards) == 2 for s in cfg.sources)
    assert cfg.target_shares()["video"] == pytest.approx(0.24)
    counts = {s.kind: sum(1 for _ in iter_raw(s)) for s in cfg.sources}
    assert counts == {"caption": 8, "conversation": 8, "interleaved": 8, "video": 8, "text": 8}


def test_tokenizer_matches_tiny_model(synth_dir):
    tok = load_tokenizer(synth_dir / "tokenizer")
    model = tiny()
    assert tok.added_tokens == [] and tok.vocab_size == model.language.vocab_size == 512
    assert (tok.ids.image_pad, tok.ids.video_pad) == (model.image_token_id, model.video_token_id)
    assert (tok.ids.vision_start, tok.ids.vision_end) == (
        model.vision_start_token_id,
        model.vision_end_token_id,
    )
    assert tok.ids.endoftext == model.pad_token_id


def test_every_kind_encodes(synth_dir):
    cfg = load_manifest(synth_dir)
    tok = load_tokenizer(cfg.tokenizer)
    enc = SampleEncoder(
        tok, image_cfg=ImageConfig(max_tokens=256), video_cfg=VideoConfig(video_max_tokens=2048)
    )
    counter = SkipCounter(max_skip_rate=0.0, min_samples=1)
    fast = slow = 0
    for source in cfg.sources:
        samples = list(iter_source_samples(source, encoder=enc, counter=counter))
        assert len(samples) == 8 and counter.skipped[source.name] == 0
        for s in samples:
            assert s.position_ids.shape == (3, s.num_tokens) and (s.labels != -100).any()
            pads = torch.isin(s.input_ids, torch.tensor(tok.ids.visual_pad_ids)).sum()
            assert pads == int((s.grid_thw[:, 1] * s.grid_thw[:, 2]).sum()) // 4
            assert s.pixel_values.shape[0] == int((s.grid_thw[:, 1] * s.grid_thw[:, 2]).sum())
            assert (s.grid_thw.shape[0] == 0) == (source.kind == "text")
            fast += int((s.input_ids == tok.ids.fast_start).sum())
            slow += int((s.input_ids == tok.ids.frame).sum()) - int((s.input_ids == tok.ids.fast_start).sum())
    assert fast > 0 and slow > 0  # scene cuts and still stretches give both kinds of frames


def _pixel(img_bytes, xy):
    return Image.open(io.BytesIO(img_bytes)).convert("RGB").getpixel(xy)


def test_grounding_labels_are_true(synth_dir):
    cfg = load_manifest(synth_dir)
    conv = next(s for s in cfg.sources if s.kind == "conversation")
    checked = 0
    for raw in iter_raw(conv):
        doc = json.loads(raw["json"])
        parts = doc["messages"][1]["content"]
        media = {k: v for k, v in raw.items() if k.startswith("img")}
        img_bytes = media[next(k for k in media if k.startswith("img0"))]
        for part in parts:
            if part["type"] == "point":  # a shape's centre lies inside the shape
                ref = next(p["text"] for p in parts if p["type"] == "ref")
                got = _pixel(img_bytes, tuple(part["point"]))
                want = COLORS[ref.split()[0]]
                assert max(abs(a - b) for a, b in zip(got, want)) < 60, (ref, got)
                checked += 1
            if part["type"] == "ocr":
                x1, y1, x2, y2 = next(p["box"] for p in parts if p["type"] == "box")
                crop = Image.open(io.BytesIO(img_bytes)).convert("L").crop((x1, y1, x2 + 1, y2 + 1))
                lo, hi = crop.getextrema()
                assert hi - lo > 80  # rendered glyphs contrast with the background inside the box
                checked += 1
    assert checked >= 2


def test_records_fields(synth_dir):
    cfg = load_manifest(synth_dir)
    errors = []
    for source in cfg.sources:
        rec = next(iter_records(source, on_error=lambda k, r: errors.append((k, r))))
        assert rec.kind == source.kind
        if source.kind == "caption":
            assert rec.text and rec.media[0][1] == "image"
        if source.kind == "interleaved":
            assert rec.content and all(t == "image" for _, t, _ in rec.media)
        if source.kind == "video":
            assert rec.media[0][1] == "video"
    assert errors == []


def test_manifest_errors_name_the_key(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"sources\[0\]\.kind"):
        parse_manifest({"sources": [{"shards": "a.tar", "weight": 1}]}, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"sources\[0\].*kind='audio'"):
        parse_manifest({"sources": [{"kind": "audio", "shards": "a.tar", "weight": 1}]}, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"sources\[0\]\.shards.*matched no file"):
        parse_manifest(
            {"sources": [{"kind": "text", "shards": "b-{0..3}.tar", "weight": 1}]}, base_dir=tmp_path
        )
    with pytest.raises(ValueError, match="exactly one of weight"):
        SourceConfig(name="x", kind="text", shards=["a"], weight=1.0, token_share=0.5)
    with pytest.raises(ValueError, match="mix weight and token_share"):
        parse_manifest(
            {
                "sources": [
                    {"kind": "text", "shards": "a.tar", "weight": 1},
                    {"kind": "text", "shards": "a.tar", "token_share": 1},
                ]
            },
            base_dir=tmp_path,
        )
    cfg = parse_manifest(
        {"sources": [{"kind": "text", "shards": ["pipe:cat {a,b}.tar", "*.tar"], "weight": 2}]},
        base_dir=tmp_path,
    )
    assert cfg.sources[0].shards == ["pipe:cat a.tar", "pipe:cat b.tar", str(tmp_path / "a.tar")]
