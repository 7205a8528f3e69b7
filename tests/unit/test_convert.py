"""keye-convert init / inspect on tiny SigLIP + Qwen3 checkpoints written by transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keye_train.checkpoint.hf import load_into_model, load_keye_state, save_keye_hf
from keye_train.cli.convert import main
from keye_train.models.keye import KeyeForConditionalGeneration

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=112,
    patch_size=14,
)  # fmt: skip
TEXT = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=16, projection_size=32,
)  # fmt: skip
QWEN3 = dict(
    vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)  # fmt: skip
TOKEN_IDS = "image=158,video=159,vision_start=156,vision_end=157,pad=0"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny SigLIP, a one-file Qwen3, a two-shard Qwen3 and a tied-embedding Qwen3, by transformers."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    siglip = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION))
    siglip.save_pretrained(root / "siglip")
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3, tie_word_embeddings=False))
    qwen3.save_pretrained(root / "qwen3")
    # embed_tokens (40 KB) and lm_head (40 KB) cannot share a 60 KB shard: at least two shards.
    qwen3.save_pretrained(root / "qwen3_sharded", max_shard_size="60KB")
    tied = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3, tie_word_embeddings=True))
    tied.save_pretrained(root / "qwen3_tied")
    return root


def _init(sources: Path, out: Path, *extra: str, siglip: str = "siglip", qwen3: str = "qwen3_sharded") -> int:
    args = ["init", "--siglip", str(sources / siglip), "--qwen3", str(sources / qwen3), "--out", str(out)]
    return main([*args, "--token-ids", TOKEN_IDS, *extra])


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "keye"
    assert _init(sources, out, "--dtype", "fp32", "--max-shard-size", "300KB", "--seed", "7") == 0
    return out


def test_sources_are_sharded_as_intended(sources):
    assert len(list((sources / "qwen3_sharded").glob("model-*.safetensors"))) >= 2
    assert (sources / "qwen3_sharded" / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in _tensors(sources / "qwen3_tied")


def test_init_copies_every_source_tensor_bit_identical(sources, converted):
    out = _tensors(converted)
    siglip = _tensors(sources / "siglip")
    qwen3 = _tensors(sources / "qwen3_sharded")
    vision = {k: v for k, v in siglip.items() if k.startswith("vision_model.")}
    for key, value in vision.items():
        assert torch.equal(out["visual." + key], value), key
    for key, value in qwen3.items():
        assert torch.equal(out[key], value), key
    text = _tensors(converted / "siglip_text")
    assert set(text) == set(siglip) - set(vision)
    for key, value in text.items():
        assert torch.equal(value, siglip[key]), key
    packing = out["visual.vision_model.embeddings.packing_position_embedding.weight"]
    assert packing.shape == (32768, 32) and not packing.any()
    projector = {k: v for k, v in out.items() if k.startswith("mlp_AR.")}
    assert {k: tuple(v.shape) for k, v in projector.items()} == {
        "mlp_AR.pre_norm.weight": (128,), "mlp_AR.pre_norm.bias": (128,),
        "mlp_AR.linear_1.weight": (128, 128), "mlp_AR.linear_1.bias": (128,),
        "mlp_AR.linear_2.weight": (64, 128), "mlp_AR.linear_2.bias": (64,),
    }  # fmt: skip
    assert projector["mlp_AR.linear_1.weight"].std() > 0
    expected_keys = (
        {"visual." + k for k in vision}
        | set(qwen3)
        | set(projector)
        | {"visual.vision_model.embeddings.packing_position_embedding.weight"}
    )
    assert set(out) == expected_keys


def test_init_config_json(sources, converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is False
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):  # fmt: skip
        assert config[key] == QWEN3[key], key
    assert (config["image_token_id"], config["video_token_id"]) == (158, 159)
    assert config["rope_scaling"]["mrope_section"] == [2, 3, 3]
    for key, value in VISION.items():
        assert config["vision_config"][key] == value, key
    tower = json.loads((converted / "siglip_text" / "config.json").read_text())
    assert transformers.SiglipTextConfig(**tower).hidden_size == TEXT["hidden_size"]
    # The text tower dir loads into transformers' own SiglipTextModel (logit_* are extra there).
    text_model = transformers.SiglipTextModel.from_pretrained(converted / "siglip_text")
    reference = _tensors(sources / "siglip")
    for key, value in text_model.state_dict().items():
        if key in reference:
            assert torch.equal(value, reference[key]), key


def test_projector_is_seeded(sources, converted, tmp_path):
    assert _init(sources, tmp_path / "a", "--seed", "7", "--dtype", "fp32", qwen3="qwen3") == 0
    assert _init(sources, tmp_path / "b", "--seed", "8", "--dtype", "fp32", qwen3="qwen3") == 0
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert not torch.equal(a["mlp_AR.linear_1.weight"], b["mlp_AR.linear_1.weight"])
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    # `converted` used seed 7 too, with other source sharding and output shard size: same projector.
    for key in ("mlp_AR.linear_1.weight", "mlp_AR.linear_2.weight", "mlp_AR.linear_2.bias"):
        assert torch.equal(_tensors(converted)[key], a[key]), key


def test_tied_qwen3_gets_an_untied_lm_head(sources, tmp_path):
    assert _init(sources, tmp_path / "k", "--dtype", "fp32", qwen3="qwen3_tied") == 0
    out = _tensors(tmp_path / "k")
    embed = _tensors(sources / "qwen3_tied")["model.embed_tokens.weight"]
    assert torch.equal(out["lm_head.weight"], embed) and torch.equal(out["model.embed_tokens.weight"], embed)


def test_inspect_reports_kind_count_and_dtype(sources, converted, capsys):
    assert main(["inspect", str(converted)]) == 0
    text = capsys.readouterr().out
    siglip = _tensors(sources / "siglip")
    vision = sum(v.numel() for k, v in siglip.items() if k.startswith("vision_model."))
    projector = 128 * 2 + (128 * 128 + 128) + (64 * 128 + 64)
    total = vision + 32768 * 32 + projector + sum(v.numel() for v in _tensors(sources / "qwen3").values())
    assert "keye-1.5" in text and f"parameters: {total:,}" in text
    assert "float32" in text and "missing keys: 0" in text and "shape-mismatched keys: 0" in text


def test_round_trip_through_our_model_is_bit_identical(converted, tmp_path):
    cfg, _ = load_keye_state(converted)
    with torch.device("meta"):
        model = KeyeForConditionalGeneration(cfg)
    load_into_model(model, converted)
    save_keye_hf(model.state_dict(), cfg=cfg, out_dir=tmp_path / "again", dtype="fp32", max_shard_bytes=10**6)
    before, after = _tensors(converted), _tensors(tmp_path / "again")
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) and after[key].dtype == value.dtype, key


def test_cli_as_subprocess_bf16(sources, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "bf16"
    init = [sys.executable, "-m", "keye_train.cli.convert", "init", "--siglip", str(sources / "siglip"),
            "--qwen3", str(sources / "qwen3"), "--out", str(out), "--token-ids", TOKEN_IDS]  # fmt: skip
    done = subprocess.run(init, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "packing_position_embedding" in done.stdout and "zeros" in done.stdout
    inspect = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "inspect", str(out)]
    done = subprocess.run(inspect, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "keye-1.5" in done.stdout and "bfloat16" in done.stdout
    source = _tensors(sources / "qwen3")["model.norm.weight"]
    assert torch.equal(_tensors(out)["model.norm.weight"], source.to(torch.bfloat16))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _preview_dir(converted: Path, tmp_path: Path) -> Path:
    """A Keye dir whose projector pre_norm has the vision width, as the Preview model's has."""
    preview = _copy(converted, tmp_path / "preview")
    for file in preview.glob("model-*.safetensors"):
        tensors = load_file(file)
        if "mlp_AR.pre_norm.weight" in tensors:
            tensors["mlp_AR.pre_norm.weight"] = torch.ones(32)
            tensors["mlp_AR.pre_norm.bias"] = torch.zeros(32)
            save_file(tensors, str(file), metadata={"format": "pt"})
    return preview


