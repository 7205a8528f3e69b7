"""DCP -> HF export, HF -> DCP import, and weighted merging, checked against the source models' tensors."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import keye_train.checkpoint.export as export_module
from keye_train.checkpoint.export import export_to_hf, import_from_hf
from keye_train.checkpoint.hf import load_into_model, save_keye_hf
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.checkpoint.merge import merge_checkpoints, normalise_weights
from keye_train.checkpoint.model_weights import load_model_weights
from keye_train.checkpoint.safetensors_io import iter_checkpoint
from keye_train.cli.merge import main as merge_main
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch

CFG = tiny()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    batch = toy_packed_batch(CFG, seed=0)
    return model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )


def _save_dcp(model, directory, keye_cfg=None) -> None:
    state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()), keye_cfg=keye_cfg)
    CheckpointManager(CheckpointConfig(dir=str(directory))).save(1, state)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two different tiny models: A as a DCP stage dir, B as an fp32 HF dir."""
    root = tmp_path_factory.mktemp("sources")
    model_a, model_b = build_model(CFG, seed=0), build_model(CFG, seed=1)
    _save_dcp(model_a, root / "stage_a")
    save_keye_hf(model_b.state_dict(), cfg=CFG, out_dir=root / "hf_b", dtype="fp32")
    return {"root": root, "a": model_a, "b": model_b}


