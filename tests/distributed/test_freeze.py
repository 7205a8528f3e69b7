"""Stage-1 freezing under DP2: frozen ViT/LLM untouched and silent, projector trained as in one process.

Same global batch and tolerances as test_dp_zero (four toy batches, two per rank as micro-batches).
"No gradient communication" is observed directly: only the projector's unit ever reduce-scatters.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_ranks
from test_dp_zero import (
    ATOL,
    PARAM_ATOL,
    PARAM_RTOL,
    RTOL,
    SEEDS,
    STAGE1_FROZEN,
    STEPS,
    layout_cfg,
    reference,
    run_layout,
)

from keye_train.distributed.fsdp import apply_fsdp
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model

MICROBATCHES = 2


def _stage1(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size)
    seeds = list(SEEDS[MICROBATCHES * rank : MICROBATCHES * rank + MICROBATCHES])
    return {
        stage: run_layout(
            rank,
            dims,
            seeds,
            layout_cfg(zero_stage=stage, ac="full"),
            frozen=STAGE1_FROZEN,
        )
        for stage in (1, 3)
    }


@pytest.mark.dist
def test_stage1_freezing_under_dp2():
    ref = reference(frozen=STAGE1_FROZEN)
    initial = dict(build_model(tiny(), seed=0).named_parameters())
    trainable = sorted(n for n in initial if n.startswith("mlp_AR."))
    results = run_ranks(_stage1, world_size=2)
    for rank_results in results:
        for stage, result in rank_results.items():
            # Frozen: bit-identical, no gradients, no optimizer state.
            for name, p in result["params"].items():
                if name not in trainable:
                    assert torch.equal(p, initial[name].detach()), (stage, name)
            assert result["frozen_grads"] == [], stage
            assert result["optim_state"] == trainable, stage
            # Only the projector's unit reduce-scatters: ZeRO-1 once per step, ZeRO-3 once per micro-batch.
            per_step = 1 if stage == 1 else MICROBATCHES
            assert result["comms"]["reduce_scatter_single"] == STEPS * per_step, stage
            # Trained like the single-process reference.
            torch.testing.assert_close(
                torch.tensor(result["losses"]), torch.tensor(ref["losses"]), atol=ATOL, rtol=RTOL
            )
            for name in trainable:
                torch.testing.assert_close(result["grads"][name], ref["grads"][name], atol=ATOL, rtol=RTOL)
                torch.testing.assert_close(
                    result["params"][name], ref["params"][name], atol=PARAM_ATOL, rtol=PARAM_RTOL
                )
                assert not torch.equal(result["params"][name], initial[name].detach()), name


def test_a_unit_mixing_frozen_and_trainable_parameters_is_refused():
    model = build_model(tiny(), seed=0)
    model.model.layers["0"].mlp.requires_grad_(False)  # half a decoder layer
    with pytest.raises(ValueError, match="model.layers.0"):
        apply_fsdp(model, dims=ParallelDims(world_size=2), zero_stage=3)
