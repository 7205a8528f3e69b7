"""Optimizer param groups, gradient clipping (plain, DTensor, FSDP2, pipeline ranks) and LR schedules."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy
from keye_train.train.optim import (
    GroupLR,
    OptimConfig,
    build_optimizer,
    clip_grad_norm,
    grad_norm,
    grads_are_finite,
    param_groups,
)
from keye_train.train.schedule import ScheduleConfig, build_scheduler, lr_factor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from harness import run_ranks  # noqa: E402


def _parts(model: nn.Module) -> dict[str, nn.Module]:
    return {
        "vit": model.visual,
        "projector": model.mlp_AR,
        "llm": nn.ModuleDict({"model": model.model, "lm_head": model.lm_head}),
    }


def _toy_loss(model: nn.Module) -> torch.Tensor:
    batch = toy_packed_batch(model.cfg)
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )
    loss_sum, count = token_cross_entropy(logits, batch["labels"])
    return loss_sum / count


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"betas": (0.9, 1.0)}, "optim.betas"),
        ({"eps": 0.0}, "optim.eps"),
        ({"weight_decay": -0.1}, "optim.weight_decay"),
        ({"grad_clip": 0.0}, "optim.grad_clip"),
        ({"impl": "apex"}, "optim.impl"),
        ({"lr": {"vit": 0.0}}, "optim.lr.vit"),
    ],
)
def test_optim_config_rejects_bad_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        OptimConfig(**kwargs)


def test_optim_config_accepts_yaml_lists() -> None:
    cfg = OptimConfig(betas=[0.8, 0.9], lr={"llm": 3e-4})
    assert cfg.betas == (0.8, 0.9) and cfg.lr.llm == 3e-4 and cfg.lr.vit == GroupLR().vit


# -- param groups ----------------------------------------------------------------------------------
def test_param_groups_split_decay_and_lr_per_module_group() -> None:
    model = build_model(tiny())
    cfg = OptimConfig(lr=GroupLR(vit=1e-3, projector=2e-3, llm=3e-3), weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(_parts(model), cfg)}
    assert set(groups) == {f"{m}.{d}" for m in ("vit", "projector", "llm") for d in ("decay", "no_decay")}
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    # Known members, spelled as Hugging Face keys.
    assert "model.layers.0.self_attn.q_proj.weight" in by_group["llm.decay"]
    assert "lm_head.weight" in by_group["llm.decay"]
    assert "model.embed_tokens.weight" in by_group["llm.no_decay"]  # embeddings: no decay by default
    assert "model.layers.0.input_layernorm.weight" in by_group["llm.no_decay"]
    assert "model.layers.0.self_attn.q_norm.weight" in by_group["llm.no_decay"]
    assert "visual.vision_model.encoder.layers.0.self_attn.q_proj.bias" in by_group["vit.no_decay"]
    assert "visual.vision_model.embeddings.patch_embedding.weight" in by_group["vit.decay"]
    assert "mlp_AR.linear_1.weight" in by_group["projector.decay"]
    assert "mlp_AR.pre_norm.weight" in by_group["projector.no_decay"]
    # Every parameter lands in exactly one group; lr and decay follow the group.
    assert sum(len(v) for v in by_group.values()) == len(names)
    assert groups["llm.decay"]["lr"] == 3e-3 and groups["vit.no_decay"]["lr"] == 1e-3
    assert groups["projector.decay"]["weight_decay"] == 0.05
    assert groups["projector.no_decay"]["weight_decay"] == 0.0

    with_embeddings = {g["name"]: g for g in param_groups(_parts(model), OptimConfig(decay_embeddings=True))}
    embed = model.model.embed_tokens.weight
    assert any(p is embed for p in with_embeddings["llm.decay"]["params"])


def test_frozen_modules_get_no_optimizer_state() -> None:
    model = build_model(tiny())
    model.visual.requires_grad_(False)
    model.model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    optimizer = build_optimizer(_parts(model), OptimConfig())
    _toy_loss(model).backward()
    optimizer.step()
    trainable = {id(p) for p in model.mlp_AR.parameters()}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == trainable
    assert {id(p) for p in optimizer.state} == trainable
    assert {g["name"].split(".")[0] for g in optimizer.param_groups} == {"projector"}


def test_build_optimizer_errors() -> None:
    model = build_model(tiny())
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(_parts(model), OptimConfig())
    with pytest.raises(ValueError, match="unknown module groups"):
        build_optimizer({"decoder": model.model}, OptimConfig())
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="one module group only"):
        build_optimizer({"llm": model.model, "projector": model.model}, OptimConfig())


def test_adamw_impls_agree() -> None:
    results = []
    for impl in ("for_loop", "foreach", "fused"):
        model = build_model(tiny(), seed=3)
        optimizer = build_optimizer(_parts(model), OptimConfig(impl=impl))
        _toy_loss(model).backward()
        optimizer.step()
        results.append(model.mlp_AR.linear_1.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


# -- clipping, single process ----------------------------------------------------------------------
def _params_with_grads(seed: int, scale: float = 1.0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(4, 5), (7,), (3, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_matches_torch_clip_grad_norm(norm_type: float) -> None:
    ours, ref = _params_with_grads(0, scale=5.0), _params_with_grads(0, scale=5.0)
    total = clip_grad_norm(ours, 1.0, norm_type=norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type=norm_type)
    torch.testing.assert_close(total, expected)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert grad_norm(ours, norm_type=norm_type) <= 1.0 + 1e-5


def test_clip_none_measures_only_and_nonfinite_leaves_grads() -> None:
    params = _params_with_grads(1, scale=10.0)
    before = [p.grad.clone() for p in params]
    total = clip_grad_norm(params, None)
    assert total > 1.0
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    params[1].grad[2] = float("nan")
    before = [p.grad.clone() for p in params]
    assert not torch.isfinite(clip_grad_norm(params, 1.0))
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
    assert not grads_are_finite(params)
    assert grads_are_finite(_params_with_grads(2))


# -- clipping across ranks -------------------------------------------------------------------------
def _full_grads(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * 3 for shape in [(4, 6), (6, 4), (5,), (4, 4)]]


def _dist_clip(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    mesh = init_device_mesh("cpu", (world_size,))
    # 1) DTensor grads as FSDP (Shard(0)) and TP (Shard(1), Replicate) hold them, plus a plain tensor.
    full = _full_grads(0)
    placements = [[Shard(0)], [Shard(1)], [Replicate()], None]
    params = []
    for grad, place in zip(full, placements, strict=True):
        if place is None:
            param = nn.Parameter(torch.zeros_like(grad))
            param.grad = grad.clone()
        else:
            param = nn.Parameter(distribute_tensor(torch.zeros_like(grad), mesh, place))
            param.grad = distribute_tensor(grad.clone(), mesh, place)
        params.append(param)
    out["dtensor_norm"] = clip_grad_norm(params, 1.0)
    out["dtensor_clipped"] = [
        p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone() for p in params
    ]
    # 2) Real FSDP2: same input on both ranks, so the averaged grads equal the single-process ones.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    fully_shard(model, mesh=mesh)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    (model(x) ** 2).sum().backward()
    out["fsdp_norm"] = clip_grad_norm(model.parameters(), 0.5)
    out["fsdp_clipped"] = [p.grad.full_tensor() for p in model.parameters()]
    # 3) Pipeline: each rank holds different layers (plain tensors), plus a part both hold in full.
    own = [nn.Parameter(torch.zeros(5))]
    own[0].grad = _full_grads(10 + rank)[2]
    shared = [nn.Parameter(torch.zeros(4, 4))]
    shared[0].grad = _full_grads(20)[3]
    out["pp_norm"] = grad_norm(own, pp_group=mesh, pp_replicated_params=shared)
    # 4) A non-finite grad on one rank only: every rank must answer False.
    flag = [nn.Parameter(torch.zeros(3))]
    flag[0].grad = torch.tensor([0.0, float("inf") if rank == 1 else 0.0, 0.0])
    out["finite_one_bad"] = grads_are_finite(flag)
    flag[0].grad = torch.zeros(3)
    out["finite_all_good"] = grads_are_finite(flag)
    return out


@pytest.mark.dist
def test_clip_over_dtensor_fsdp2_and_pipeline_ranks() -> None:
    results = run_ranks(_dist_clip, world_size=2)
    # References from full, unsharded tensors with torch's own clip_grad_norm_.
    ref = [nn.Parameter(torch.zeros_like(g)) for g in _full_grads(0)]
    for p, g in zip(ref, _full_grads(0), strict=True):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    (model(x) ** 2).sum().backward()
    fsdp_ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)

    stage_grads = [_full_grads(10 + r)[2] for r in range(2)]
    pp_ref = torch.linalg.vector_norm(torch.cat([*stage_grads, _full_grads(20)[3].flatten()]))
    for out in results:
        torch.testing.assert_close(out["dtensor_norm"], ref_norm)
        for got, want in zip(out["dtensor_clipped"], ref, strict=True):
            torch.testing.assert_close(got, want.grad)
        torch.testing.assert_close(out["fsdp_norm"], fsdp_ref_norm)
        for got, want in zip(out["fsdp_clipped"], model.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad)
        torch.testing.assert_close(out["pp_norm"], pp_ref)
        assert out["finite_one_bad"] is False and out["finite_all_good"] is True


# -- schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "linear"}, "schedule.kind"),
        ({"total_steps": 0}, "schedule.total_steps"),
        ({"warmup_steps": -1, "total_steps": 10}, "schedule.warmup_steps"),
        ({"min_lr_ratio": 1.5}, "schedule.min_lr_ratio"),
        ({"wsd_decay_fraction": 0.0}, "schedule.wsd_decay_fraction"),
        ({"wsd_decay_shape": "exp"}, "schedule.wsd_decay_shape"),
    ],
)
def test_schedule_config_rejects_bad_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ScheduleConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "clamped"),
    [
        ({"warmup_steps": 100, "total_steps": 6}, 6),  # issue 13: steps=6 under stage 2's warmup of 100
        ({"kind": "wsd", "warmup_steps": 9, "total_steps": 10, "wsd_decay_fraction": 0.5}, 5),
    ],
)
def test_warmup_longer_than_the_run_is_clamped_with_a_message(kwargs, clamped, caplog) -> None:
    with caplog.at_level("INFO", logger="keye_train.train.schedule"):
        cfg = ScheduleConfig(**kwargs)
    assert cfg.warmup_steps == clamped
    assert f"warmup_steps={kwargs['warmup_steps']}" in caplog.text and f"clamped to {clamped}" in caplog.text
    lrs = _lrs(cfg, kwargs["total_steps"], peak=1.0)
    assert lrs[clamped - 1] == pytest.approx(1.0) and all(lr > 0 for lr in lrs)


def _lrs(cfg: ScheduleConfig, steps: int, peak: float = 2.0) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_values() -> None:
    cfg = ScheduleConfig(kind="cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = _lrs(cfg, 16)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # peak 2.0 reached at the last warmup step
    assert lrs[4] == pytest.approx(2.0)  # the cosine starts at the peak
    # Cosine over steps 4..13: at the middle (progress 0.5) the factor is (1 + min) / 2.
    assert lr_factor(4 + 4.5, cfg) == pytest.approx(0.55)
    assert lrs[13] == pytest.approx(0.2) and lrs[15] == pytest.approx(0.2)  # min, then held
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_wsd_and_constant_values() -> None:
    cfg = ScheduleConfig(
        kind="wsd", warmup_steps=2, total_steps=12, wsd_decay_fraction=0.25, min_lr_ratio=0.0
    )
    lrs = _lrs(cfg, 12, peak=1.0)
    # 3 decay steps (round(0.25 * 12)) at 9, 10, 11: linear 1 -> 0.
    assert lrs == pytest.approx([0.5, 1.0, 1, 1, 1, 1, 1, 1, 1, 1.0, 0.5, 0.0])
    sqrt = ScheduleConfig(**{**cfg.__dict__, "wsd_decay_shape": "sqrt"})
    assert lr_factor(10, sqrt) == pytest.approx(1 - math.sqrt(0.5))
    assert _lrs(ScheduleConfig(kind="constant", warmup_steps=2, total_steps=5), 5, 1.0) == pytest.approx(
        [0.5, 1, 1, 1, 1]
    )


def test_scheduler_resume_matches_uninterrupted_run_per_group() -> None:
    cfg = ScheduleConfig(kind="cosine", warmup_steps=3, total_steps=10)

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 0.1)]
        optimizer = torch.optim.AdamW(groups)
        return optimizer, build_scheduler(optimizer, cfg)

    optimizer, scheduler = fresh()
    uninterrupted = []
    for _ in range(8):
        uninterrupted.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    optimizer, scheduler = fresh()
    resumed = []
    for _ in range(4):
        resumed.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    opt_state, sched_state = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = fresh()
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    for _ in range(4):
        resumed.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert resumed == uninterrupted  # same arithmetic: exactly equal
    assert uninterrupted[5][1] == pytest.approx(uninterrupted[5][0] * 0.1)  # groups keep their ratio
