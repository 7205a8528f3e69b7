"""Data parallelism with FSDP2 at ZeRO 1/2/3 (and HSDP) equals single-process gradient accumulation.

The global batch is four toy batches (seeds 0-3). DP2 ranks take two each as two micro-batches, HSDP's
four ranks one each; the reference accumulates all four in one process. Every loss is divided by the
global target-token count, and FSDP sums (not averages) gradients, so the gradient is the same sum in
every layout. Tolerance (fp32, only the reduction order differs): atol 1e-5 / rtol 1e-4 on losses and
first-step gradients; the harness's PARAM_ATOL on parameters after two SGD steps (harness.py says why
not AdamW).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from harness import PARAM_ATOL, PARAM_RTOL, PARITY_LR, parity_optimizer, run_ranks
from torch.distributed.tensor import DTensor

from keye_train.distributed.activation_checkpoint import ActivationCheckpointConfig
from keye_train.distributed.fsdp import FSDPConfig, set_microbatch, trainable_parameters
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import ParallelConfig, parallelize
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

pytestmark = pytest.mark.dist

SEEDS = (0, 1, 2, 3)
STEPS = 2
LR = PARITY_LR
ATOL, RTOL = 1e-5, 1e-4
NUM_UNITS = 8  # 2 ViT layers, visual rest, mlp_AR, embed_tokens, 2 decoder layers, norm+lm_head

STAGE1_FROZEN = ("visual", "model", "lm_head")  # stage 1 trains the projector only


def freeze(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    for name, p in model.named_parameters():
        if name.split(".")[0] in prefixes:
            p.requires_grad_(False)


def _forward_sum(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )
    return token_cross_entropy(logits, batch["labels"])


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model, batches, *, count_group=None, microbatch_hook=None) -> dict:
    """STEPS SGD steps, each accumulating over `batches`; loss = sum / global target tokens."""
    optimizer = parity_optimizer(trainable_parameters(model), lr=LR)
    losses, first_grads = [], {}
    for step in range(STEPS):
        count = sum((b["labels"] != -100).sum() for b in batches).clone()
        if count_group is not None:
            dist.all_reduce(count, group=count_group)  # every rank that sees different tokens
        optimizer.zero_grad()
        total = torch.zeros(())
        for i, batch in enumerate(batches):
            if microbatch_hook is not None:
                microbatch_hook(is_last=i == len(batches) - 1)
            loss_sum, _ = _forward_sum(model, batch)
            (loss_sum / count).backward()
            total += loss_sum.detach()
        if count_group is not None:
            dist.all_reduce(total, group=count_group)
        losses.append((total / count).item())
        if step == 0:
            first_grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        optimizer.step()
    return {
        "losses": losses,
        "grads": first_grads,
        "params": {n: _full(p) for n, p in model.named_parameters()},
        "optim_state": sorted(
            n for n, p in model.named_parameters() if p in optimizer.state and optimizer.state[p]
        ),
    }


def reference(*, frozen: tuple[str, ...] = ()) -> dict:
    """Single process: one step accumulates all four toy batches."""
    cfg = tiny()
    model = build_model(cfg, seed=0)
    freeze(model, frozen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend with the spawned ranks
    try:
        return train(model, [toy_packed_batch(cfg, seed=s) for s in SEEDS])
    finally:
        torch.set_num_threads(threads)


class CommCounter:
    """Counts FSDP2's reduce-scatters and all-gathers (it calls these two torch.distributed functions)."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self._orig = {n: getattr(dist, n) for n in ("reduce_scatter_single", "all_gather_single")}

    def __enter__(self) -> CommCounter:
        for name, fn in self._orig.items():

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                self.calls[_name] += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)


def layout_cfg(
    *, zero_stage: int, ac: str = "none", every: int = 2, cpu_offload: bool = False
) -> ParallelConfig:
    """The `parallel:` section of a layout under test."""
    return ParallelConfig(
        fsdp=FSDPConfig(zero_stage=zero_stage, cpu_offload=cpu_offload),
        ac=ActivationCheckpointConfig(mode=ac, every=every),
    )


