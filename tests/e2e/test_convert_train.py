"""keye-train trains on what `keye-data convert` wrote (every converted kind) and on a Megatron indexed
dataset built with megatron-core's IndexedDatasetBuilder, all in one manifest, planned by the indexed
loader from the converter's indexes (one short run covers them all)."""

import json
import random

import numpy as np
import pytest
import torch
import yaml
from conftest import metrics, train
from PIL import Image

from keye_train.data.shards.convert.writer import ConvertConfig, convert
from keye_train.data.shards.index import build_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.media import synth_video
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text.tokenizer import load_tokenizer

IndexedDatasetBuilder = pytest.importorskip("megatron.core.datasets.indexed_dataset").IndexedDatasetBuilder

pytestmark = [pytest.mark.slow]
STEPS = 4


def _image(path, seed):
    rng = random.Random(seed)
    size = (rng.randint(28, 64), rng.randint(28, 64))
    Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(path)
    return path.name


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _inputs(root):
    media = root / "media"
    media.mkdir()
    imgs = [_image(media / f"i{i}.png", i) for i in range(6)]
    (media / "v0.mp4").write_bytes(synth_video(random.Random(0), size=(64, 48), fps=4, seconds=2).data)
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    return media, {
        "llava": [
            _jsonl(
                root / "llava.jsonl",
                [
                    {"id": i, "image": imgs[i], "conversations": conv("<image>\nWhat color?", f"Color {i}.")}
                    for i in range(6)
                ],
            )
        ],
        "sharegpt-video": [
            _jsonl(
                root / "video.jsonl",
                [
                    {"id": i, "video": "v0.mp4", "conversations": conv("<video>\nWhat moves?", "A shape.")}
                    for i in range(3)
                ],
            )
        ],
        "caption": [
            _jsonl(root / "cap.jsonl", [{"image": m, "caption": f"a plain picture {m}"} for m in imgs])
        ],
        "interleaved": [
            _jsonl(
                root / "doc.jsonl",
                [
                    {"texts": ["A page. ", None, "The end."], "images": [None, imgs[i], None]}
                    for i in range(4)
                ],
            )
        ],
        "text": [_jsonl(root / "text.jsonl", [{"text": f"Plain text number {i} " * 5} for i in range(8)])],
        "grounding": [
            _jsonl(
                root / "ref.jsonl",
                [
                    {"id": i, "image": imgs[i], "bbox": [2, 3, 10, 12], "sentences": ["the square"]}
                    for i in range(4)
                ],
            )
        ],
    }


def test_keye_train_on_every_converted_kind(tmp_path):
    media, inputs = _inputs(tmp_path)
    build_tokenizer(
        ["what color a plain picture page text square shape moves"] * 20,
        vocab_size=512,
        out_dir=tmp_path / "tok",
    )
    sources, total = [], 0
    for fmt, files in inputs.items():
        out = tmp_path / "conv" / fmt
        summary = convert(
            ConvertConfig(
                format=fmt,
                inputs=files,
                out=out,
                media_root=media,
                samples_per_shard=4,
                tokenizer=tmp_path / "tok",
            ),
            progress=False,
        )
        assert sum(summary["bad"].values()) == 0, summary
        total += summary["samples"]
        source = load_manifest(out / "manifest.yaml").sources[0]
        sources.append({"name": source.name, "kind": source.kind, "shards": source.shards, "weight": 1.0})
    tok = load_tokenizer(tmp_path / "tok")
    builder = IndexedDatasetBuilder(str(tmp_path / "mega.bin"), dtype=np.uint16)
    for i in range(6):
        ids = tok.encode(f"megatron document {i} " * (i + 2)) + [tok.ids.endoftext]
        builder.add_document(torch.tensor(ids), lengths=[len(ids)])
    builder.finalize(str(tmp_path / "mega.idx"))
    build_index(tmp_path / "mega.bin", tokenizer=tok)
    sources.append(
        {"name": "mega", "kind": "megatron", "shards": [str(tmp_path / "mega.bin")], "weight": 1.0}
    )
    total += 6
    manifest = tmp_path / "all.yaml"
    manifest.write_text(yaml.safe_dump({"tokenizer": str(tmp_path / "tok"), "sources": sources}))
    run_dir = tmp_path / "run"
    train(
        overrides=[
            "recipe=stage2_multitask",
            f"run_dir={run_dir}",
            f"steps={STEPS}",
            f"schedule.total_steps={STEPS}",
            f"data.manifest={manifest}",
            "parallel=single",
            "checkpoint.interval_steps=100",
            "data.loader=indexed",
            "data.microbatches=2",
        ]
    )
    records = metrics(run_dir)
    assert sorted(records) == list(range(STEPS))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records.values())
    # more samples than the sources hold were trained on, none skipped,
    # and the converter's indexes predicted the token counts exactly
    assert records[STEPS - 1]["samples_total"] > total
    assert all(r["skipped_samples"] == 0 for r in records.values())
    assert all(r["plan_predicted_tokens"] == r["plan_actual_tokens"] for r in records.values())
