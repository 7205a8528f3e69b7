"""Pipeline parallelism (1F1B, interleaved, zero-bubble, TP x PP) equals the single-process run."""

import dataclasses

import pytest
import torch
from harness import PARAM_ATOL, PARAM_RTOL, PARITY_LR, parity_optimizer, reference_run, run_ranks
from torch.distributed.tensor import DTensor

from keye_train.data.batch import IGNORE_INDEX
from keye_train.distributed.context_parallel import local_visual_embeds, split_for_context_parallel
from keye_train.distributed.fsdp import FSDPConfig
from keye_train.distributed.packed_rows import (
    cu_seqlens_from_document_ids,
    document_ids_from_cu_seqlens,
    stack_packed_rows,
)
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import ParallelConfig, parallelize
from keye_train.distributed.pipeline import build_pipeline, split_layers, stages_of_rank
from keye_train.distributed.pipeline_config import PipelineConfig
from keye_train.distributed.tensor_parallel import apply_tensor_parallel
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

STEPS, LR, SEQ_LEN, ROWS = 2, PARITY_LR, 64, 4
# Losses and first-step gradients are compared tightly; parameters after STEPS SGD steps (harness.py says
# why not AdamW: microbatching regroups the sums, so round-off differs) within PARAM_ATOL.
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
LOSS_RTOL = 1e-5
# The last stage's chunked loss (models/lm_head.py) in uneven chunks: a 2-row microbatch's 128 tokens run as
# 48 + 48 + 32, a 1-row (or CP-sliced) one's 64 as 48 + 16; the reference is the plain loss on whole logits.
CHUNK_TOKENS = 48


def tiny_layers(num_layers: int):
    cfg = tiny()
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, num_layers=num_layers))


