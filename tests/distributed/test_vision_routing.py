"""Heterogeneous ViT: images encoded anywhere in the world, routed to pipeline stage 0, equal to 1 process."""

import pytest
import torch
import torch.distributed as dist
from harness import parity_optimizer, run_ranks
from test_pp import (
    LR,
    ROWS,
    SEQ_LEN,
    STEPS,
    assert_matches_reference,
    full_tensor,
    global_batch,
    reference_rows,
)

from keye_train.data.batch import IGNORE_INDEX
from keye_train.distributed.packed_rows import stack_packed_rows
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.pipeline import build_pipeline
from keye_train.distributed.vision import VisualRouter, reduce_visual_grads
from keye_train.distributed.vision_plan import (
    VisualItem,
    frame_pixels,
    greedy_longest_first,
    stage0_consumers,
    visual_items,
)
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch


def _cross_replica(items_per_replica: int):
    """Replica 0's items on rank 3 and replica 1's on rank 2 (DP2 x PP2): every embedding crosses replicas
    and the stage-0 ranks encode nothing themselves."""
    return lambda costs, world: [3] * items_per_replica + [2] * (len(costs) - items_per_replica)


def train_routed(rank, world_size, *, pp, tp, assign):
    dims = ParallelDims(world_size=world_size, pp=pp, tp=tp)
    cfg = tiny()
    model = build_model(cfg, seed=0)
    per_replica = ROWS // dims.dp
    # Replica d holds rows d*per..(d+1)*per of the global batch (the same seeds as global_batch's rows).
    replicas = [
        stack_packed_rows(
            [
                toy_packed_batch(cfg, seed=s, seq_len=SEQ_LEN)
                for s in range(d * per_replica, (d + 1) * per_replica)
            ]
        )
        for d in range(dims.dp)
    ]
    consumers = stage0_consumers(dims)
    items, frames = [], []
    for d, batch in enumerate(replicas):
        items += visual_items(batch["grid_thw"], consumers=consumers[d], grad_copies=dims.tp)
        frames += frame_pixels(batch["pixel_values"], batch["grid_thw"])
    assign_fn = _cross_replica(len(items) // dims.dp) if assign == "cross_replica" else greedy_longest_first
    router = VisualRouter(model, assign_fn=assign_fn)

    def held_pixels(i):
        """Only an item's consumers (its replica's stage-0 ranks) hold its pixels, as under the indexed
        loader; anywhere else they are NaN, so encoding from them instead of the shipped ones would show."""
        held = rank in items[i].consumers
        return frames[i] if held else torch.full_like(frames[i], float("nan"))

    parallelize_stage = None
    if tp > 1:
        from keye_train.distributed.tensor_parallel import apply_tensor_parallel

        parallelize_stage = lambda m: apply_tensor_parallel(m, tp_mesh=dims.submesh("tp"))  # noqa: E731
    pipeline = build_pipeline(
        model, dims=dims, schedule="1f1b", microbatches=2, parallelize_stage=parallelize_stage
    )
    dp_group = dims.submesh("dp").get_group()
    local = replicas[dims.dp_rank]
    # Normalise by the target tokens of the GLOBAL batch: all-reduce over the ranks with different rows.
    num_target_tokens = (local["labels"] != IGNORE_INDEX).sum()
    dist.all_reduce(num_target_tokens, group=dp_group)

    encoded = {"frames": 0, "patches": 0}

    def count(module, args, output):
        pixel_values, grid_thw = args
        encoded["frames"] += int(grid_thw[:, 0].sum())
        encoded["patches"] += pixel_values.shape[0]

    model.visual.register_forward_hook(count)
    owned = dict(pipeline.named_parameters())
    owned.update({f"visual.{n}": p for n, p in model.visual.named_parameters()})
    owned.update({f"mlp_AR.{n}": p for n, p in model.mlp_AR.named_parameters()})
    optimizer = parity_optimizer(owned.values(), lr=LR)
    losses, grads, reports = [], {}, []
    for step in range(STEPS):
        visual, report = router(items, pixels=held_pixels)
        reports.append(report)
        optimizer.zero_grad()
        loss = pipeline.step(local, visual_embeds=visual, num_target_tokens=num_target_tokens)
        # LLM stages: sum over the DP replicas (each holds its rows' share of the globally normalised loss).
        for p in pipeline.parameters():
            if dims.dp > 1 and p.grad is not None:
                dist.all_reduce(p.grad, group=dp_group)
        reduce_visual_grads([model.visual, model.mlp_AR])
        if step == 0:
            grads = {n: full_tensor(p.grad) for n, p in owned.items() if p.grad is not None}
        optimizer.step()
        if loss is not None:
            dist.all_reduce(loss, group=dp_group)  # the replicas' losses add up to the global loss
        losses.append(None if loss is None else loss.item())
    params = {n: full_tensor(p) for n, p in owned.items()}
    return {"losses": losses, "grads": grads, "params": params, "encoded": encoded, "reports": reports}


LAYOUTS = {
    "dp2_pp2_greedy": dict(pp=2, tp=1, assign="greedy"),
    "dp2_pp2_cross_replica": dict(pp=2, tp=1, assign="cross_replica"),
    "tp2_pp2_greedy": dict(pp=2, tp=2, assign="greedy"),
}


def _routing_rank(rank, world_size):
    return {name: train_routed(rank, world_size, **layout) for name, layout in LAYOUTS.items()}


@pytest.mark.dist
def test_routed_vit_matches_single_process_and_encodes_each_frame_once():
    results = run_ranks(_routing_rank, world_size=4)
    reference = reference_rows(tiny())
    batch = global_batch(tiny())
    total_frames = int(batch["grid_thw"][:, 0].sum())
    total_patches = batch["pixel_values"].shape[0]
    for name in LAYOUTS:
        per_rank = [r[name] for r in results]
        assert_matches_reference(per_rank, reference, what=name)
        # Each frame went through the ViT exactly once per step across the whole world.
        assert sum(r["encoded"]["frames"] for r in per_rank) == STEPS * total_frames, name
        assert sum(r["encoded"]["patches"] for r in per_rank) == STEPS * total_patches, name
        report = per_rank[0]["reports"][0]
        assert all(r["reports"][0] == report for r in per_rank), name  # every rank computed the same plan
        assert [r["encoded"]["frames"] for r in per_rank] == [STEPS * n for n in report.items_per_rank], name
        assert sum(report.patches_per_rank) == total_patches, name
    greedy = results[0]["dp2_pp2_greedy"]["reports"][0]
    assert greedy.items_per_rank == (3, 3, 3, 3) and greedy.imbalance == pytest.approx(1.0)
    skewed = results[0]["dp2_pp2_cross_replica"]["reports"][0]
    assert skewed.items_per_rank == (0, 0, 6, 6) and skewed.imbalance == pytest.approx(2.0)


def test_greedy_assignment_and_report():
    # 5 -> rank 0, 3 -> rank 1, 3 -> rank 1 (3 < 5), 1 -> rank 0 (5 < 6)
    assert greedy_longest_first([1.0, 5.0, 3.0, 3.0], 2) == [0, 0, 1, 1]
    assert greedy_longest_first([], 3) == []
    item = VisualItem(grid_hw=(4, 6), consumers=(0,))
    assert item.num_patches == 24
    items = visual_items(torch.tensor([[1, 4, 6], [2, 2, 2]]), consumers=[0, 1], grad_copies=2)
    assert [i.grid_hw for i in items] == [(4, 6), (2, 2), (2, 2)]
    frames = frame_pixels(torch.zeros(32, 3, 14, 14), torch.tensor([[1, 4, 6], [2, 2, 2]]))
    assert [f.shape[0] for f in frames] == [24, 4, 4]
