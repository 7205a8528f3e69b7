"""`keye-data convert` round trips: each format's records, written with their media, come back from the
shards with the same text, the same media bytes and the layout the source implies."""

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from keye_train.data import batch as L
from keye_train.data.batch import FrameSpec
from keye_train.data.loader.encode import SampleEncoder
from keye_train.data.shards.convert.writer import ConvertConfig, convert
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.sources import iter_records
from keye_train.data.synth.media import synth_video
from keye_train.data.text import chat

SYSTEM = f"{L.IM_START}system\n{chat.DEFAULT_SYSTEM_PROMPT}{L.IM_END}\n"
IMAGE = L.VISION_START + L.IMAGE_PAD + L.VISION_END  # a 2x2 patch grid: one merged token
FRAME = FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(2, 2))
VIDEO = f"{L.VISION_START}{L.FRAME}0.0{L.VIDEO_PAD}{L.VISION_END}"


def write_image(path, seed, fmt="JPEG", size=None):
    rng = random.Random(seed)
    size = size or (rng.randint(20, 48), rng.randint(20, 48))
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def run(tmp_path, fmt, inputs, **kw):
    summary = convert(
        ConvertConfig(format=fmt, inputs=inputs, out=tmp_path / "out", samples_per_shard=3, **kw),
        progress=False,
    )
    source = load_manifest(tmp_path / "out" / "manifest.yaml").sources[0]
    errors = []
    records = list(iter_records(source, on_error=lambda k, r: errors.append((k, r))))
    assert errors == []
    where = {}
    for report in sorted((tmp_path / "out").glob("*.report.json")):
        r = json.loads(report.read_text())
        where |= dict(zip(r["keys"], r["sources"]))
    return summary, source, [(where[rec.key], rec) for rec in records]


def rendered(rec):
    images = [chat.ImageInfo(grid_hw=(2, 2), size=_size(d)) for _, t, d in rec.media if t == "image"]
    videos = [chat.VideoInfo(frames=(FRAME,)) for _, t, _ in rec.media if t == "video"]
    return chat.segments_to_text(SampleEncoder(None).render(rec, images, videos))


def _size(data):
    return Image.open(io.BytesIO(data)).size


def chatml(turns, visual):
    roles = {"human": "user", "gpt": "assistant"}
    text = "" if turns[0]["from"] == "system" else SYSTEM
    for t in turns:
        role = roles.get(t["from"], t["from"])
        text += f"{L.IM_START}{role}\n{t['value'].replace(visual[0], visual[1])}{L.IM_END}\n"
    return text


def test_llava(tmp_path):
    media = tmp_path / "media"
    records = []
    for i in range(7):
        names = [f"coco/{i}_{j}.{'jpg' if j % 2 == 0 else 'png'}" for j in range(i % 3)]
        for j, n in enumerate(names):
            write_image(media / n, i * 10 + j, "JPEG" if n.endswith("jpg") else "PNG")
        prompt = "".join("<image>\n" for _ in names) + f"Question {i}?"
        conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": f"Answer {i}."}]
        if i == 3:
            conv = [{"from": "system", "value": "Be brief."}, *conv]
        record = {"id": f"r{i}", "conversations": conv}
        if names:
            record["image"] = names if len(names) > 1 else names[0]
        records.append(record)
    (tmp_path / "a.json").write_text(json.dumps(records[:4]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[4:]))
    summary, source, out = run(
        tmp_path, "llava", [tmp_path / "a.json", tmp_path / "b.jsonl"], media_root=media
    )
    assert source.kind == "conversation" and summary["samples"] == 7 and len(out) == 7
    wheres = [f"a.json[{i}]" for i in range(4)] + [f"b.jsonl:{i}" for i in range(1, 4)]
    assert [w for w, _ in out] == wheres
    for (_, rec), src in zip(out, records):
        names = [src["image"]] if isinstance(src.get("image"), str) else src.get("image", [])
        assert [d for _, _, d in rec.media] == [(media / n).read_bytes() for n in names]
        assert rendered(rec) == chatml(src["conversations"], ("<image>", IMAGE))