def run_layout(
    rank: int,
    dims: ParallelDims,
    seeds: list[int],
    pcfg: ParallelConfig,
    frozen: tuple[str, ...] = (),
    precision: str = "fp32",
) -> dict:
    cfg = tiny()
    model = build_model(cfg, seed=0)
    freeze(model, frozen)
    parallelize(model, dims=dims, cfg=pcfg, precision=precision)
    batches = [toy_packed_batch(cfg, seed=s) for s in seeds]
    with CommCounter() as comms:
        result = train(
            model,
            batches,
            count_group=dims.submesh("dp_cp").get_group(),
            microbatch_hook=lambda is_last: set_microbatch(model, is_last=is_last),
        )
    result["comms"] = dict(comms.calls)
    result["frozen_grads"] = [
        n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
    ]
    return result


DP2_CASES = {  # name: (parallel section, precision)
    "zero1": (layout_cfg(zero_stage=1), "fp32"),
    "zero2+selective_ac": (layout_cfg(zero_stage=2, ac="selective", every=2), "fp32"),
    "zero3+full_ac": (layout_cfg(zero_stage=3, ac="full"), "fp32"),
    "zero3_bf16": (layout_cfg(zero_stage=3), "bf16"),
    "zero3_cpu_offload": (layout_cfg(zero_stage=3, cpu_offload=True), "fp32"),
}


def _dp2(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size)
    seeds = list(SEEDS[2 * rank : 2 * rank + 2])  # rank r takes seeds 2r, 2r+1 as two micro-batches
    return {
        name: run_layout(rank, dims, seeds, pcfg, precision=precision)
        for name, (pcfg, precision) in DP2_CASES.items()
    }


def _hsdp(rank: int, world_size: int) -> dict:
    dims = ParallelDims(world_size=world_size, dp_replicate=2, dp_shard=2)
    return run_layout(rank, dims, [SEEDS[dims.dp_rank]], layout_cfg(zero_stage=2))


def assert_matches(result: dict, ref: dict, *, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(ref["losses"]), atol=atol, rtol=rtol
    )
    assert result["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        if g is None:
            assert result["grads"][name] is None, name
        else:
            torch.testing.assert_close(result["grads"][name], g, atol=atol, rtol=rtol, msg=name)
    for name, p in ref["params"].items():
        torch.testing.assert_close(result["params"][name], p, atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=name)


@pytest.fixture(scope="module")
def ref() -> dict:
    return reference()


def test_dp2_zero_stages_match_single_process_accumulation(ref):
    results = run_ranks(_dp2, world_size=2)
    for name in ("zero1", "zero2+selective_ac", "zero3+full_ac", "zero3_cpu_offload"):
        for rank_result in results:
            assert_matches(rank_result[name], ref)
    # bf16 compute with fp32 reduction: same training, bf16-level agreement only.
    torch.testing.assert_close(
        torch.tensor(results[0]["zero3_bf16"]["losses"]), torch.tensor(ref["losses"]), atol=2e-2, rtol=2e-2
    )
    comms = {name: results[0][name]["comms"] for name in DP2_CASES}
    rs, ag = "reduce_scatter_single", "all_gather_single"
    # The ZeRO mapping, observed: ZeRO-1 reduces once per step, ZeRO-2/3 once per micro-batch;
    # ZeRO-1/2 gather once per step, ZeRO-3 also re-gathers in backward and per micro-batch.
    assert comms["zero1"][rs] == NUM_UNITS * STEPS
    assert comms["zero2+selective_ac"][rs] == NUM_UNITS * STEPS * 2
    assert comms["zero3+full_ac"][rs] == NUM_UNITS * STEPS * 2
    assert comms["zero1"][ag] == comms["zero2+selective_ac"][ag] == NUM_UNITS * STEPS
    assert comms["zero3+full_ac"][ag] > 2 * NUM_UNITS * STEPS


def test_hsdp_matches_single_process_accumulation(ref):
    for rank_result in run_ranks(_hsdp, world_size=4):
        assert_matches(rank_result, ref)


def test_reference_is_sensitive_to_the_split(ref):
    """A layout that fed a rank the wrong samples would fail: other batches give other gradients."""
    cfg = tiny()
    model = build_model(cfg, seed=0)
    other = train(model, [toy_packed_batch(cfg, seed=s) for s in (0, 0, 2, 3)])
    with pytest.raises(AssertionError):
        assert_matches(other, ref)