def test_export_gives_the_checkpoints_logits(sources, tmp_path):
    out = export_to_hf(sources["root"] / "stage_a", tmp_path / "hf", dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == CFG.language.rope_theta and config["vocab_size"] == CFG.language.vocab_size
    loaded = build_model(CFG, seed=7)
    load_into_model(loaded, out)
    assert torch.equal(_logits(loaded), _logits(sources["a"]))


def test_export_bf16_with_tokenizer(sources, tmp_path):
    tokenizer = tmp_path / "tok"
    build_tokenizer(["a few words of text", "for the tokenizer"] * 5, vocab_size=512, out_dir=tokenizer)
    out = export_to_hf(sources["root"] / "stage_a" / "step-1", tmp_path / "hf", tokenizer_dir=tokenizer)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab() == (
        Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab()
    )
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    # The checkpoint records no bos/eos (tiny() has none): the tokenizer's <|endoftext|> / <|im_end|>.
    ids = load_tokenizer(tokenizer).ids
    assert (config["bos_token_id"], config["eos_token_id"]) == (ids.endoftext, ids.im_end)
    loaded = build_model(CFG, seed=7)
    load_into_model(loaded, out)
    for (name, original), exported in zip(sources["a"].state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(exported, original.to(torch.bfloat16).float()), name


def test_export_refuses_a_tokenizer_with_other_ids(sources, tmp_path):
    tokenizer = tmp_path / "tok"
    build_tokenizer(["some text"] * 5, vocab_size=400, out_dir=tokenizer)  # pads at 398/399, model: 510/511
    with pytest.raises(ValueError, match=r"<\|image_pad\|> id 398 but the model has image_token_id=510"):
        export_to_hf(sources["root"] / "stage_a", tmp_path / "hf", tokenizer_dir=tokenizer)
    assert not (tmp_path / "hf").exists()


def test_failed_export_leaves_no_directory(sources, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="tokenizer dir"):
        export_to_hf(sources["root"] / "stage_a", tmp_path / "hf", tokenizer_dir=tmp_path / "missing")

    def broken(*args, **kwargs):
        yield "visual.vision_model.post_layernorm.weight", torch.ones(CFG.vision.hidden_size)
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "iter_model_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export_to_hf(sources["root"] / "stage_a", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging dir


def test_import_then_export_is_bit_identical_in_fp32(sources, tmp_path):
    imported = import_from_hf(sources["root"] / "hf_b", tmp_path / "dcp")
    target = build_model(CFG, seed=9)
    load_model_weights(target, imported)  # usable as init_from
    assert torch.equal(_logits(target), _logits(sources["b"]))
    out = export_to_hf(imported, tmp_path / "hf", dtype="fp32")
    original = dict(iter_checkpoint(sources["root"] / "hf_b"))
    exported = dict(iter_checkpoint(out))
    assert original.keys() == exported.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == torch.float32 and torch.equal(exported[key], tensor), key
    before = json.loads((sources["root"] / "hf_b" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == before


def test_merge_with_itself_is_identical(sources, tmp_path, capsys):
    stage = sources["root"] / "stage_a"
    out = merge_checkpoints([(stage, 1.0), (stage, 1.0)], tmp_path / "m", out_format="hf", dtype="fp32")
    assert "normalised to [0.5, 0.5]" in capsys.readouterr().out
    for key, tensor in sources["a"].state_dict().items():
        with safe_open(out / "model.safetensors", framework="pt") as handle:
            assert torch.equal(handle.get_tensor(key), tensor), key


def test_merge_of_dcp_and_hf_is_the_weighted_average(sources, tmp_path):
    out = merge_checkpoints(
        [(sources["root"] / "stage_a", 1.0), (sources["root"] / "hf_b", 3.0)],
        tmp_path / "m",
        out_format="dcp",
        dtype="fp32",
    )
    merged = build_model(CFG, seed=5)
    load_model_weights(merged, out)
    state_a, state_b = sources["a"].state_dict(), sources["b"].state_dict()
    for key, tensor in merged.state_dict().items():
        expected = 0.25 * state_a[key] + 0.75 * state_b[key]
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.equal(merged.lm_head.weight, state_a["lm_head.weight"])


def test_mismatched_architectures_are_clear_errors(sources, tmp_path):
    theta = tiny()
    theta.language.rope_theta = 8e6
    save_keye_hf(build_model(theta).state_dict(), cfg=theta, out_dir=tmp_path / "theta", dtype="fp32")
    with pytest.raises(ValueError, match=r"configs differ in language\.rope_theta: 1000000\.0 vs 8000000\.0"):
        merge_checkpoints([(sources["root"] / "stage_a", 1), (tmp_path / "theta", 1)], tmp_path / "m")
    wide = tiny(vocab_size=640)
    _save_dcp(build_model(wide), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"cannot merge .*stage_a.* with .*wide.*vocab_size"):
        merge_checkpoints([(sources["root"] / "stage_a", 1), (tmp_path / "wide", 1)], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bad_weights_are_clear_errors(capsys):
    with pytest.raises(ValueError, match="negative"):
        normalise_weights([1.0, -0.5])
    with pytest.raises(ValueError, match="not a finite number"):
        normalise_weights([1.0, math.nan])
    with pytest.raises(ValueError, match="sum to 0"):
        normalise_weights([0.0, 0.0])
    assert normalise_weights([0.3, 0.7]) == [0.3, 0.7]
    assert normalise_weights([2.0, 0.0]) == [1.0, 0.0]
    assert "weight 0" in capsys.readouterr().out


def test_keye_merge_cli_with_yaml_and_flags(sources, tmp_path, capsys):
    recipe = tmp_path / "merge.yaml"
    stage, hf = sources["root"] / "stage_a", sources["root"] / "hf_b"
    recipe.write_text(
        f"inputs:\n  - path: {stage}\n    weight: 1\n  - path: {hf}\n    weight: 1\n"
        f"out: {tmp_path / 'merged'}\nformat: hf\ndtype: bf16\n"
    )
    assert merge_main(["--config", str(recipe), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "merge: " in out and f"wrote {tmp_path / 'merged'}" in out
    merged = dict(iter_checkpoint(tmp_path / "merged"))
    torch.testing.assert_close(
        merged["lm_head.weight"], 0.5 * (sources["a"].lm_head.weight + sources["b"].lm_head.weight)
    )
    assert merge_main(["--input", f"{stage}:-1", "--out", str(tmp_path / "x")]) == 1
    assert "negative" in capsys.readouterr().err
    recipe.write_text("inputs: []\nout: y\nfromat: hf\n")
    assert merge_main(["--config", str(recipe)]) == 1
    assert "unknown keys ['fromat']" in capsys.readouterr().err


def test_keye_convert_export_and_import(sources, tmp_path, capsys):
    from keye_train.cli.convert import main as convert_main

    hf_out = tmp_path / "hf"
    assert convert_main(["export", "--ckpt", str(sources["root"] / "stage_a"), "--out", str(hf_out)]) == 0
    assert json.loads((hf_out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert convert_main(["import", "--hf", str(sources["root"] / "hf_b"), "--out", str(tmp_path / "d")]) == 0
    target = build_model(CFG, seed=4)
    load_model_weights(target, tmp_path / "d")
    assert torch.equal(target.lm_head.weight, sources["b"].lm_head.weight)
    capsys.readouterr()
    assert convert_main(["export", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err


def test_stage0_text_tower_is_exported_to_siglip_text(tmp_path):
    from keye_train.checkpoint.dcp import combine_modules
    from keye_train.checkpoint.hf import load_keye_config
    from keye_train.models.siglip_text import SiglipTextTower

    torch.manual_seed(0)
    model, tower = build_model(CFG, seed=0), SiglipTextTower(CFG.text_tower)
    _save_dcp(combine_modules(model, tower), tmp_path / "stage0", keye_cfg=CFG)
    out = export_to_hf(tmp_path / "stage0", tmp_path / "hf", dtype="fp32")
    assert load_keye_config(out).text_tower == CFG.text_tower
    loaded = SiglipTextTower(CFG.text_tower)
    load_into_model(loaded, out / "siglip_text")
    for (name, original), value in zip(tower.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(value, original), name
