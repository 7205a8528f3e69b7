"""bf16 mixed precision through the trainer: 20 steps of the tiny model, single process and DP2, end
within 2% of the fp32 run's loss, and metrics.jsonl's first record names the precision."""

import json

import pytest
from conftest import COMMON, metrics, run_env, train_command

pytestmark = [pytest.mark.slow, pytest.mark.dist]
STEPS = 20
LR = "optim.lr={vit: 2.0e-3, projector: 5.0e-3, llm: 3.0e-3}"


def _run(synthetic, run_dir, *, precision: str, nproc: int, layout: list[str]) -> dict[int, dict]:
    import subprocess

    overrides = [
        "recipe=stage2_multitask",
        f"run_dir={run_dir}",
        f"steps={STEPS}",
        f"schedule.total_steps={STEPS}",
        f"data.manifest={synthetic['manifest']}",
        "checkpoint.interval_steps=100",
        LR,
        *layout,
        *[c for c in COMMON if not c.startswith("precision=")],
        f"precision={precision}",
    ]
    result = subprocess.run(
        train_command(nproc=nproc, port=29731, overrides=overrides),
        capture_output=True,
        text=True,
        timeout=600,
        env=run_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["precision"] == precision
    return metrics(run_dir)


def test_bf16_ends_within_2_percent_of_fp32_single_process_and_dp2(synthetic, tmp_path):
    # One global batch of two packed rows per step in every run: two microbatches on one process, or
    # one row on each of two DP ranks.
    single = ["parallel=single", "data.microbatches=2"]
    fp32 = _run(synthetic, tmp_path / "fp32", precision="fp32", nproc=1, layout=single)
    bf16 = _run(synthetic, tmp_path / "bf16", precision="bf16", nproc=1, layout=single)
    dp2 = _run(
        synthetic,
        tmp_path / "bf16_dp2",
        precision="bf16",
        nproc=2,
        layout=["parallel=dp_zero2", "data.microbatches=1"],
    )
    last = STEPS - 1
    assert fp32[last]["loss"] < 0.8 * fp32[0]["loss"]  # it trained: 2% is a fraction of what it moved
    assert [r["step_hash"] for r in bf16.values()] == [r["step_hash"] for r in fp32.values()]
    assert [r["step_hash"] for r in dp2.values()] == [r["step_hash"] for r in fp32.values()]
    assert bf16[last]["loss"] != fp32[last]["loss"]  # bf16 compute happened
    for run in (bf16, dp2):
        assert run[last]["loss"] == pytest.approx(fp32[last]["loss"], rel=0.02)
