"""The trainer's own steps (`build_train_step`) on 4 ranks under PP2 x CP2, PP2 x TP2, TP2 x DP2 and stage 0
(DP4, ZeRO-3): the heterogeneous ViT encodes each frame once in the world, and the loss and first-step
gradients equal the single process on the same global batch (our model run whole, in one process). The
loss is the trainer's chunked one (`loss.chunk_tokens`), on the pipeline's last stage too, against the
plain loss on whole logits; no rank ever allocates more than one chunk's rows of vocabulary-wide logits."""

import pytest
import torch
from harness import run_ranks
from test_pp import (
    CHUNK_TOKENS,
    GRAD_ATOL,
    GRAD_RTOL,
    LOSS_RTOL,
    ROWS,
    SEQ_LEN,
    full_tensor,
    global_batch,
    reference_rows,
)

from keye_train.checkpoint.dcp import combine_modules
from keye_train.config.loader import compose_config
from keye_train.data.batch import IGNORE_INDEX, PackedBatch
from keye_train.data.loader.pairs import PairBatch
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.models.configs import tiny
from keye_train.models.siglip_text import sigmoid_contrastive_loss
from keye_train.testing.logits_watch import LogitsWatch
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.build import build_weights
from keye_train.train.stages import apply_stage
from keye_train.train.step import build_train_step

pytestmark = pytest.mark.dist

LAYOUTS = {
    "pp2_cp2": dict(pp=2, cp=2, tp=1),
    "pp2_tp2": dict(pp=2, cp=1, tp=2),
    "tp2_dp2": dict(pp=1, cp=1, tp=2),
}


def _rows(cfg, first: int, count: int) -> list[PackedBatch]:
    return [
        PackedBatch(**toy_packed_batch(cfg, seed=s, seq_len=SEQ_LEN), sample_keys=[str(s)])
        for s in range(first, first + count)
    ]


