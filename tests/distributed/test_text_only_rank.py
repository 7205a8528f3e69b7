"""A DP rank whose packed row holds no image or video must not deadlock FSDP, and the math stays exact."""

import dataclasses

import pytest
import torch
from harness import run_ranks

from keye_train.data.batch import IGNORE_INDEX, PackedBatch
from keye_train.distributed.fsdp import FSDPConfig
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import ParallelConfig, parallelize
from keye_train.distributed.vision import VisualRouter
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy
from keye_train.train.step import LanguageModelStep

pytestmark = pytest.mark.dist
SEQ = 64


def batches(cfg):
    """Rank 0: the multimodal toy row. Rank 1: a text-only row (no pixels at all)."""
    visual = toy_packed_batch(cfg, seed=0, seq_len=SEQ)
    ids = torch.randint(1, cfg.vision_start_token_id, (1, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    text = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(SEQ).expand(3, 1, SEQ),
        "cu_seqlens": torch.tensor([0, SEQ], dtype=torch.int32),
        "pixel_values": torch.empty(0, 3, 14, 14),
        "grid_thw": torch.empty(0, 3, dtype=torch.long),
    }
    return [
        PackedBatch(**{k: v for k, v in b.items()}, sample_keys=[str(i)])
        for i, b in enumerate((visual, text))
    ]


def reference_grads(cfg):
    model = build_model(cfg, seed=0)
    rows = batches(cfg)
    count = sum(b.num_target_tokens for b in rows)
    for b in rows:
        kwargs = (
            {} if b.pixel_values.shape[0] == 0 else {"pixel_values": b.pixel_values, "grid_thw": b.grid_thw}
        )
        logits = model(b.input_ids, position_ids=b.position_ids, cu_seqlens=b.cu_seqlens, **kwargs)
        (token_cross_entropy(logits, b.labels)[0] / count).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _dp2_step(rank, world_size, cfg):
    dims = ParallelDims(world_size=world_size)
    model = build_model(cfg, seed=0)
    parallelize(
        model,
        dims=dims,
        cfg=ParallelConfig(fsdp=FSDPConfig(zero_stage=2, visual_replicas=1)),
        precision="fp32",
    )
    rows = batches(cfg)
    count = torch.tensor(float(sum(b.num_target_tokens for b in rows)))
    step = LanguageModelStep(
        model,
        dims=dims,
        loss_parallel=False,
        device=torch.device("cpu"),
        router=VisualRouter(model),
        trained_groups={"all": model},
    )
    step.forward_backward([rows[rank]], global_count=count)
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def test_a_text_only_rank_completes_and_matches_the_single_process_gradients():
    cfg = tiny()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, use_head=False))
    expected = reference_grads(cfg)
    results = run_ranks(_dp2_step, world_size=2, args=(cfg,), timeout_s=180)
    for grads in results:
        assert grads.keys() >= expected.keys()
        for name, ref in expected.items():
            torch.testing.assert_close(
                grads[name], ref, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
            )
