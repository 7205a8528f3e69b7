"""The estimator's parameter counts equal the real model's; its FLOPs equal a hand calculation."""

from __future__ import annotations

import pytest

from keye_train.cli.estimate import main as estimate_main
from keye_train.distributed.accounting import (
    Layout,
    Workload,
    flops_per_step,
    memory_per_rank,
    mfu,
    param_counts,
)
from keye_train.models.configs import keye_8b, tiny
from keye_train.models.keye import build_model


@pytest.mark.parametrize("make_cfg", [tiny, keye_8b])
def test_param_counts_equal_the_meta_model(make_cfg):
    cfg = make_cfg()
    model = build_model(cfg, device="meta")
    real = {
        "vision": sum(p.numel() for p in model.visual.parameters()),
        "projector": sum(p.numel() for p in model.mlp_AR.parameters()),
        "language": sum(p.numel() for p in model.model.parameters()) + model.lm_head.weight.numel(),
        "decoder_layer": sum(p.numel() for p in model.model.layers["0"].parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }
    counts = param_counts(cfg)
    assert {k: counts[k] for k in real} == real


def test_8b_flops_match_a_hand_calculation():
    """8B, one 8192-token sequence, half of it visual tokens (4096 tokens = 16384 patches, 1024/image)."""
    # Per decoder layer: q 4096x4096, k and v 4096x1024, o 4096x4096, gate/up/down 3 x 4096x12288.
    layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 12288
    assert layer == 192_937_984
    llm = 36 * layer + 151936 * 4096  # + lm_head
    vit = 3 * 14 * 14 * 1152 + 27 * (4 * 1152 * 1152 + 2 * 1152 * 4304)
    projector = 4608 * 4608 + 4608 * 4096
    tokens, visual, patches = 8192, 4096, 16384
    expected = {
        "llm_dense": 6 * llm * tokens,
        "llm_attention": 12 * 36 * 4096 * 8192 * tokens,
        "vit_dense": 6 * vit * patches,
        "vit_attention": 12 * 27 * 1152 * 1024 * patches,
        "projector": 6 * projector * visual,
    }
    got = flops_per_step(keye_8b(), Workload(seq_len=8192), Layout(dp=1))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["total"] == pytest.approx(sum(expected.values()), rel=1e-12)
    # The global batch scales with dp and micro-batches; the packed-sample length only moves attention.
    double = flops_per_step(keye_8b(), Workload(seq_len=8192), Layout(dp=2))
    assert double["total"] == pytest.approx(2 * got["total"])
    short = flops_per_step(keye_8b(), Workload(seq_len=8192, doc_len=1024), Layout(dp=1))
    assert short["llm_attention"] == pytest.approx(got["llm_attention"] / 8)
    assert short["llm_dense"] == got["llm_dense"]


def test_mfu_and_its_validation():
    assert mfu(flops=1e15, step_time_s=2.0, world=4, peak_flops_per_gpu=1e15) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="step_time_s"):
        mfu(flops=1.0, step_time_s=0.0, world=1, peak_flops_per_gpu=1.0)


def test_memory_orders_zero_stages_and_checkpointing():
    cfg, work = keye_8b(), Workload(seq_len=8192)
    mem = {z: memory_per_rank(cfg, work, Layout(dp=64, zero=z)) for z in (1, 2, 3)}
    assert mem[3]["gathered_params"] < mem[2]["gathered_params"] == mem[1]["gathered_params"]
    assert mem[3]["unsharded_grads"] == mem[2]["unsharded_grads"] < mem[1]["unsharded_grads"]
    assert mem[2]["activations_full_ac"] < mem[2]["activations_no_ac"] / 5
    half = memory_per_rank(cfg, work, Layout(dp=32, zero=3))
    assert half["adamw_fp32_shard"] == pytest.approx(2 * mem[3]["adamw_fp32_shard"])
    # AdamW states: 8 bytes per parameter, sharded over the world at dp=64.
    assert mem[3]["adamw_fp32_shard"] == pytest.approx(8 * param_counts(cfg)["total"] / 64)
    with pytest.raises(ValueError, match="layout.zero=4"):
        Layout(zero=4)


def test_estimate_cli_prints_both_layouts(capsys):
    estimate_main([])
    out = capsys.readouterr().out
    assert "stage2_8k_dp64_zero2" in out and "stage3_128k_pp4_cp8_dp2_zero1" in out
    assert "12 x L x h x s" in out
    estimate_main(["--seq", "4096", "--tp", "2", "--dp", "4", "--zero", "3", "--step-time", "1.5"])
    assert "world=8" in capsys.readouterr().out


def test_packed_batch_flops_by_hand():
    from keye_train.distributed.accounting import packed_batch_flops
    from keye_train.models.configs import tiny

    cfg = tiny()  # vision 32 wide, 2 layers, MLP 64; LLM 64 wide, 2 layers, 4x16 heads, 2 KV heads, MLP 128
    vit = 3 * 14 * 14 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 64)
    projector = 128 * 128 + 128 * 64
    llm = 2 * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 128) + 512 * 64
    # two samples of 10 and 30 tokens; one image of 4x6 patches and a 2-frame 2x2 video
    expected = (
        6 * llm * 40
        + 12 * 2 * 64 * (10**2 + 30**2)
        + 6 * vit * (24 + 8)
        + 12 * 2 * 32 * (24**2 + 4**2 + 4**2)
        + 6 * projector * (24 + 8) / 4
    )
    got = packed_batch_flops(cfg, cu_seqlens=[0, 10, 40], grid_thw=[[1, 4, 6], [2, 2, 2]])
    assert got == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "3", "--pp", "40"], "parallel.tp=3 does not divide the 8 KV heads"),
        (["--pp", "40"], "parallel.pp=40 exceeds the 36 decoder layers"),
        (["--pp", "4", "--microbatches", "2"], "parallel.pipeline.microbatches=2 < pp=4"),
    ],
)
def test_estimate_refuses_layouts_the_trainer_refuses(args, message):
    with pytest.raises(SystemExit, match=message.replace(".", r"\.")):
        estimate_main(args)


def test_estimate_within_15_percent_of_a_measured_cpu_peak():
    """The tiny model's two AdamW steps in a fresh process, fp32 and bf16 (bench/estimate_memory.py;
    the small model's rows are in docs/perf.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import estimate_memory

    for precision in ("fp32", "bf16"):
        measured = estimate_memory.measure("tiny", precision)
        predicted = estimate_memory.estimate("tiny", precision)["total_no_ac"]
        assert 0.85 <= predicted / measured <= 1.15, (precision, predicted / 2**20, measured / 2**20)
