"""Sharded safetensors I/O, config.json mapping, kind detection, and Keye HF save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keye_train.checkpoint.hf import (
    detect_kind,
    keye_config_from_hf,
    keye_config_to_hf,
    language_config_from_qwen3,
    load_into_model,
    load_keye_state,
    save_keye_hf,
    text_tower_config_from_siglip,
    vision_config_from_siglip,
)
from keye_train.checkpoint.safetensors_io import (
    ShardedWriter,
    parse_dtype,
    parse_size,
    read_layout,
)
from keye_train.checkpoint.staging import atomic_output_dir
from keye_train.models.configs import keye_8b, tiny
from keye_train.models.keye import KeyeForConditionalGeneration, build_model


def _dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_parse_size_and_dtype():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("200KB") == 200_000
    assert parse_size("1MiB") == 1_048_576
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="5 parsecs"):
        parse_size("5 parsecs")
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="int8"):
        parse_dtype("int8")


def test_sharded_writer_layout_and_index(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(100, generator=gen) for i in range(5)}  # 400 bytes each in fp32
    writer = ShardedWriter(tmp_path / "ckpt", max_shard_bytes=1000)
    for key, value in tensors.items():
        writer.add(key, value)
    files = writer.close()
    # 1000 bytes hold two 400-byte tensors: shards of 2, 2, 1 tensors.
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert set(index["weight_map"]) == set(tensors)
    loaded = _dir_tensors(tmp_path / "ckpt")
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
        assert key in load_file(tmp_path / "ckpt" / index["weight_map"][key])
    assert not list((tmp_path / "ckpt").glob("*.partial"))


def test_sharded_writer_single_shard_and_tied_storage(tmp_path):
    weight = torch.randn(4, 3)
    writer = ShardedWriter(tmp_path, max_shard_bytes=10**6, dtype=torch.bfloat16)
    writer.add("a", weight)
    writer.add("b", weight)  # same storage, as tied weights are: must not trip safetensors
    writer.add("ids", torch.arange(3))
    assert [f.name for f in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["a"].dtype == torch.bfloat16 and torch.equal(loaded["a"], weight.to(torch.bfloat16))
    assert torch.equal(loaded["b"], loaded["a"])
    assert loaded["ids"].dtype == torch.int64  # only floating tensors are cast


def test_transformers_reads_our_shards(tmp_path):
    transformers = pytest.importorskip("transformers")
    qcfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    source = transformers.Qwen3ForCausalLM(qcfg)
    writer = ShardedWriter(tmp_path, max_shard_bytes=5000)
    for key, value in source.state_dict().items():
        writer.add(key, value)
    assert len(writer.close()) > 1
    qcfg.save_pretrained(tmp_path)
    loaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(target) as temp:
        (temp / "x").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(target) as temp:
        (temp / "x").write_text("done")
    assert (target / "x").read_text() == "done"
    with pytest.raises(FileExistsError, match=str(target)), atomic_output_dir(target):
        pass


def test_config_8b_to_hf_fields():
    config = keye_config_to_hf(keye_8b())
    expected_top = {
        "architectures": ["KeyeVL1_5ForConditionalGeneration"], "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    }  # fmt: skip
    for key, value in expected_top.items():
        assert config[key] == value, key
    assert config["rope_scaling"]["mrope_section"] == [16, 24, 24]
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"]) == (1152, 27)
    assert vision["num_attention_heads"] == 16
    assert (vision["intermediate_size"], vision["patch_size"], vision["image_size"]) == (4304, 14, 384)
    json.dumps(config)  # must be plain JSON


@pytest.mark.parametrize("make", [keye_8b, tiny])
def test_config_round_trip(make):
    cfg = make()
    back = keye_config_from_hf(keye_config_to_hf(cfg, dtype="fp32"))
    assert (back.vision, back.projector, back.language) == (cfg.vision, cfg.projector, cfg.language)
    assert (back.image_token_id, back.video_token_id, back.pad_token_id) == (
        cfg.image_token_id, cfg.video_token_id, cfg.pad_token_id,
    )  # fmt: skip


def test_reads_transformers_configs():
    transformers = pytest.importorskip("transformers")
    # google's published SigLIP config lists only non-default fields; transformers fills the rest.
    published = {
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                        "num_hidden_layers": 27, "model_type": "siglip_text_model"},
        "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
                          "model_type": "siglip_vision_model"},
    }  # fmt: skip
    reference = transformers.SiglipConfig(**published)
    vision, text = vision_config_from_siglip(published), text_tower_config_from_siglip(published)
    rv, rt = reference.vision_config, reference.text_config
    assert (vision.hidden_size, vision.num_layers, vision.num_heads, vision.intermediate_size) == (
        rv.hidden_size, rv.num_hidden_layers, rv.num_attention_heads, rv.intermediate_size,
    )  # fmt: skip
    assert (vision.patch_size, vision.image_size, vision.layer_norm_eps) == (
        rv.patch_size, rv.image_size, rv.layer_norm_eps,
    )  # fmt: skip
    assert (text.vocab_size, text.max_positions, text.hidden_size, text.layer_norm_eps) == (
        rt.vocab_size, rt.max_position_embeddings, rt.hidden_size, rt.layer_norm_eps,
    )  # fmt: skip
    qwen = transformers.Qwen3Config(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, rope_theta=123456.0,
    )  # fmt: skip
    language = language_config_from_qwen3(qwen.to_dict())
    assert (language.vocab_size, language.hidden_size, language.num_layers) == (1000, 256, 3)
    assert (language.num_heads, language.num_kv_heads, language.head_dim) == (4, 2, 64)
    assert language.rope_theta == 123456.0
    assert language.mrope_section == (8, 12, 12)  # Keye's 16/24/24 split scaled to 32 frequencies


def test_detect_kind():
    keye = {
        "visual.vision_model.post_layernorm.weight": (1152,),
        "mlp_AR.pre_norm.weight": (4608,),
        "model.embed_tokens.weight": (10, 4),
    }
    assert detect_kind(keye) == "keye-1.5"
    assert detect_kind({**keye, "mlp_AR.pre_norm.weight": (1152,)}) == "keye-preview"
    preview_config = {"architectures": ["KeyeForConditionalGeneration"]}
    assert detect_kind({"visual.x": (1,)}, preview_config) == "keye-preview"
    qwen3 = {"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_norm.weight": (2,)}
    assert detect_kind(qwen3) == "qwen3"
    assert detect_kind({"model.embed_tokens.weight": (10, 4)}) == "unknown"  # Qwen2/Llama: no q_norm
    assert detect_kind({"vision_model.post_layernorm.weight": (4,), "text_model.x": (1,)}) == "siglip"


@pytest.fixture(scope="module")
def tiny_keye_dir(tmp_path_factory):
    cfg = tiny()
    model = build_model(cfg, seed=3)
    out = tmp_path_factory.mktemp("keye") / "tiny"
    save_keye_hf(model.state_dict(), cfg=cfg, out_dir=out, dtype="fp32", max_shard_bytes=200_000)
    return cfg, model.state_dict(), out


def test_save_then_load_into_meta_and_real_model(tiny_keye_dir):
    cfg, state, out = tiny_keye_dir
    assert len(list(out.glob("model-*.safetensors"))) > 1
    loaded_cfg, items = load_keye_state(out)
    assert (loaded_cfg.vision, loaded_cfg.language) == (cfg.vision, cfg.language)
    assert {k: v for k, v in items}.keys() == state.keys()
    with torch.device("meta"):
        meta_model = KeyeForConditionalGeneration(loaded_cfg)
    assert load_into_model(meta_model, out) == ([], [])
    real_model = build_model(loaded_cfg, seed=99)
    load_into_model(real_model, out)
    for key, value in state.items():
        assert torch.equal(meta_model.state_dict()[key], value), key
        assert torch.equal(real_model.state_dict()[key], value), key


def test_load_into_model_errors_name_file_and_key(tiny_keye_dir, tmp_path):
    cfg, state, out = tiny_keye_dir
    small = tiny(vocab_size=256)  # lm_head / embed_tokens shapes differ
    with torch.device("meta"):
        model = KeyeForConditionalGeneration(small)
    with pytest.raises(ValueError, match=r"model-0000\d-of-0000\d\.safetensors: lm_head\.weight has shape"):
        load_into_model(model, out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_keye_state(tmp_path)
    partial = {k: v for k, v in state.items() if not k.startswith("lm_head")}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = KeyeForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="missing key: lm_head.weight"):
        load_into_model(model, tmp_path)
    missing, unexpected = load_into_model(model, tmp_path, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])


def test_save_keye_hf_rejects_bad_state_and_leaves_nothing(tmp_path):
    cfg = tiny()
    state = dict(build_model(cfg, seed=0).state_dict())
    bad_shape = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\[3\]"):
        save_keye_hf(bad_shape, cfg=cfg, out_dir=tmp_path / "a", dtype="fp32", max_shard_bytes=10**6)
    with pytest.raises(ValueError, match="stray"):
        stray = {**state, "stray": torch.ones(1)}
        save_keye_hf(stray, cfg=cfg, out_dir=tmp_path / "b", max_shard_bytes=10**6)
    state.pop("model.norm.weight")
    with pytest.raises(ValueError, match="model.norm.weight"):
        save_keye_hf(state.items(), cfg=cfg, out_dir=tmp_path / "c", max_shard_bytes=10**6)
    assert list(tmp_path.iterdir()) == []


def test_read_layout_reports_shapes_without_loading(tiny_keye_dir):
    cfg, state, out = tiny_keye_dir
    layout = read_layout(out)
    assert {k: v.shape for k, v in layout.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert {v.dtype for v in layout.values()} == {"float32"}
