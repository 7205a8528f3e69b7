"""Hundreds of corrupted samples: each is skipped and counted per source, none crashes; the ceiling trips."""

import io
import json
import random
import struct
import zlib

import av
import pytest
import webdataset as wds
from PIL import Image

from keye_train.data.loader.encode import SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig
from keye_train.data.shards.manifest import SourceConfig
from keye_train.data.synth.media import encode_image, synth_video
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text.tokenizer import load_tokenizer


def png(w, h, color=(200, 10, 10)):
    return encode_image(Image.new("RGB", (w, h), color), fmt="PNG")


def jpeg(w, h):
    img = Image.effect_noise((w, h), 40).convert("RGB")  # noise: JPEG data spread over the whole file
    return encode_image(img, fmt="JPEG")


def zero_width_png():
    data = bytearray(png(4, 4))
    # IHDR chunk: 8-byte signature, length, type, then width; rewrite width to 0 and fix the CRC
    data[16:20] = struct.pack(">I", 0)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def empty_mp4():
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    return buf.getvalue()


def msg(*user_parts, answer="ok"):
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": list(user_parts)},
                {"role": "assistant", "content": answer},
            ]
        }
    ).encode()


IMG = {"type": "image", "image": "img0.png"}
VID = {"type": "video", "video": "mp4"}


