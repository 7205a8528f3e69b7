"""Ulysses context parallelism (CP2, DP2 x CP2 with FSDP2, TP2 x CP2) equals the single-process run.

The packed multimodal toy batch is padded to S=64 and cut into contiguous S/cp slices; visual embeddings
are routed to the rank whose slice holds their pad tokens; the local attention sees the full sequence
(and its cu_seqlens) after DeepSpeed's all-to-all. Each rank divides its loss sum by the global target
count and gradients are summed over dp x cp, so the gradient equals the reference's exactly up to the
reduction order. Tolerances (fp32): losses rtol 1e-5; first-step gradients atol 1e-6 / rtol 1e-4;
parameters after two SGD steps within the harness's PARAM_ATOL (harness.py says why not AdamW).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from harness import PARAM_ATOL, PARAM_RTOL, PARITY_LR, parity_optimizer, reference_run, run_ranks
from test_pp import full_tensor, reference_rows
from torch.distributed.tensor import DTensor

from keye_train.distributed.context_parallel import (
    ContextParallelConfig,
    RingAttention,
    apply_context_parallel,
    global_target_count,
    local_visual_embeds,
    route_visual_to_slice,
    split_for_context_parallel,
)
from keye_train.distributed.fsdp import apply_fsdp
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.tensor_parallel import (
    apply_tensor_parallel,
    loss_parallel_context,
    vocab_parallel_cross_entropy,
)
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.models.rope import mrope_cos_sin
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

SEQ_LEN, STEPS, LR = 64, 2, PARITY_LR
LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


def _forward(model, batch, **kw):
    return model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        grid_thw=batch["grid_thw"],
        **kw,
    )


def _reference(cfg, *, rows: int) -> dict:
    """Single process on `rows` toy rows (seeds 0..rows-1): losses, first-step gradients and parameters
    after STEPS SGD steps (test_pp's reference, as the dict the layouts return)."""
    losses, grads, params = reference_rows(cfg, rows=rows, steps=STEPS, lr=LR)
    return {"losses": losses, "grads": grads, "params": params}


def _assert_matches(result: dict, ref: dict, what: str) -> None:
    assert result["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), what
    assert result["grads"].keys() == ref["grads"].keys(), what
    for kind, atol, rtol in (("grads", GRAD_ATOL, GRAD_RTOL), ("params", PARAM_ATOL, PARAM_RTOL)):
        for name, expected in ref[kind].items():
            torch.testing.assert_close(
                result[kind][name], expected, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{what} {n}: {m}"
            )


# --------------------------------------------------------------------------- unit level (no processes)


def test_cp_split_is_consistent_with_the_unsplit_sequence():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    batch = toy_packed_batch(cfg, seq_len=SEQ_LEN)
    with torch.no_grad():
        visual = model.encode_visual(batch["pixel_values"], batch["grid_thw"])
        full_embeds = model.embed(batch["input_ids"], visual)
        logits = _forward(model, batch, visual_embeds=visual)
    full_sum, full_count = token_cross_entropy(logits, batch["labels"])
    full_cos, full_sin = mrope_cos_sin(
        position_ids=batch["position_ids"],
        head_dim=cfg.language.head_dim,
        theta=cfg.language.rope_theta,
        mrope_section=cfg.language.mrope_section,
    )
    for cp in (2, 4):
        parts = [
            split_for_context_parallel(batch, cp_rank=r, cp_size=cp, visual_token_ids=model.visual_token_ids)
            for r in range(cp)
        ]
        for key, dim in (("input_ids", 1), ("labels", 1), ("position_ids", 2)):
            assert all(p[key].shape[dim] == SEQ_LEN // cp for p in parts)
            assert torch.equal(torch.cat([p[key] for p in parts], dim=dim), batch[key]), key
        assert all(torch.equal(p["cu_seqlens"], batch["cu_seqlens"]) for p in parts)  # attention sees all
        # Every visual embedding goes to exactly one rank, in order, and splices the same rows as unsplit.
        assert torch.equal(torch.cat([p["visual_index"] for p in parts]), torch.arange(visual.shape[0]))
        local_sums, local_counts = [], []
        for r, part in enumerate(parts):
            rows = slice(r * SEQ_LEN // cp, (r + 1) * SEQ_LEN // cp)
            embeds = model.embed(part["input_ids"], local_visual_embeds(visual, part["visual_index"]))
            torch.testing.assert_close(embeds, full_embeds[:, rows], atol=0, rtol=0)
            cos, sin = mrope_cos_sin(
                position_ids=part["position_ids"],
                head_dim=cfg.language.head_dim,
                theta=cfg.language.rope_theta,
                mrope_section=cfg.language.mrope_section,
            )
            torch.testing.assert_close((cos, sin), (full_cos[:, rows], full_sin[:, rows]), atol=0, rtol=0)
            loss_sum, count = token_cross_entropy(logits[:, rows], part["labels"])
            local_sums.append(loss_sum)
            local_counts.append(count)
        assert int(sum(local_counts)) == int(full_count)
        torch.testing.assert_close(sum(local_sums) / sum(local_counts), full_sum / full_count)
        # A wrong split is visible: rank 1 reusing rank 0's positions changes the rotary angles.
        assert not torch.equal(parts[1]["position_ids"], parts[0]["position_ids"])


def test_split_and_config_errors_name_the_problem():
    batch = toy_packed_batch(tiny())  # 61 tokens: not divisible by 2
    with pytest.raises(ValueError, match="S=61, cp=2"):
        split_for_context_parallel(batch, cp_rank=0, cp_size=2)
    with pytest.raises(ValueError, match="cp_rank=2"):
        split_for_context_parallel(toy_packed_batch(tiny(), seq_len=64), cp_rank=2, cp_size=2)
    with pytest.raises(ValueError, match="cp_impl='zigzag'"):
        ContextParallelConfig(cp_impl="zigzag")
    q = torch.zeros(1, 8, 4, 16)
    with pytest.raises(RuntimeError, match="cp_impl='ring' needs CUDA"):
        RingAttention()(q, q, q, cu_seqlens=None, causal=True)


# --------------------------------------------------------------------------- distributed


def _cp_step(model, batch, *, count_mesh, cp_rank, cp_size, precomputed_visual: bool):
    """One forward + backward on this rank's slice; returns the (global) loss for logging."""
    part = split_for_context_parallel(
        batch, cp_rank=cp_rank, cp_size=cp_size, visual_token_ids=model.visual_token_ids
    )
    # Rank 1's slice holds no pad token: the zero anchor still runs the ViT backward there (see VisualRoute).
    if precomputed_visual:  # the ViT-router path: embeddings arrive precomputed, this rank takes its rows
        visual = model.encode_visual(batch["pixel_values"], batch["grid_thw"])
        logits = _forward(model, part, visual_embeds=local_visual_embeds(visual, part["visual_index"]))
        anchor = visual.sum() * 0.0
    else:  # the ViT runs inside the model's forward (needed under FSDP2), its output cut to this slice
        with route_visual_to_slice(model, part["visual_index"]) as route:
            logits = _forward(model, part, pixel_values=batch["pixel_values"])
        anchor = route.zero_anchor()
    loss_sum, count = token_cross_entropy(logits, part["labels"])
    total = global_target_count(count, mesh=count_mesh)
    (loss_sum / total + anchor).backward()
    logged = loss_sum.detach().clone()
    dist.all_reduce(logged, group=count_mesh.get_group())
    return (logged / total).item()


def _train(model, batch, *, reduce_grads_over, **step_kw) -> dict:
    optimizer = parity_optimizer(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        optimizer.zero_grad()
        losses.append(_cp_step(model, batch, **step_kw))
        if reduce_grads_over is not None:
            # Plain data-parallel reduction for the CP-only layout: SUM, since the loss is already divided
            # by the global count (an average would divide the gradient by cp a second time).
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=reduce_grads_over.get_group())
        if step == 0:
            grads = {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    return {
        "losses": losses,
        "grads": grads,
        "params": {n: full_tensor(p) for n, p in model.named_parameters()},
    }


def _cp_ranks(rank, world_size):
    cfg = tiny()
    dims = ParallelDims(world_size=world_size, cp=2)  # dp_shard=2 x cp=2
    cp_mesh, cp_rank = dims.submesh("cp"), dims.rank_coordinates["cp"]
    out = {}

    # CP2 alone (each dp group trains on the same seed-0 batch; gradients summed over cp only).
    model = apply_context_parallel(build_model(cfg, seed=0), cp_mesh=cp_mesh)
    from deepspeed.comm import comm as ds_comm

    out["shm_op_built"] = ds_comm.cdb.shm_comm_op is not None
    batch = toy_packed_batch(cfg, seed=0, seq_len=SEQ_LEN)
    with torch.no_grad():  # negative control: a slice with the wrong M-RoPE positions changes the loss
        part = split_for_context_parallel(
            batch, cp_rank=cp_rank, cp_size=2, visual_token_ids=model.visual_token_ids
        )
        other = batch["position_ids"].narrow(2, (1 - cp_rank) * SEQ_LEN // 2, SEQ_LEN // 2)
        wrong = dict(part, position_ids=other)  # the other rank's positions
        loss_pair = []
        for p in (part, wrong):
            with route_visual_to_slice(model, part["visual_index"]):
                s, _ = token_cross_entropy(
                    _forward(model, p, pixel_values=batch["pixel_values"]), p["labels"]
                )
            loss_pair.append(s)
        out["wrong_positions_delta"] = (loss_pair[1] - loss_pair[0]).abs().item()
    out["cp2"] = _train(
        model,
        batch,
        reduce_grads_over=cp_mesh,
        count_mesh=cp_mesh,
        cp_rank=cp_rank,
        cp_size=2,
        precomputed_visual=True,
    )

    try:  # ring attention is CUDA-only and must say so on a CPU mesh
        apply_context_parallel(build_model(cfg, seed=0), cp_mesh=cp_mesh, cp_impl="ring")
        out["ring_on_cpu"] = "no error"
    except RuntimeError as err:
        out["ring_on_cpu"] = str(err)

    # DP2 x CP2: FSDP2 (Engineer D's apply_fsdp, fp32, gradients summed over dp_shard x cp).
    model = apply_context_parallel(build_model(cfg, seed=0), cp_mesh=cp_mesh)
    apply_fsdp(model, dims=dims, precision="fp32")
    batch = toy_packed_batch(cfg, seed=dims.dp_rank, seq_len=SEQ_LEN)
    out["dp2_cp2"] = _train(
        model,
        batch,
        reduce_grads_over=None,
        count_mesh=dims.submesh("dp_cp"),
        cp_rank=cp_rank,
        cp_size=2,
        precomputed_visual=False,
    )
    return out


def _wide_heads():
    """tiny() with 8 query / 4 KV heads, so that tp*cp = 4 divides both."""
    cfg = tiny()
    language = dataclasses.replace(
        cfg.language, num_heads=8, num_kv_heads=4, head_dim=8, mrope_section=(1, 1, 2)
    )
    return dataclasses.replace(cfg, language=language)


def _tp_cp_ranks(rank, world_size):
    cfg = _wide_heads()
    dims = ParallelDims(world_size=world_size, cp=2, tp=2)
    dims.validate_for_model(num_layers=2, num_heads=8, num_kv_heads=4)
    cp_mesh, cp_rank = dims.submesh("cp"), dims.rank_coordinates["cp"]
    model = build_model(cfg, seed=0)
    apply_tensor_parallel(model, tp_mesh=dims.submesh("tp"))  # sequence parallel + loss parallel
    apply_context_parallel(model, cp_mesh=cp_mesh)
    batch = toy_packed_batch(cfg, seed=0, seq_len=SEQ_LEN)
    optimizer = parity_optimizer(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        optimizer.zero_grad()
        part = split_for_context_parallel(
            batch, cp_rank=cp_rank, cp_size=2, visual_token_ids=model.visual_token_ids
        )
        with loss_parallel_context(), route_visual_to_slice(model, part["visual_index"]) as route:
            logits = _forward(model, part, pixel_values=batch["pixel_values"])
            loss_sum, count = vocab_parallel_cross_entropy(logits, part["labels"])
            total = global_target_count(count, mesh=cp_mesh)  # tp ranks see the same tokens: cp only
            (loss_sum / total + route.zero_anchor()).backward()
        for p in model.parameters():  # sum over cp; DTensor grads are tp shards, reduced shard by shard
            if p.grad is not None:
                local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                dist.all_reduce(local, group=cp_mesh.get_group())
        if step == 0:
            grads = {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        logged = loss_sum.detach().clone()
        dist.all_reduce(logged, group=cp_mesh.get_group())
        losses.append((logged / total).item())
    return {
        "losses": losses,
        "grads": grads,
        "params": {n: full_tensor(p) for n, p in model.named_parameters()},
    }


def _all_cp_ranks(rank, world_size):
    """Both four-rank groups of layouts in one spawn (each spawn costs four interpreters' start-up)."""
    return {"cp": _cp_ranks(rank, world_size), "tp_cp": _tp_cp_ranks(rank, world_size)}


@pytest.mark.dist
def test_ulysses_cp2_dp2_cp2_and_tp2_cp2_match_single_process():
    cfg = tiny()
    ref_cp = _reference(cfg, rows=1)
    harness_losses, harness_params = reference_run(cfg, steps=STEPS, lr=LR, seq_len=SEQ_LEN)
    assert ref_cp["losses"] == pytest.approx(harness_losses, rel=1e-6)  # same reference as the harness's
    ref_union = _reference(cfg, rows=2)  # the DP ranks' batches (seeds 0, 1) as one
    wide = _wide_heads()
    ref_tp_cp = _reference(wide, rows=1)
    results = run_ranks(_all_cp_ranks, world_size=4)
    for rank, result in enumerate(results):
        _assert_matches(result["cp"]["cp2"], ref_cp, f"CP2 rank {rank}")
        _assert_matches(result["cp"]["dp2_cp2"], ref_union, f"DP2xCP2 rank {rank}")
        assert result["cp"]["wrong_positions_delta"] > 1e-3, rank
        assert "cp_impl='ring' needs CUDA" in result["cp"]["ring_on_cpu"], rank
        # DeepSpeed's comm wraps our group without JIT-building its shared-memory op (36 s of g++ a machine).
        assert not result["cp"]["shm_op_built"], rank
        _assert_matches(result["tp_cp"], ref_tp_cp, f"TP2xCP2 rank {rank}")
    # The two references differ by far more than the tolerance: the DP union is really checked.
    assert abs(ref_union["losses"][0] - ref_cp["losses"][0]) > 1e-3