def global_batch(cfg, rows: int = ROWS) -> dict[str, torch.Tensor]:
    """ROWS fixed-length packed rows, each a different toy sample (so a wrong row split changes numbers)."""
    return stack_packed_rows([toy_packed_batch(cfg, seed=s, seq_len=SEQ_LEN) for s in range(rows)])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def reference_rows(cfg, *, rows: int = ROWS, steps: int = STEPS, lr: float = LR):
    """Single process on the whole (rows, S) batch: losses, first-step gradients, updated parameters."""
    model = build_model(cfg, seed=0)
    batch = global_batch(cfg, rows)
    optimizer = parity_optimizer(model.parameters(), lr=lr)
    losses, grads = [], {}
    for step in range(steps):
        logits = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            pixel_values=batch["pixel_values"],
            grid_thw=batch["grid_thw"],
        )
        loss_sum, count = token_cross_entropy(logits, batch["labels"])
        optimizer.zero_grad()
        (loss_sum / count).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append((loss_sum / count).item())
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_matches_reference(results: list[dict], reference, *, what: str) -> None:
    """results: per rank {losses, grads, params} of the parameters it owns (full-model names)."""
    ref_losses, ref_grads, ref_params = reference
    losses = [r["losses"] for r in results if r["losses"][0] is not None]
    assert losses, f"{what}: no rank reported a loss"
    for got in losses:
        assert got == pytest.approx(ref_losses, rel=LOSS_RTOL), what
    params, grads = {}, {}
    for r in results:
        for name, value in r["params"].items():
            if name in params:  # replicated over tp: all copies must agree exactly
                torch.testing.assert_close(value, params[name], atol=0, rtol=0)
            params[name] = value
        grads.update(r["grads"])
    assert params.keys() == ref_params.keys(), f"{what}: stages do not cover the model exactly"
    assert grads.keys() == ref_grads.keys(), what
    for name, ref in ref_grads.items():
        torch.testing.assert_close(
            grads[name], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m, n=name: f"{what} grad {n}: {m}"
        )
    for name, ref in ref_params.items():
        torch.testing.assert_close(
            params[name], ref, atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def train_pipeline(
    rank, world_size, *, cfg, schedule, microbatches, virtual_stages, tp=1, cp=1, dp=1, zero_stage=None
):
    """STEPS steps of one pipeline layout; the ViT runs locally on the rank(s) holding stage 0.

    zero_stage=None: stages get plain TP (tp > 1). Otherwise each stage goes through the trainer's own
    `parallelize` (TP, Ulysses CP, FSDP over dp x cp with that ZeRO stage), each DP replica trains its
    ROWS/dp rows and each CP rank its S/cp slice of them; FSDP sums the stage gradients over dp x cp and
    the ViT's are summed here, as the trainer's router does."""
    dims = ParallelDims(world_size=world_size, pp=world_size // (tp * cp * dp), dp_shard=dp, tp=tp, cp=cp)
    model = build_model(cfg, seed=0)
    model.lm_head.chunk_tokens = CHUNK_TOKENS  # what build_weights sets from loss.chunk_tokens
    per_replica = ROWS // dp
    first_row = dims.dp_rank * per_replica
    batch = stack_packed_rows(
        [toy_packed_batch(cfg, seed=s, seq_len=SEQ_LEN) for s in range(first_row, first_row + per_replica)]
    )
    num_target_tokens = int((global_batch(cfg)["labels"] != IGNORE_INDEX).sum())  # every replica's rows
    visual_index = None
    if cp > 1:
        batch = split_for_context_parallel(
            batch, cp_rank=dims.rank_coordinates["cp"], cp_size=cp, visual_token_ids=model.visual_token_ids
        )
        visual_index = batch.pop("visual_index")
    parallelize_stage = None
    if zero_stage is not None:
        stage_cfg = ParallelConfig(fsdp=FSDPConfig(zero_stage=zero_stage))
        parallelize_stage = lambda m: parallelize(m, dims=dims, cfg=stage_cfg, precision="fp32")  # noqa: E731
    elif tp > 1:
        parallelize_stage = lambda m: apply_tensor_parallel(m, tp_mesh=dims.submesh("tp"))  # noqa: E731
    pipeline = build_pipeline(
        model,
        dims=dims,
        schedule=schedule,
        microbatches=microbatches,
        virtual_stages=virtual_stages,
        parallelize_stage=parallelize_stage,
    )
    owned = dict(pipeline.named_parameters())
    if pipeline.has_first_stage:
        owned.update({f"visual.{n}": p for n, p in model.visual.named_parameters()})
        owned.update({f"mlp_AR.{n}": p for n, p in model.mlp_AR.named_parameters()})
    optimizer = parity_optimizer(owned.values(), lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        visual = None
        if pipeline.has_first_stage:
            visual = model.encode_visual(batch["pixel_values"], batch["grid_thw"])
            if visual_index is not None:
                visual = local_visual_embeds(visual, visual_index)
        optimizer.zero_grad()
        loss = pipeline.step(batch, visual_embeds=visual, num_target_tokens=num_target_tokens)
        if dp * cp > 1:
            loss = sum_over_replicas(loss, owned, dims=dims)
        if step == 0:
            grads = {n: full_tensor(p.grad) for n, p in owned.items() if p.grad is not None}
        optimizer.step()
        losses.append(None if loss is None else loss.item())
    stage_layers = [sorted(s.model.layers.keys(), key=int) for s in pipeline.stages]
    params = {n: full_tensor(p) for n, p in owned.items()}
    return {"losses": losses, "grads": grads, "params": params, "layers": stage_layers}


def sum_over_replicas(loss, owned: dict, *, dims: ParallelDims):
    """DP replicas and CP slices saw different tokens: their ViT gradients (plain tensors; FSDP already
    summed the stages' DTensor gradients) and their losses add up to the whole batch's."""
    group = dims.submesh("dp_cp").get_group()
    for param in owned.values():
        if param.grad is not None and not isinstance(param.grad, DTensor):
            torch.distributed.all_reduce(param.grad, group=group)
    if loss is None:
        return None
    loss = loss.clone()
    torch.distributed.all_reduce(loss, group=group)
    return loss


PP2_LAYOUTS = {
    "1f1b": dict(cfg=tiny(), schedule="1f1b", microbatches=2, virtual_stages=1),
    "interleaved_1f1b": dict(
        cfg=tiny_layers(4), schedule="interleaved_1f1b", microbatches=4, virtual_stages=2
    ),
    "zero_bubble": dict(cfg=tiny_layers(4), schedule="zero_bubble", microbatches=4, virtual_stages=2),
    "zbv": dict(cfg=tiny_layers(4), schedule="zbv", microbatches=2, virtual_stages=2),
}


def _pp2_rank(rank, world_size):
    return {name: train_pipeline(rank, world_size, **layout) for name, layout in PP2_LAYOUTS.items()}


@pytest.mark.dist
def test_pp2_schedules_match_single_process():
    results = run_ranks(_pp2_rank, world_size=2)
    references = {layers: reference_rows(tiny_layers(layers)) for layers in (2, 4)}
    for name, layout in PP2_LAYOUTS.items():
        per_rank = [r[name] for r in results]
        assert_matches_reference(per_rank, references[layout["cfg"].language.num_layers], what=name)
    # Stage placement: round-robin for the interleaved schedules, V-shaped for ZBV.
    assert [r["1f1b"]["layers"] for r in results] == [[["0"]], [["1"]]]
    assert [r["interleaved_1f1b"]["layers"] for r in results] == [[["0"], ["2"]], [["1"], ["3"]]]
    assert [r["zero_bubble"]["layers"] for r in results] == [[["0"], ["2"]], [["1"], ["3"]]]
    assert [r["zbv"]["layers"] for r in results] == [[["0"], ["3"]], [["1"], ["2"]]]
    # The comparison can fail: the parameters moved by far more than the tolerance.
    initial = dict(build_model(tiny(), seed=0).named_parameters())
    moved = references[2][2]
    for name in (
        "model.layers.1.mlp.down_proj.weight",
        "visual.vision_model.embeddings.patch_embedding.weight",
    ):
        assert (moved[name] - initial[name]).abs().max() > 10 * PARAM_ATOL, name


# Four ranks (one spawn for all), each stage parallelised by the trainer's `parallelize`: TP2 inside the
# stages, the stage-3 recipe's Ulysses CP (FSDP over the CP peers), and DP2 with FSDP ZeRO-1 and ZeRO-3.
SHARDED_LAYOUTS = {
    "pp2_tp2": dict(tp=2),
    "pp2_cp2_zero1": dict(cp=2, zero_stage=1),
    "pp2_dp2_zero1": dict(dp=2, zero_stage=1),
    "pp2_dp2_zero3": dict(dp=2, zero_stage=3),
}


def _sharded_rank(rank, world_size):
    return {
        name: train_pipeline(
            rank, world_size, cfg=tiny(), schedule="1f1b", microbatches=2, virtual_stages=1, **layout
        )
        for name, layout in SHARDED_LAYOUTS.items()
    }


@pytest.mark.dist
def test_pp2_with_tp2_cp2_or_fsdp_dp2_matches_single_process():
    results = run_ranks(_sharded_rank, world_size=4)
    reference = reference_rows(tiny())
    for name in SHARDED_LAYOUTS:
        per_rank = [r[name] for r in results]
        # Mesh order (pp, dp_replicate, dp_shard, cp, tp): ranks 0, 1 hold stage 0 (dp, cp or tp peers),
        # ranks 2, 3 stage 1.
        assert [r["layers"] for r in per_rank] == [[["0"]], [["0"]], [["1"]], [["1"]]], name
        assert_matches_reference(per_rank, reference, what=name)


def test_row_reference_is_the_harness_reference():
    """The multi-row reference is the harness's single-process run when there is one row."""
    losses, _, params = reference_rows(tiny(), rows=1)
    ref_losses, ref_params = reference_run(tiny(), steps=STEPS, lr=LR, seq_len=SEQ_LEN)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, atol=0, rtol=0)


def test_document_ids_round_trip_and_split_helpers():
    batch = global_batch(tiny(), rows=3)
    doc = document_ids_from_cu_seqlens(batch["cu_seqlens"], batch=3, seq_len=SEQ_LEN)
    assert doc.shape == (3, SEQ_LEN) and doc.dtype == torch.int32
    assert torch.equal(cu_seqlens_from_document_ids(doc), batch["cu_seqlens"])
    # A microbatch of rows 1..2 gets cu_seqlens relative to its own flattened tokens.
    sub = stack_packed_rows([toy_packed_batch(tiny(), seed=s, seq_len=SEQ_LEN) for s in (1, 2)])
    assert torch.equal(cu_seqlens_from_document_ids(doc[1:]), sub["cu_seqlens"])
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert stages_of_rank(1, pp=2, virtual_stages=2, style="loop") == [1, 3]
    assert stages_of_rank(1, pp=2, virtual_stages=2, style="v") == [1, 2]
    with pytest.raises(ValueError, match="crossing a row boundary"):
        document_ids_from_cu_seqlens(torch.tensor([0, 70, 128]), batch=2, seq_len=SEQ_LEN)


@pytest.mark.parametrize(
    ("kwargs", "pp", "layers", "match"),
    [
        (dict(schedule="gpipe"), 2, 2, "pipeline.schedule='gpipe'"),
        (dict(schedule="1f1b", virtual_stages=2), 2, 4, "pipeline.virtual_stages=2"),
        (dict(schedule="zbv", virtual_stages=3), 2, 6, "needs exactly 2"),
        (dict(schedule="1f1b", microbatches=1), 2, 2, "pipeline.microbatches=1 < pp=2"),
        (dict(schedule="interleaved_1f1b", microbatches=4, virtual_stages=2), 2, 2, "exceed the 2 decoder"),
        (dict(schedule="interleaved_1f1b", microbatches=5, virtual_stages=2), 2, 4, "multiple of"),
    ],
)
def test_pipeline_config_rejects_bad_values(kwargs, pp, layers, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(**kwargs).validate(pp=pp, num_layers=layers)