def cases(rng):
    """(kind, members, is_bad) triples; the bad ones cover every failure class several times."""
    good_jpg, good_png = jpeg(96, 64), png(64, 48)
    mp4 = synth_video(random.Random(0), size=(64, 48), fps=8, seconds=2).data
    out = []
    for cut in rng.sample(range(100, int(len(good_jpg) * 0.9)), 40):
        out.append(("caption", {"jpg": good_jpg[:cut], "txt": b"a cap"}, True))
    for cut in rng.sample(range(40, int(len(good_png) * 0.9)), 20):
        out.append(("caption", {"png": good_png[:cut], "txt": b"a cap"}, True))
    for n in rng.sample(range(0, 2000), 30):
        out.append(("caption", {"jpg": rng.randbytes(n), "txt": b"noise"}, True))
    for w, h in [(1, 300), (300, 1), (2, 450), (600, 2), (1, 1000)] * 4:
        out.append(("caption", {"png": png(w, h), "txt": b"thin"}, True))
    out += [("caption", {"png": zero_width_png(), "txt": b"zero"}, True)] * 5
    out += [("caption", {"txt": b"no image"}, True)] * 5
    out += [("caption", {"jpg": good_jpg}, True)] * 5  # no caption
    out += [("caption", {"jpg": good_jpg, "txt": b"\xff\xfe\xfa"}, True)] * 5
    out += [("caption", {"jpg": good_jpg, "txt": b"  "}, True)] * 5
    out += [("caption", {"jpg": good_jpg, "txt": b"ok", "json": b"{not json"}, True)] * 5
    for cut in rng.sample(range(100, int(len(mp4) * 0.9)), 30):
        out.append(("video", {"mp4": mp4[:cut], "txt": b"a clip"}, True))
    for n in rng.sample(range(0, 3000), 15):
        out.append(("video", {"mp4": rng.randbytes(n), "txt": b"noise"}, True))
    out += [("video", {"mp4": empty_mp4(), "txt": b"no frames"}, True)] * 5
    out += [("video", {"json": msg(VID, "When?")}, True)] * 5  # references a missing video
    bad_json = [b"{", b"[]", b"null", b'{"messages": []}', b'{"messages": [1]}', b"\xff\xfe"]
    for doc in bad_json * 4:
        out.append(("conversation", {"json": doc, "img0.png": good_png}, True))
    out += [("conversation", {"json": msg(IMG, "hi")}, True)] * 5  # missing member
    out += [
        ("conversation", {"json": msg({"type": "image", "image": "img0.png"}), "img0.png": b""}, True)
    ] * 3
    out += [("conversation", {"json": msg({"type": "sound"}), "img0.png": good_png}, True)] * 3
    out += [
        (
            "conversation",
            {"json": msg(IMG, answer=[{"type": "box", "box": [1, 2, 3]}]), "img0.png": good_png},
            True,
        )
    ] * 3
    out += [("conversation", {"json": msg(IMG), "img0.png": good_jpg[: len(good_jpg) // 2]}, True)] * 5
    out += [
        (
            "conversation",
            {"json": json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode()},
            True,
        )
    ] * 3
    out += [("interleaved", {"json": b'{"content": "not a list"}'}, True)] * 4
    out += [
        (
            "interleaved",
            {"json": json.dumps({"content": [IMG, {"type": "text", "text": "x"}]}).encode()},
            True,
        )
    ] * 4
    # wrong types where the schema wants text, numbers or objects: skips, never str()-ed into training
    wrong_types = [
        msg({"type": "text", "text": 5}, IMG),
        msg(IMG, answer=[{"type": "text", "text": ["a"]}]),
        msg(IMG, answer=7),
        msg(IMG, answer=[{"type": "box", "box": ["1", 2, 3, 4]}]),
        msg(IMG, answer=[{"type": "point", "point": [1, 2], "image_index": "0"}]),
        msg(IMG, answer=[{"type": "ref", "text": None}]),
        json.dumps(
            {"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "a"}]}
        ).encode(),
        msg({"type": "image", "image": 3}),
    ]
    for doc in wrong_types:
        out.append(("conversation", {"json": doc, "img0.png": good_png}, True))
    for meta in ({"question": 1, "answer": "a"}, {"question": "q"}, ["not", "an", "object"]):
        out.append(("caption", {"jpg": good_jpg, "txt": b"ok", "json": json.dumps(meta).encode()}, True))
    out += [("interleaved", {"json": json.dumps({"content": ["Doc ", 42]}).encode()}, True)] * 2
    out += [("video", {"mp4": mp4, "json": msg(VID, {"type": "clip_time", "clip_time": "0-1"})}, True)]
    out += [("text", {"txt": b"\x80\x81"}, True), ("text", {"txt": b""}, True), ("text", {"md5": b"x"}, True)]
    # good samples, interleaved with the bad ones: none of these may be skipped
    out += [("caption", {"jpg": good_jpg, "txt": b"fine"}, False)] * 5
    out += [("conversation", {"json": msg(IMG, "what?"), "img0.png": good_png}, False)] * 5
    out += [("video", {"mp4": mp4, "txt": b"fine clip"}, False)] * 3
    out += [
        (
            "interleaved",
            {"json": json.dumps({"content": ["Doc ", IMG]}).encode(), "img0.png": good_png},
            False,
        )
    ]
    out += [("text", {"txt": b"fine text"}, False)] * 3
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(1234)
    all_cases = cases(rng)
    sources = []
    for kind in ("caption", "conversation", "interleaved", "video", "text"):
        path = tmp / f"{kind}.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for i, (k, members, _) in enumerate(all_cases):
                if k == kind:
                    writer.write({"__key__": f"{kind}{i:05d}", **members})
        sources.append(SourceConfig(name=f"fuzz_{kind}", kind=kind, shards=[str(path)], weight=1.0))
    build_tokenizer(["a small corpus of words " * 20], vocab_size=512, out_dir=tmp / "tok")
    encoder = SampleEncoder(
        load_tokenizer(tmp / "tok"),
        image_cfg=ImageConfig(max_tokens=64),
        video_cfg=VideoConfig(video_max_tokens=512),
    )
    return all_cases, sources, encoder


def test_every_bad_sample_skipped_and_counted(fuzz):
    all_cases, sources, encoder = fuzz
    assert sum(bad for *_, bad in all_cases) >= 250
    counter = SkipCounter(max_skip_rate=1.0, min_samples=1)
    for source in sources:
        kind = source.kind
        good = list(iter_source_samples(source, encoder=encoder, counter=counter))
        n_bad = sum(bad for k, _, bad in all_cases if k == kind)
        n_good = sum(not bad for k, _, bad in all_cases if k == kind)
        assert len(good) == n_good, (kind, counter.summary()[source.name])
        assert counter.skipped[source.name] == n_bad, (kind, counter.summary()[source.name])
        assert counter.seen[source.name] == n_bad + n_good
        assert all(s.num_tokens > 0 for s in good)


def test_skip_ceiling_stops_the_run(fuzz):
    _, sources, encoder = fuzz
    counter = SkipCounter(max_skip_rate=0.1, min_samples=20)
    with pytest.raises(RuntimeError, match=r"source 'fuzz_caption'.*max_skip_rate"):
        list(iter_source_samples(sources[0], encoder=encoder, counter=counter))
    assert counter.seen["fuzz_caption"] == 20  # stopped as soon as the ceiling was checkable


def test_planned_loader_trains_on_the_good_samples_and_counts_every_bad_one(fuzz, tmp_path):
    """The same corrupted shards through the planned loader (index, plan, decode, pack): set-up does not
    raise, every good sample reaches a packed row, and no bad one does."""
    from keye_train.data.loader.planned import TopologyAwareLoader
    from keye_train.data.shards.manifest import DataConfig
    from keye_train.data.shards.prepare import ensure_indexes
    from keye_train.distributed.parallel_dims import ParallelDims

    all_cases, sources, encoder = fuzz
    good = {f"{k}{i:05d}" for i, (k, _, bad) in enumerate(all_cases) if not bad}
    bad = {f"{k}{i:05d}" for i, (k, _, is_bad) in enumerate(all_cases) if is_bad}
    data_cfg = DataConfig(sources=sources, seed=0, max_skip_rate=1.0)
    ensure_indexes([data_cfg], tokenizer=encoder.tok, builds=True, progress=False)
    loader = TopologyAwareLoader(
        data_cfg,
        dims=ParallelDims(world_size=1),
        tokenizer=encoder.tok,
        max_seq_len=2048,
        microbatches=2,
        prefetch=0,
        image_cfg=encoder.image_cfg,
        video_cfg=encoder.video_cfg,
    )
    trained: set[str] = set()
    try:
        for _ in range(200):
            step = loader.next_step()
            trained.update(key for row in step.microbatches for key in row.sample_keys)
            if good <= trained:
                break
    finally:
        loader.close()
    assert trained == good
    assert not trained & bad
    assert sum(loader.counter.skipped.values()) >= len(bad)  # every bad sample counted (at least once)
