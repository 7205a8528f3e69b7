"""`keye-data` subcommands: synth, inspect, inspect-video, --help, and user errors."""

import json

import pytest
import webdataset as wds

from keye_train.cli.data import main


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["synth", "--out", str(out), "--samples", "10", "--seed", "3"]) == 0
    return out


def test_synth_writes_shards_manifest_tokenizer(synth_out, capsys):
    names = sorted(p.name for p in synth_out.iterdir())
    assert names == [
        "caption-000000.tar",
        "conversation-000000.tar",
        "interleaved-000000.tar",
        "manifest.yaml",
        "text-000000.tar",
        "tokenizer",
        "video-000000.tar",
    ]
    assert (synth_out / "tokenizer" / "tokenizer.json").is_file()


def test_inspect_json(synth_out, capsys):
    assert (
        main(["inspect", str(synth_out), "--json", "--image-max-tokens", "256", "--video-max-tokens", "2048"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    kinds = report["kinds"]
    assert {k: v["samples"] for k, v in kinds.items()} == {
        "caption": 2,
        "conversation": 2,
        "interleaved": 2,
        "video": 2,
        "text": 2,
    }
    assert all(v["skipped"] == 0 for v in kinds.values())
    assert kinds["text"]["visual_items"] == 0 and kinds["caption"]["visual_items"] == 2
    assert kinds["video"]["visual_items"] >= 2 and kinds["video"]["distinct_grids"] >= 1
    assert kinds["caption"]["tokens"] > kinds["caption"]["target_tokens"] > 0


def test_inspect_text_output_and_single_shard(synth_out, capsys):
    assert (
        main(
            [
                "inspect",
                str(synth_out / "text-000000.tar"),
                "--kind",
                "text",
                "--tokenizer",
                str(synth_out / "tokenizer"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "text" in out and "samples=     2" in out


def test_inspect_video(synth_out, tmp_path, capsys):
    sample = next(
        iter(wds.WebDataset(str(synth_out / "video-000000.tar"), shardshuffle=False, empty_check=False))
    )
    path = tmp_path / "clip.mp4"
    path.write_bytes(sample["mp4"])
    assert main(["inspect-video", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # 3 s at 8 fps sampled at 2 fps: 6 frames, the first always slow
    assert info["num_frames"] == 6 and info["frame_types"][0] == "slow"
    assert info["num_slow"] + info["num_fast"] == 6


@pytest.mark.parametrize("cmd", [[], ["synth"], ["inspect"], ["inspect-video"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: keye-data" in capsys.readouterr().out


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect-video", str(tmp_path / "none.mp4")]) == 2
    assert main(["synth", "--out", str(tmp_path), "--samples", "0"]) == 2
    assert "samples=0" in capsys.readouterr().err