def _bad_cases(sources: Path, converted: Path, tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    (tmp_path / "empty").mkdir()
    lying = _copy(sources / "siglip", tmp_path / "lying_siglip")
    config = json.loads((lying / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 48
    (lying / "config.json").write_text(json.dumps(config))
    lost_shard = _copy(sources / "qwen3_sharded", tmp_path / "lost_shard")
    sorted(lost_shard.glob("model-*.safetensors"))[-1].unlink()
    broken = _copy(sources / "qwen3_sharded", tmp_path / "broken_shard")
    last = sorted(broken.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:100])  # the header survives, the data does not
    qwen3 = sources / "qwen3_sharded"
    return {  # name: (siglip, qwen3, text the error must contain)
        "missing config": (tmp_path / "empty", qwen3, "config.json"),
        "qwen3 given as siglip": (qwen3, qwen3, "should hold a siglip checkpoint but holds a qwen3"),
        "siglip given as qwen3": (sources / "siglip", sources / "siglip", "should hold a qwen3 checkpoint"),
        "shape mismatch": (
            lying,
            qwen3,
            (
                "model.safetensors: visual.vision_model.encoder.layers.0.mlp.fc1.weight has shape [64, 32], "
                "expected [48, 32]"
            ),
        ),
        "lost shard": (sources / "siglip", lost_shard, "-of-0000"),
        "truncated shard": (sources / "siglip", broken, f"{last} is not a readable safetensors file"),
        "preview as siglip": (_preview_dir(converted, tmp_path), qwen3, "keye-preview"),
    }


def test_bad_inputs_fail_clearly_and_leave_no_output(sources, converted, tmp_path, capsys):
    for name, (siglip, qwen3, message) in _bad_cases(sources, converted, tmp_path).items():
        work = tmp_path / f"work_{name.replace(' ', '_')}"
        work.mkdir()
        args = ["init", "--siglip", str(siglip), "--qwen3", str(qwen3), "--out", str(work / "out")]
        assert main([*args, "--token-ids", TOKEN_IDS]) != 0, name
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (name, err)
        assert list(work.iterdir()) == [], name  # neither the output nor a temp dir beside it


def test_existing_output_is_refused_and_kept(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _init(sources, out) != 0
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_preview_checkpoint_is_named_as_such(converted, tmp_path, capsys):
    preview = _preview_dir(converted, tmp_path)
    with pytest.raises(ValueError, match=r"mlp_AR\.pre_norm\.weight has shape \[32\].*Keye-VL-Preview"):
        load_keye_state(preview)
    assert main(["inspect", str(preview)]) == 1
    text = capsys.readouterr().out
    assert "keye-preview" in text and "mlp_AR.pre_norm.weight has shape [32], expected [128]" in text


def test_sizes_must_agree_with_a_preset(sources, tmp_path, capsys):
    assert _init(sources, tmp_path / "out", "--preset", "keye_8b") != 0
    err = capsys.readouterr().err
    assert "vision hidden_size (projector input, merged 2x2) is 32 but the preset needs 1152" in err
    assert not (tmp_path / "out").exists()


def test_inspect_sources(sources, capsys):
    assert main(["inspect", str(sources / "siglip")]) == 0
    assert main(["inspect", str(sources / "qwen3_sharded")]) == 0
    assert main(["inspect", str(sources / "qwen3_tied")]) == 0  # lm_head legitimately absent
    text = capsys.readouterr().out
    assert "siglip" in text and "qwen3" in text and "missing keys: 1" not in text


def test_token_ids_from_tokenizer_config_or_a_clear_error(sources, tmp_path, capsys):
    qwen3 = _copy(sources / "qwen3", tmp_path / "qwen3")
    args = ["init", "--siglip", str(sources / "siglip"), "--qwen3", str(qwen3)]
    assert main([*args, "--out", str(tmp_path / "a")]) != 0
    assert "image_token_id=151655 is outside the vocabulary" in capsys.readouterr().err
    names = {150: "<|endoftext|>", 152: "<|vision_start|>", 153: "<|vision_end|>", 155: "<|image_pad|>"}
    names[156] = "<|video_pad|>"
    decoder = {str(i): {"content": name, "special": True} for i, name in names.items()}
    (qwen3 / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    got = [config[k] for k in ("pad_token_id", "vision_start_token_id", "vision_end_token_id")]
    assert got + [config["image_token_id"], config["video_token_id"]] == [150, 152, 153, 155, 156]
