"""Curriculum stages: presets, freezing (bit-identical frozen weights), RoPE base reset."""

from __future__ import annotations

import pytest
import torch

from keye_train.checkpoint.hf_config import keye_config_to_hf
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.models.siglip_text import SiglipTextTower
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy
from keye_train.train.optim import OptimConfig, build_optimizer
from keye_train.train.stages import StageConfig, apply_stage, reset_rope_theta, stage_preset


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_presets_follow_the_paper_recipe() -> None:
    s0, s1, s2, s3 = (
        stage_preset(n) for n in ("stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal")
    )
    assert (sorted(s0.train), s0.loss) == (["text_tower", "vit"], "siglip")
    assert (s1.train, s1.loss, s1.rope_theta) == (["projector"], "lm", None)
    assert sorted(s2.train) == ["llm", "projector", "vit"] and s2.max_seq_len == 8192
    assert s3.rope_theta == 8e6 and s3.max_seq_len == 131072 and s3.loss == "lm"
    # The free fields are overridable; the name alone is enough from a YAML recipe.
    assert stage_preset("stage3_anneal", max_seq_len=32768, init_from="/x").init_from == "/x"
    assert StageConfig(name="stage3_anneal") == s3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "stage9"}, "stage.name"),
        ({"name": "custom"}, "stage.train is required"),
        ({"train": ["decoder"]}, "unknown modules"),
        ({"train": ["llm", "llm"]}, "twice"),
        ({"train": []}, "trains nothing"),
        ({"train": ["llm"], "loss": "ce"}, "stage.loss"),
        ({"train": ["llm"], "loss": "siglip"}, "no gradient"),
        ({"train": ["text_tower"], "loss": "lm"}, "no gradient"),
        ({"train": ["llm"], "rope_theta": -1.0}, "stage.rope_theta"),
        ({"train": ["llm"], "max_seq_len": 0}, "stage.max_seq_len"),
        ({"name": "stage1_align", "train": ["projector", "llm"]}, "contradict"),
    ],
)
def test_stage_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StageConfig(**kwargs)


def test_stage1_trains_only_the_projector() -> None:
    cfg = tiny()
    model = build_model(cfg, seed=0)
    before = {
        "visual": _snapshot(model.visual),
        "model": _snapshot(model.model),
        "mlp_AR": _snapshot(model.mlp_AR),
    }
    before["lm_head"] = _snapshot(model.lm_head)
    parts = apply_stage(model, None, stage_preset("stage1_align"))
    assert set(parts) == {"projector"}
    # Weight decay would move frozen weights if they reached the optimizer: make it large.
    optimizer = build_optimizer(parts, OptimConfig(weight_decay=0.5, lr={"projector": 1e-2}))
    batch = toy_packed_batch(cfg)
    for _ in range(3):
        loss_sum, count = token_cross_entropy(_logits(model, batch), batch["labels"])
        optimizer.zero_grad()
        (loss_sum / count).backward()
        optimizer.step()
    for name in ("visual", "model", "lm_head"):
        after = getattr(model, name).state_dict()
        for key, value in before[name].items():
            assert torch.equal(after[key], value), f"{name}.{key} changed although frozen"
    changed = [k for k, v in model.mlp_AR.state_dict().items() if not torch.equal(v, before["mlp_AR"][k])]
    assert set(changed) == set(before["mlp_AR"])  # every projector tensor learned
    assert all(p.grad is None for p in model.visual.parameters())  # no backward through a frozen ViT
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.mlp_AR.parameters()}


def test_stage0_trains_vit_and_text_tower_and_is_idempotent() -> None:
    cfg = tiny()
    model = build_model(cfg, seed=0)
    tower = SiglipTextTower(cfg.text_tower)
    stage0 = stage_preset("stage0_vit")
    with pytest.raises(ValueError, match="no text tower"):
        apply_stage(model, None, stage0)
    apply_stage(model, tower, stage_preset("stage2_multitask"))
    assert not any(p.requires_grad for p in tower.parameters())  # tower frozen outside stage 0
    parts = apply_stage(model, tower, stage0)
    assert set(parts) == {"vit", "text_tower"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    assert all(p.requires_grad for p in tower.parameters())
    # Going from stage 0 to stage 2 re-enables the LLM and projector and freezes the tower again.
    parts = apply_stage(model, tower, stage_preset("stage2_multitask"))
    assert set(parts) == {"vit", "projector", "llm"}
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in tower.parameters())
    assert {n for n, _ in parts["llm"].named_parameters()} == {
        n for n, _ in model.named_parameters() if n.startswith(("model.", "lm_head."))
    }


def test_stage3_rope_reset_equals_a_model_built_with_the_new_base() -> None:
    cfg = tiny()
    assert cfg.language.rope_theta == 1e6
    model = build_model(cfg, seed=0)
    batch = toy_packed_batch(cfg)
    with torch.no_grad():
        logits_1e6 = _logits(model, batch)
    apply_stage(model, None, stage_preset("stage3_anneal"))
    with torch.no_grad():
        logits_reset = _logits(model, batch)

    direct_cfg = tiny()
    direct_cfg.language.rope_theta = 8e6
    direct = build_model(direct_cfg, seed=0)
    with torch.no_grad():
        logits_direct = _logits(direct, batch)
    assert (logits_reset - logits_1e6).abs().max() > 1e-4  # the base matters for these positions
    torch.testing.assert_close(logits_reset, logits_direct, rtol=0, atol=0)
    # The saved configuration records the new base.
    assert model.cfg.language.rope_theta == 8e6 and model.model.cfg.rope_theta == 8e6
    assert keye_config_to_hf(model.cfg)["rope_theta"] == 8e6


def test_reset_rope_theta_errors_and_separate_config_objects() -> None:
    model = build_model(tiny(), seed=0)
    with pytest.raises(ValueError, match="rope_theta"):
        reset_rope_theta(model, 0.0)
    with pytest.raises(ValueError, match="no language model config"):
        reset_rope_theta(model.visual, 8e6)
    # A decoder whose config is a copy of the composite's (e.g. after a pipeline split) gets it too.
    model.model.cfg = type(model.cfg.language)(**vars(model.cfg.language))
    reset_rope_theta(model, 5e6)
    assert model.model.cfg.rope_theta == 5e6 and model.cfg.language.rope_theta == 5e6
