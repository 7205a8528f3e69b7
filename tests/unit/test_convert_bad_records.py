"""A 1,000-record LLaVA conversion with 5% bad records of every kind: exactly those are reported, by
reason, and the other 950 are in the shards; an interrupted conversion resumes to the same bytes."""

import json
import os
import random
import subprocess
import sys

import pytest
from PIL import Image

from keye_train.data.shards.convert import writer
from keye_train.data.shards.convert.writer import ConvertConfig, convert
from keye_train.data.shards.index import load_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.sources import iter_raw

N = 1000
BAD = {"missing_media": 13, "undecodable": 13, "bad_json": 12, "placeholder_mismatch": 12}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava1k")
    media = root / "media"
    media.mkdir()
    for i in range(10):
        Image.new("RGB", (16, 12), (i * 20, 100, 200 - i * 10)).save(media / f"ok{i}.png")
    (media / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    rng = random.Random(0)
    kinds = [k for k, n in BAD.items() for _ in range(n)] + [None] * (N - sum(BAD.values()))
    rng.shuffle(kinds)
    lines, expected_bad, good_ids = [], {}, []
    for i, kind in enumerate(kinds):
        record = {
            "id": f"q{i}",
            "image": f"ok{i % 10}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown in picture {i}?"},
                {"from": "gpt", "value": f"Picture {i}."},
            ],
        }
        if kind == "missing_media":
            record["image"] = f"gone/{i}.png"
        elif kind == "undecodable":
            record["image"] = "broken.jpg"
        elif kind == "placeholder_mismatch":
            record["image"] = [f"ok{i % 10}.png", f"ok{(i + 1) % 10}.png"]
        line = json.dumps(record)
        if kind == "bad_json":
            line = line[: len(line) // 2]
        lines.append(line)
        if kind is None:
            good_ids.append(record["id"])
        else:
            expected_bad[f"train.jsonl:{i + 1}"] = kind
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, media, expected_bad, good_ids


def _cfg(dataset, out, **kw):
    root, media, *_ = dataset
    return ConvertConfig(
        format="llava", inputs=[root / "train.jsonl"], out=out, media_root=media, samples_per_shard=100, **kw
    )


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, convert(_cfg(dataset, out), progress=False)


def test_exactly_the_bad_records_are_reported_by_reason(dataset, uninterrupted):
    _, _, expected_bad, good_ids = dataset
    out, summary = uninterrupted
    assert summary["records"] == N and summary["samples"] == N - 50 == len(good_ids)
    assert summary["bad"] == {**BAD, "bad_record": 0}
    assert all(len(summary["examples"][k]) == 5 for k in BAD)
    reported = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    assert {b["where"]: b["reason"] for b in reported} == expected_bad
    assert len(reported) == 50
    source = load_manifest(out / "manifest.yaml").sources[0]
    assert len(source.shards) == 10
    ids = [json.loads(raw["json"])["id"] for raw in iter_raw(source, on_error=pytest.fail)]
    assert ids == good_ids
    # every shard has its index, which the indexed loader plans from
    assert sum(len(load_index(s, kind="conversation")) for s in source.shards) == N - 50


def test_interrupted_conversion_resumes_to_the_same_bytes(dataset, uninterrupted, tmp_path, monkeypatch):
    full, _ = uninterrupted
    out = tmp_path / "killed"
    real = writer._write_atomic
    written = []

    def dies_in_the_fourth_shard(path, data):
        if path.suffix == ".tar" and sum(p.suffix == ".tar" for p in written) == 3:
            path.with_name(f"{path.name}.tmp.999").write_bytes(data[: len(data) // 2])  # as a kill leaves it
            raise KeyboardInterrupt  # the process dies while writing shard 3
        written.append(path)
        real(path, data)

    monkeypatch.setattr(writer, "_write_atomic", dies_in_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        convert(_cfg(dataset, out), progress=False)
    monkeypatch.setattr(writer, "_write_atomic", real)
    assert len(list(out.glob("*.report.json"))) == 3 and list(out.glob("*.tmp.*"))
    summary = convert(_cfg(dataset, out), progress=False)
    assert summary["resumed_shards"] == 3 and not list(out.glob("*.tmp.*"))
    names = sorted(p.name for p in full.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name.endswith((".tar", ".report.json", "bad_records.jsonl", "manifest.yaml")):
            assert (out / name).read_bytes() == (full / name).read_bytes(), name


def test_cli_with_workers_writes_the_same_shards(dataset, uninterrupted, tmp_path):
    root, media, *_ = dataset
    full, _ = uninterrupted
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "keye_train.cli.data",
        "convert",
        "--format",
        "llava",
        str(root / "train.jsonl"),
    ]
    cmd += ["--media-root", str(media), "--out", str(out), "--workers", "2", "--samples-per-shard", "100"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["bad"] == {**BAD, "bad_record": 0}
    assert "950 of 1000 records converted into 10 shards" in result.stderr
    assert "missing_media: train.jsonl:" in result.stderr  # examples are printed
    for shard in sorted(full.glob("*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
