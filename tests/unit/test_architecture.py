"""The architecture comes from the checkpoint a run starts from (model.from_hf, stage.init_from), with its
RoPE base; a recipe that contradicts it fails naming both; pilot presets have the public shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from keye_train.checkpoint.hf import save_keye_hf
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.config.loader import compose_config
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.models.configs import keye_1b, keye_2b, tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.build import build_weights, keye_config
from keye_train.train.stages import apply_stage

OVERRIDES = ["run_dir=/tmp/unused", "data.manifest=/tmp/unused.yaml"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    build_tokenizer(["some words for a tokenizer"] * 10, vocab_size=512, out_dir=root)
    return load_tokenizer(root)


def _save_run(model, directory, cfg) -> None:
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), keye_cfg=cfg)
    CheckpointManager(CheckpointConfig(dir=str(directory / "checkpoints"))).save(3, state)


def _with(cfg, **language):
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, **language))


def test_stage3_from_a_run_at_another_base_fails_naming_both(tokenizer, tmp_path):
    cfg = _with(tiny(), rope_theta=2.5e6)
    _save_run(build_model(cfg, seed=0), tmp_path / "annealed", cfg)
    init = [f"stage.init_from={tmp_path / 'annealed'}"]
    _, train = compose_config("stage3_anneal_128k", OVERRIDES + init)
    with pytest.raises(ValueError, match=r"RoPE base 2\.5e\+06 but the recipe says model\.rope_theta=1e\+06"):
        keye_config(train, tokenizer)
    # Accepting the checkpoint's base explicitly: it carries forward, and the stage's own reset (an explicit
    # recipe value, stage.rope_theta) still decides the base the stage trains at.
    _, train = compose_config("stage3_anneal_128k", OVERRIDES + init + ["model.rope_theta=null"])
    built = keye_config(train, tokenizer)
    assert built.language.rope_theta == 2.5e6
    model, _ = build_weights(train, built, device=torch.device("cpu"))
    apply_stage(model, None, train.stage)
    assert model.cfg.language.rope_theta == train.stage.rope_theta == 8e6
    # A stage without a reset trains on at the run's base (never the preset's 1e6).
    _, train = compose_config("stage2_multitask", OVERRIDES + init + ["model.rope_theta=null"])
    assert keye_config(train, tokenizer).language.rope_theta == 2.5e6
    _, train = compose_config("stage2_multitask", OVERRIDES + init + ["model.rope_theta=2.5e6"])
    assert keye_config(train, tokenizer).language.rope_theta == 2.5e6


def test_stage3_from_a_run_at_the_recipe_base_resets_explicitly(tokenizer, tmp_path):
    cfg = tiny()
    _save_run(build_model(cfg, seed=0), tmp_path / "stage2", cfg)
    _, train = compose_config("stage3_anneal_128k", OVERRIDES + [f"stage.init_from={tmp_path / 'stage2'}"])
    built = keye_config(train, tokenizer)
    assert built.language.rope_theta == 1e6  # the reset is the stage's, applied when it starts
    model, _ = build_weights(train, built, device=torch.device("cpu"))
    apply_stage(model, None, train.stage)
    assert model.cfg.language.rope_theta == 8e6


def test_init_from_a_run_of_another_size_builds_that_size(tokenizer, tmp_path):
    small = tiny()
    wide = dataclasses.replace(
        small,
        language=dataclasses.replace(small.language, hidden_size=96, num_layers=3, intermediate_size=160),
        projector=dataclasses.replace(small.projector, text_hidden_size=96),
    )
    source = build_model(wide, seed=4)
    _save_run(source, tmp_path / "wide", wide)
    _, train = compose_config("stage2_multitask", OVERRIDES + [f"stage.init_from={tmp_path / 'wide'}"])
    built = keye_config(train, tokenizer)
    assert (built.language.hidden_size, built.language.num_layers) == (96, 3)
    model, _ = build_weights(train, built, device=torch.device("cpu"))
    batch = toy_packed_batch(wide, seed=0)
    inputs = {k: batch[k] for k in ("position_ids", "cu_seqlens", "pixel_values", "grid_thw")}
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], **inputs), source(batch["input_ids"], **inputs))


def test_from_hf_builds_a_keye_qwen3_or_siglip_folders_architecture(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    keye = _with(tiny(), num_layers=3, rope_theta=3e5)
    save_keye_hf(build_model(keye, seed=0).state_dict(), cfg=keye, out_dir=tmp_path / "keye", dtype="fp32")
    _, train = compose_config(
        "stage2_multitask", OVERRIDES + [f"model.from_hf={tmp_path / 'keye'}", "model.rope_theta=null"]
    )
    built = keye_config(train, tokenizer)
    assert built.language == dataclasses.replace(keye.language, attn_backend="sdpa")

    qwen3 = transformers.Qwen3Config(
        vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, rms_norm_eps=1e-5,
    )  # fmt: skip
    transformers.Qwen3ForCausalLM(qwen3).save_pretrained(tmp_path / "qwen3")
    _, train = compose_config(
        "stage1_align", OVERRIDES + [f"model.from_hf={tmp_path / 'qwen3'}", "model.rope_theta=null"]
    )
    lang = keye_config(train, tokenizer).language
    assert (lang.hidden_size, lang.num_layers, lang.num_heads, lang.num_kv_heads, lang.head_dim) == (
        48,
        3,
        4,
        1,
        12,
    )
    assert (lang.intermediate_size, lang.rms_norm_eps) == (80, 1e-5)
    assert lang.rope_theta == qwen3.rope_parameters["rope_theta"]
    assert keye_config(train, tokenizer).projector.text_hidden_size == 48

    vision = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                  image_size=84, patch_size=14)  # fmt: skip
    text = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    siglip = transformers.SiglipConfig(vision_config=vision, text_config=text)
    transformers.SiglipModel(siglip).save_pretrained(tmp_path / "siglip")
    _, train = compose_config("stage0_vit", OVERRIDES + [f"model.from_hf={tmp_path / 'siglip'}"])
    built = keye_config(train, tokenizer)
    v = built.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.image_size) == (48, 3, 4, 96, 84)
    assert v.num_packing_positions == 0 and built.projector.vision_hidden_size == 48
    assert (built.text_tower.hidden_size, built.text_tower.num_layers) == (32, 1)
    build_model(built, device="meta")  # the combination is a buildable model


def test_from_hf_and_init_from_must_agree(tokenizer, tmp_path):
    cfg = tiny()
    _save_run(build_model(cfg, seed=0), tmp_path / "run", cfg)
    other = _with(cfg, num_layers=4)
    save_keye_hf(build_model(other, seed=0).state_dict(), cfg=other, out_dir=tmp_path / "hf", dtype="fp32")
    _, train = compose_config(
        "stage2_multitask",
        OVERRIDES + [f"model.from_hf={tmp_path / 'hf'}", f"stage.init_from={tmp_path / 'run'}"],
    )
    with pytest.raises(ValueError, match=r"LLM 64x4 .* but stage\.init_from=.* is .*LLM 64x2"):
        keye_config(train, tokenizer)


# ------------------------------------------------------------------------------------ pilot presets


def _count_public(*, llm_hidden, llm_layers, llm_mlp, heads=16, kv_heads=8, head_dim=128, vocab=151936):
    """Parameters of SigLIP-so400m-patch14-384 (+ the packing table and pooling head), the 1.5 projector
    and an untied Qwen3 decoder, from the public config numbers alone."""
    d, mlp, layers, patch, side = 1152, 4304, 27, 14, 384 // 14
    linear = lambda i, o: i * o + o  # noqa: E731
    norm = 2 * d
    vit_layer = 4 * linear(d, d) + linear(d, mlp) + linear(mlp, d) + 2 * norm
    head = d + 3 * d * d + 3 * d + linear(d, d) + norm + linear(d, mlp) + linear(mlp, d)
    vit = 3 * patch * patch * d + d + side * side * d + 32768 * d + layers * vit_layer + norm + head
    merged = 4 * d
    projector = 2 * merged + linear(merged, merged) + linear(merged, llm_hidden)
    attn = (
        llm_hidden * heads * head_dim + 2 * llm_hidden * kv_heads * head_dim + heads * head_dim * llm_hidden
    )
    llm_layer = attn + 2 * head_dim + 3 * llm_hidden * llm_mlp + 2 * llm_hidden
    llm = vocab * llm_hidden + llm_layers * llm_layer + llm_hidden + vocab * llm_hidden
    return vit + projector + llm


@pytest.mark.parametrize(
    "make, public",
    [
        (keye_2b, dict(llm_hidden=2048, llm_layers=28, llm_mlp=6144)),  # Qwen3-1.7B
        (keye_1b, dict(llm_hidden=1024, llm_layers=28, llm_mlp=3072)),  # Qwen3-0.6B
    ],
)
def test_pilot_presets_have_the_public_parameter_counts(make, public):
    model = build_model(make(), device="meta")
    assert sum(p.numel() for p in model.parameters()) == _count_public(**public)


def test_pilot_recipes_use_the_presets():
    for name in ("keye_2b", "keye_1b"):
        _, train = compose_config("stage2_multitask", OVERRIDES + [f"model={name}"])
        assert train.model.preset == name
