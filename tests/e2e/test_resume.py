"""Resume exactness: SIGTERM + resume reproduces an uninterrupted run, also under another layout; a run
killed -9 before, during or after its first checkpoint comes back with the identical command."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import COMMON, metrics, run_env, train, train_command

from keye_train.checkpoint import kill_points
from keye_train.checkpoint.dcp import checkpoint_problem
from keye_train.checkpoint.identity import read_identity

pytestmark = [pytest.mark.slow, pytest.mark.dist]
STEPS = 6
# DP2, one packed row per rank; peak_tflops=1 keeps the logged MFU of the tiny model well above 0.
DP2 = ["data.microbatches=1", "peak_tflops=1"]


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
    """The uninterrupted DP2 run (1 packed row per rank) every resume below must reproduce."""
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    train(nproc=2, overrides=base(synthetic, run_dir, *DP2))
    return metrics(run_dir)


@pytest.fixture(scope="module")
def dp2_saved(synthetic, tmp_path_factory):
    """The same run stopped after 3 steps (its final checkpoint); each test resumes a copy of it."""
    run_dir = tmp_path_factory.mktemp("dp2_saved") / "run"
    train(nproc=2, overrides=base(synthetic, run_dir, "steps=3", *DP2))
    return run_dir


def _resumable_copy(dp2_saved, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(dp2_saved, run_dir)
    return run_dir


def _assert_reproduces(resumed, reference, *, exact: bool):
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        assert resumed[step]["step_hash"] == reference[step]["step_hash"], f"step {step}"
        expected = reference[step]["loss"]
        if exact:
            assert resumed[step]["loss"] == expected, f"step {step}"
        else:
            assert resumed[step]["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), f"step {step}"


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
def test_resume_under_another_layout(synthetic, dp2_reference, dp2_saved, tmp_path, layout):
    """Saved at DP2 (1 packed row per rank), resumed at TP2, PP2 or PP2 x CP2 (the same global batch)."""
    run_dir = _resumable_copy(dp2_saved, tmp_path)
    nproc, overrides = RESUMED_LAYOUTS[layout]
    train(nproc=nproc, overrides=base(synthetic, run_dir, *overrides))
    _assert_reproduces(metrics(run_dir), dp2_reference, exact=False)


def test_resume_in_the_same_layout_is_bitwise_identical(synthetic, dp2_reference, dp2_saved, tmp_path):
    """The planned loader: steps continue exactly after a resume (same keys, same losses, bit for bit)."""
    run_dir = _resumable_copy(dp2_saved, tmp_path)
    train(nproc=2, overrides=base(synthetic, run_dir, *DP2))
    resumed = metrics(run_dir)
    _assert_reproduces(resumed, dp2_reference, exact=True)
    for step in range(STEPS):
        assert resumed[step]["plan_max_over_mean"] >= resumed[step]["plan_lower_bound"]
        assert resumed[step]["mfu"] > 0


LAUNCHER = Path(__file__).resolve().parents[2] / "launch" / "torchrun.sh"


def _launch(command: list[str], *, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """launch/torchrun.sh with this interpreter's keye-train and torchrun; KEYE_KILL_AT kills every rank
    (each SIGKILLs itself) at a named point of the checkpoint manager (checkpoint/kill_points.py)."""
    env = run_env() | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if kill_at is not None:
        env[kill_points.ENV] = kill_at
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_preempted_runs_come_back_with_the_identical_command(synthetic, dp2_reference, tmp_path):
    """kill -9 before, during and after the first checkpoint, each time followed by the identical command
    (resume=true as always, no flag): every launch starts, and the finished run equals the uninterrupted
    one (losses bit for bit, the same samples). Before and during: no complete checkpoint, the run's own
    metrics move aside and it restarts from step 0; after: it resumes at step 2."""
    run_dir = tmp_path / "preempted"
    command = [str(LAUNCHER), "2", *base(synthetic, run_dir, *DP2, "checkpoint.interval_steps=2"), *COMMON]
    first = run_dir / "checkpoints" / "step-2"
    run_ids = set()
    for launch, kill_at in enumerate(["checkpoint.start", "checkpoint.written", "checkpoint.saved"]):
        result = _launch(command, kill_at=kill_at)
        assert result.returncode != 0 and f"{kill_points.ENV}={kill_at}: sending SIGKILL" in result.stderr
        assert ("restarting from step 0" in result.stdout) == (launch > 0), result.stdout[-2000:]
        killed = metrics(run_dir)  # this launch's own records: it started from step 0
        assert sorted(killed) == [0, 1], kill_at
        for step in killed:
            assert killed[step]["loss"] == dp2_reference[step]["loss"], (kill_at, step)
        state = (checkpoint_problem(first) or "complete").split(":")[0] if first.exists() else "absent"
        assert state == ["absent", "partial", "complete"][launch], (kill_at, state)
        run_ids.add(read_identity(run_dir)["run_id"])
    result = _launch(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step 2" in result.stdout
    _assert_reproduces(metrics(run_dir), dp2_reference, exact=True)
    assert run_ids == {read_identity(run_dir)["run_id"]}  # one run throughout