def test_sharegpt_video(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    records = []
    for i in range(4):
        clip = synth_video(random.Random(i), size=(32, 32), fps=4, seconds=1).data
        (media / f"v{i}.mp4").write_bytes(clip)
        tag = "<video>" if i % 2 else "<image>"  # LLaVA-Video writes <image> for its video
        conv = [{"from": "human", "value": f"{tag}\nWhat happens {i}?"}, {"from": "gpt", "value": "Shapes."}]
        records.append({"id": i, "video": f"v{i}.mp4", "conversations": conv})
    (tmp_path / "v.json").write_text(json.dumps(records))
    summary, source, out = run(tmp_path, "sharegpt-video", [tmp_path / "v.json"], media_root=media)
    assert source.kind == "video" and len(out) == 4
    for (_, rec), src in zip(out, records):
        assert [(t, d) for _, t, d in rec.media] == [("video", (media / src["video"]).read_bytes())]
        tag = "<video>" if src["id"] % 2 else "<image>"
        assert rendered(rec) == chatml(src["conversations"], (tag, VIDEO))


def test_caption_tables_and_img2dataset(tmp_path):
    media = tmp_path / "media"
    rows = [{"image": f"c{i}.jpg", "caption": f"caption number {i}"} for i in range(8)]
    for i, row in enumerate(rows):
        write_image(media / row["image"], i)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (tmp_path / "c.tsv").write_text(
        "image\tcaption\n" + "".join(f"{r['image']}\t{r['caption']}\n" for r in rows[3:5])
    )
    pq.write_table(pa.Table.from_pylist(rows[5:]), tmp_path / "c.parquet")
    folder = tmp_path / "img2dataset" / "00000"
    for i in range(2):
        write_image(folder / f"00000000{i}.png", 100 + i, "PNG")
        (folder / f"00000000{i}.txt").write_text(f"web caption {i}")
        (folder / f"00000000{i}.json").write_text(json.dumps({"url": f"http://x/{i}", "key": str(i)}))
    inputs = [tmp_path / "c.jsonl", tmp_path / "c.tsv", tmp_path / "c.parquet", tmp_path / "img2dataset"]
    summary, source, out = run(tmp_path, "caption", inputs, media_root=media)
    assert source.kind == "caption" and len(out) == 10
    expected = [(media / r["image"], r["caption"], {}) for r in rows]
    expected += [
        (folder / f"00000000{i}.png", f"web caption {i}", {"url": f"http://x/{i}", "key": str(i)})
        for i in range(2)
    ]
    for (_, rec), (image, caption, meta) in zip(out, expected):
        assert [d for _, _, d in rec.media] == [image.read_bytes()]
        assert rec.text == caption and rec.meta == meta
        assert rendered(rec) == IMAGE + caption + L.ENDOFTEXT


def test_interleaved_parquet_and_jsonl(tmp_path):
    media = tmp_path / "media"
    docs = []
    for i in range(5):
        texts, images = [f"Doc {i} starts. "], [None]
        for j in range(i % 3):
            write_image(media / f"d{i}_{j}.png", i * 7 + j, "PNG")
            texts += [None, f"After image {j}. "]
            images += [f"d{i}_{j}.png", None]
        docs.append({"texts": texts, "images": images, "url": f"u{i}"})
    pq.write_table(pa.Table.from_pylist(docs[:3]), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[3:]))
    _, source, out = run(
        tmp_path, "interleaved", [tmp_path / "d.parquet", tmp_path / "d.jsonl"], media_root=media
    )
    assert source.kind == "interleaved" and len(out) == 5
    for (_, rec), doc in zip(out, docs):
        assert [d for _, _, d in rec.media] == [(media / p).read_bytes() for p in doc["images"] if p]
        want = "".join(t if t is not None else IMAGE for t, _ in zip(doc["texts"], doc["images"]))
        assert rendered(rec) == want + L.ENDOFTEXT


def test_text(tmp_path):
    lines = [{"text": f"Line {i} of plain text.", "meta": i} for i in range(5)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, source, out = run(tmp_path, "text", [tmp_path / "t.jsonl"])
    assert source.kind == "text"
    assert [rendered(rec) for _, rec in out] == [r["text"] + L.ENDOFTEXT for r in lines]


def test_grounding_boxes_in_table1_notation(tmp_path):
    media = tmp_path / "media"
    refs = [
        {"id": 1, "image": "g1.jpg", "bbox": [10, 20, 30, 40], "sentences": [{"sent": "the red cup"}]},
        {"id": 2, "image": "g2.jpg", "bbox": [0, 0, 100, 50], "sentences": ["left dog", "brown dog"]},
        {"id": 3, "image": "g1.jpg", "bbox": [50, 60, 150, 40], "expression": "a plate"},
    ]
    write_image(media / "g1.jpg", 1, size=(200, 100))
    write_image(media / "g2.jpg", 2, size=(100, 50))
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    _, source, out = run(tmp_path, "grounding", [tmp_path / "refs.jsonl"], media_root=media)
    # pixel boxes [x, y, w, h] -> [x1, y1, x2, y2] * 1000 / (width, height), rounded
    boxes = {1: [50, 200, 200, 600], 2: [0, 0, 1000, 1000], 3: [250, 600, 1000, 1000]}
    assert source.kind == "conversation" and len(out) == 3
    for (_, rec), ref in zip(out, refs):
        sentences = [s["sent"] if isinstance(s, dict) else s for s in ref.get("sentences", [])]
        sentences = sentences or [ref["expression"]]
        text = SYSTEM
        for n, s in enumerate(sentences):
            question = (IMAGE if n == 0 else "") + "Locate the object described in the image: " + s
            box = ", ".join(map(str, boxes[ref["id"]]))
            answer = f"<|object_ref_start|>{s}<|object_ref_end|><|box_start|>[[{box}]]<|box_end|>"
            text += f"{L.IM_START}user\n{question}{L.IM_END}\n{L.IM_START}assistant\n{answer}{L.IM_END}\n"
        assert rendered(rec) == text
        assert [d for _, _, d in rec.media] == [(media / ref["image"]).read_bytes()]


def test_bad_options_and_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "t.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="--format 'vqa' is not one of"):
        ConvertConfig(format="vqa", inputs=[tmp_path / "t.jsonl"], out=tmp_path / "o")
    with pytest.raises(ValueError, match="has no options \\['caption_field'\\]"):
        ConvertConfig(
            format="text", inputs=[tmp_path / "t.jsonl"], out=tmp_path / "o", options={"caption_field": "x"}
        )
    with pytest.raises(ValueError, match="inputs do not exist"):
        ConvertConfig(format="text", inputs=[tmp_path / "nope.jsonl"], out=tmp_path / "o")