def _one_layout(rank, world_size, *, pp, cp, tp):
    dims = ParallelDims(world_size=world_size, pp=pp, cp=cp, tp=tp)
    per_replica = ROWS // dims.dp
    _, train_cfg = compose_config(
        "stage2_multitask",
        [
            "data.manifest=unused.yaml",
            f"data.microbatches={per_replica}",
            "parallel.pipeline.microbatches=2",
            "precision=fp32",
            "parallel.fsdp.zero_stage=2",
            f"loss.chunk_tokens={CHUNK_TOKENS}",
        ],
    )
    cfg = tiny()
    # The trainer's own model builder: it hands loss.chunk_tokens to the LM head (shared by the last stage).
    model, _ = build_weights(train_cfg, cfg, device=torch.device("cpu"))
    apply_stage(model, None, train_cfg.stage)
    step = build_train_step(model, cfg=train_cfg, dims=dims, device=torch.device("cpu"))
    rows = _rows(cfg, dims.dp_rank * per_replica, per_replica)
    count = torch.tensor(float((global_batch(cfg)["labels"] != IGNORE_INDEX).sum()))
    vocab = cfg.language.vocab_size
    # Every allocation of the step, forward and backward: logits wider than one chunk would show here,
    # whether whole (vocab) or vocabulary-sharded (vocab / tp).
    with LogitsWatch(widths={vocab, vocab // tp}) as watch:
        result = step.forward_backward(rows, global_count=count)
    pipeline = getattr(step, "pipeline", None)
    grads = {
        name: full_tensor(p.grad)
        for name, p in step.checkpointed_model.named_parameters()
        if p.grad is not None
    }
    return {
        "loss": result.loss,
        "grads": grads,
        "patches": result.vit_patches,
        "total": result.vit_patches_global,
        "computes_loss": pipeline is None or pipeline.has_last_stage,
        "logit_rows": watch.max_rows,
    }


def _collectives(rank, world_size):
    """The helper's sums and gathers over named dimensions of a TP2 x DP2 mesh (ranks r, r^1 are TP peers)."""
    from keye_train.distributed import collectives

    dims = ParallelDims(world_size=world_size, tp=2)
    return {
        "tp_sum": collectives.sum_scalars(dims, [rank, 1], over="tp"),
        "dp_max": collectives.max_scalars(dims, [rank], over="dp"),
        "world": collectives.gather_scalars(dims, 10 * rank),
        "dp_objects": collectives.gather_objects(dims, {"rank": rank}, over="dp"),
    }


def _pair_batch(cfg, rank: int) -> PairBatch:
    """Rank r's image-caption pairs: r + 1 images of different sizes (so the router has work to move)."""
    gen = torch.Generator().manual_seed(rank)
    grids = [(1, 2 * (1 + (rank + i) % 3), 4) for i in range(rank + 1)]
    patches = sum(h * w for _, h, w in grids)
    text = cfg.text_tower
    return PairBatch(
        pixel_values=torch.randn(patches, 3, 14, 14, generator=gen),
        grid_thw=torch.tensor(grids),
        text_ids=torch.randint(1, text.vocab_size, (len(grids), text.max_positions), generator=gen),
        keys=[f"{rank}-{i}" for i in range(len(grids))],
    )


def _siglip_towers(cfg, train_cfg):
    model, tower = build_weights(train_cfg, cfg, device=torch.device("cpu"))
    apply_stage(model, tower, train_cfg.stage)
    return model, tower


def _stage0(rank, world_size):
    """Stage 0's step on every rank (DP4, ZeRO-3 over the world): loss, gradients, ViT patches."""
    dims = ParallelDims(world_size=world_size)
    _, train_cfg = compose_config(
        "stage0_vit",
        ["data.manifest=unused.yaml", "precision=fp32", "parallel.fsdp.zero_stage=3"],
    )
    cfg = tiny()
    model, tower = _siglip_towers(cfg, train_cfg)
    step = build_train_step(model, tower=tower, cfg=train_cfg, dims=dims, device=torch.device("cpu"))
    result = step.forward_backward([_pair_batch(cfg, rank)], global_count=torch.tensor(1.0))
    grads = {
        n: full_tensor(p.grad) for n, p in step.checkpointed_model.named_parameters() if p.grad is not None
    }
    return {
        "loss": result.loss,
        "grads": grads,
        "patches": result.vit_patches,
        "total": result.vit_patches_global,
    }


def _stage0_reference(world_size: int):
    _, train_cfg = compose_config("stage0_vit", ["data.manifest=unused.yaml"])
    cfg = tiny()
    model, tower = _siglip_towers(cfg, train_cfg)
    batches = [_pair_batch(cfg, r) for r in range(world_size)]
    vision = model.visual.vision_model
    grid = torch.cat([b.grid_thw for b in batches])
    images = vision.pool(vision(torch.cat([b.pixel_values for b in batches]), grid), grid)
    texts = tower(torch.cat([b.text_ids for b in batches]))
    loss = sigmoid_contrastive_loss(images, texts, logit_scale=tower.logit_scale, logit_bias=tower.logit_bias)
    loss.backward()
    named = combine_modules(model, tower).named_parameters()
    return loss.item(), {n: p.grad for n, p in named if p.grad is not None}, int(grid.prod(-1).sum())


def _all_layouts(rank, world_size):
    out = {name: _one_layout(rank, world_size, **layout) for name, layout in LAYOUTS.items()}
    out["collectives"] = _collectives(rank, world_size)
    out["stage0"] = _stage0(rank, world_size)
    return out


def test_trainer_steps_route_the_vit_once_and_match_one_process():
    cfg = tiny()
    ref_losses, ref_grads, _ = reference_rows(cfg, steps=1)
    total_patches = global_batch(cfg)["pixel_values"].shape[0]
    results = run_ranks(_all_layouts, world_size=4, timeout_s=400)
    for rank, r in enumerate(results):
        c = r["collectives"]
        assert c["tp_sum"] == [2 * (rank // 2) * 2 + 1, 2], rank  # {0,1} -> 1, {2,3} -> 5
        assert c["dp_max"] == [2 + rank % 2], rank  # dp groups {0,2}, {1,3}
        assert c["world"] == [0, 10, 20, 30]
        assert c["dp_objects"] == [{"rank": rank % 2}, {"rank": 2 + rank % 2}]
    loss, stage0_grads, stage0_patches = _stage0_reference(4)
    stage0 = [r["stage0"] for r in results]
    assert sum(r["patches"] for r in stage0) == stage0_patches == stage0[0]["total"]
    assert max(r["patches"] for r in stage0) < stage0_patches
    for r in stage0:
        assert r["loss"] == pytest.approx(loss, rel=LOSS_RTOL)
        assert r["grads"].keys() == stage0_grads.keys()
        for key, ref in stage0_grads.items():
            torch.testing.assert_close(
                r["grads"][key], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m, k=key: f"stage0 {k}: {m}"
            )
    for name in LAYOUTS:
        per_rank = [r[name] for r in results]
        for r in per_rank:
            assert r["loss"] == pytest.approx(ref_losses[0], rel=LOSS_RTOL), name
            assert r["total"] == total_patches, name
        # The check sees the chunks' logits (so it can fail), and never more rows than one chunk's.
        for rank, r in enumerate(per_rank):
            if r["computes_loss"]:
                assert 0 < r["logit_rows"] <= CHUNK_TOKENS, (name, rank, r["logit_rows"])
            else:
                assert r["logit_rows"] == 0, (name, rank, r["logit_rows"])
        assert sum(r["computes_loss"] for r in per_rank) == (2 if name.startswith("pp") else 4), name
        patches = [r["patches"] for r in per_rank]
        assert sum(patches) == total_patches, (name, patches)  # each frame encoded exactly once
        assert max(patches) < total_patches, (name, patches)
        grads = {}
        for r in per_rank:
            grads.update(r["grads"])  # stages hold disjoint layers; replicas agree (checked by the sums)
        assert grads.keys() == ref_grads.keys(), (name, sorted(set(ref_grads) ^ set(grads))[:5])
        for key, ref in ref_grads.items():
            torch.testing.assert_close(
                grads[key],
                ref,
                atol=GRAD_ATOL,
                rtol=GRAD_RTOL,
                msg=lambda m, k=key, n=name: f"{n} grad {k}: {m}",
            )
