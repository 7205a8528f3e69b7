"""Resume exactness: SIGTERM + resume reproduces an uninterrupted run, also under another layout."""

import os
import signal
import subprocess
import time

import pytest
from conftest import COMMON, metrics, run_env, train, train_command

pytestmark = [pytest.mark.slow, pytest.mark.dist]
STEPS = 6


def base(synthetic, run_dir, *extra):
    return [
        "recipe=stage2_multitask",
        f"run_dir={run_dir}",
        f"steps={STEPS}",
        f"schedule.total_steps={STEPS}",
        f"data.manifest={synthetic['manifest']}",
        "checkpoint.interval_steps=100",
        *extra,
    ]


def test_sigterm_then_resume_is_bitwise_identical(synthetic, tmp_path):
    train(overrides=base(synthetic, tmp_path / "full", "parallel=single"))
    reference = metrics(tmp_path / "full")

    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(
        train_command(nproc=1, port=0, overrides=base(synthetic, run_dir, "parallel=single") + COMMON),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=run_env(),
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists()
        and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    stopped_at = max(metrics(run_dir))
    assert stopped_at < STEPS - 1, "the run finished before the signal: nothing was resumed"
    assert "stop signal received" in output

    train(overrides=base(synthetic, run_dir, "parallel=single"))
    resumed = metrics(run_dir)
    assert sorted(resumed) == sorted(reference) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"
        assert resumed[step]["step_hash"] == reference[step]["step_hash"], f"step {step}"
    assert resumed[STEPS - 1]["running_hash"] == reference[STEPS - 1]["running_hash"]


@pytest.fixture(scope="module")
def dp2_reference(synthetic, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    train(nproc=2, port=29711, overrides=base(synthetic, run_dir, "data.microbatches=1"))
    return metrics(run_dir)


# layout -> (processes, overrides); each resumed layout trains the same global batch of 2 packed rows.
RESUMED_LAYOUTS = {
    "tp2": (2, ["parallel=tp2", "data.microbatches=2"]),
    "pp2": (
        2,
        ["parallel.pp=2", "parallel.dp_shard=1", "data.microbatches=2", "parallel.pipeline.microbatches=2"],
    ),
    # The stage-3 recipe's own layout: Ulysses CP inside each pipeline stage.
    "pp2_cp2": (4, ["parallel=zero1_cp_pp", "data.microbatches=2", "parallel.pipeline.microbatches=2"]),
}


@pytest.mark.parametrize("layout", sorted(RESUMED_LAYOUTS))
def test_resume_under_another_layout(synthetic, dp2_reference, tmp_path, layout):
    """Saved at DP2 (1 packed row per rank), resumed at TP2, PP2 or PP2 x CP2 (the same global batch)."""
    run_dir = tmp_path / "switch"
    train(nproc=2, port=29712, overrides=base(synthetic, run_dir, "steps=3", "data.microbatches=1"))
    nproc, overrides = RESUMED_LAYOUTS[layout]
    train(nproc=nproc, port=29713, overrides=base(synthetic, run_dir, *overrides))
    resumed = metrics(run_dir)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step]["step_hash"] == dp2_reference[step]["step_hash"], f"step {step}"
        expected = dp2_reference[step]["loss"]
        assert resumed[step]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), f"step {step}"


def test_indexed_loader_resume_matches_an_uninterrupted_run(synthetic, tmp_path):
    """The topology-aware loader: planned steps continue exactly after a resume (same keys, same losses)."""
    indexed = ["data.loader=indexed", "data.microbatches=1", "peak_tflops=1"]
    train(nproc=2, port=29721, overrides=base(synthetic, tmp_path / "full", *indexed))
    reference = metrics(tmp_path / "full")
    run_dir = tmp_path / "resumed"
    train(nproc=2, port=29722, overrides=base(synthetic, run_dir, "steps=3", *indexed))
    train(nproc=2, port=29723, overrides=base(synthetic, run_dir, *indexed))
    resumed = metrics(run_dir)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step]["step_hash"] == reference[step]["step_hash"], f"step {step}"
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"
        assert resumed[step]["plan_max_over_mean"] >= resumed[step]["plan_lower_bound"]
        assert resumed[step]["mfu"] > 0


def test_indexed_loader_feeds_the_pipeline_like_one_process(synthetic, tmp_path):
    """PP2 on the topology-aware loader: only stage 0 loads and holds pixels; the heterogeneous ViT ships
    the pixels of the items it gives the other stage. Same samples and losses as one process."""
    indexed = ["data.loader=indexed", "data.microbatches=2"]
    train(overrides=base(synthetic, tmp_path / "single", *indexed, "parallel=single"))
    reference = metrics(tmp_path / "single")
    pipeline = ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pipeline.microbatches=2"]
    train(nproc=2, port=29724, overrides=base(synthetic, tmp_path / "pp2", *indexed, *pipeline))
    pp2 = metrics(tmp_path / "pp2")
    assert sorted(pp2) == sorted(reference) == list(range(STEPS))
    for step in range(STEPS):
        assert pp2[step]["step_hash"] == reference[step]["step_hash"], f"step {step}"
        assert pp2[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), f"step {step}"
    # Both ranks encoded images on some step: stage 1 had no pixels of its own, so they were shipped.
    assert any(min(pp2[step]["vit_patches"]) > 0 for step in range(STEPS))


def test_kill_9_after_a_checkpoint_then_resume_consumes_the_same_samples(synthetic, tmp_path):
    """kill -9 of the whole job (no chance to checkpoint); the resume restarts from the last complete
    checkpoint, redoes the lost steps, and every step consumes the samples of the uninterrupted run."""
    indexed = ["data.loader=indexed", "data.microbatches=1", "checkpoint.interval_steps=2"]
    train(nproc=2, port=29731, overrides=base(synthetic, tmp_path / "full", *indexed))
    reference = metrics(tmp_path / "full")

    run_dir = tmp_path / "killed"
    command = train_command(nproc=2, port=29732, overrides=base(synthetic, run_dir, *indexed) + COMMON)
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=run_env(), start_new_session=True
    )
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    proc.wait(timeout=60)
    killed_at = max(metrics(run_dir))
    assert killed_at < STEPS - 1, "the run finished before the kill: nothing was resumed"

    output = train(nproc=2, port=29733, overrides=base(synthetic, run_dir, *indexed))
    assert "resumed at step" in output
    resumed = metrics(run_dir)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step]["step_hash"] == reference[step]["step_hash"], f"step {step}"
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"
