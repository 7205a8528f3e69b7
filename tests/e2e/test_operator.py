"""Operator-grade keye-train runs (issue 13): a refused resume, a refused stage, an error printed once
under torchrun, the end-of-run summary, and workers that stop when their launcher is killed."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import COMMON, run_env, train_command

pytestmark = [pytest.mark.slow]


def _run(overrides, *, nproc=1, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(nproc=nproc, overrides=overrides + COMMON),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=run_env(),
    )


def _stage2(synthetic, run_dir, *extra):
    return [
        "recipe=stage2_multitask",
        f"run_dir={run_dir}",
        "steps=2",
        f"data.manifest={synthetic['manifest']}",
        "checkpoint.interval_steps=1",
        "parallel=single",
        *extra,
    ]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("keye-train: error")]


@pytest.fixture(scope="module")
def finished(synthetic, tmp_path_factory):
    """A finished two-step stage-2 run (step-1, step-2, final)."""
    run_dir = tmp_path_factory.mktemp("operator") / "s2"
    done = _run(_stage2(synthetic, run_dir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"run_dir": run_dir, "stdout": done.stdout}


def test_every_run_ends_with_a_summary_table(finished):
    out = finished["stdout"]
    assert "run summary" in out
    table = out[out.index("run summary") :].splitlines()
    rows = {line.split("  ")[0].strip(): line for line in table if "  " in line}
    assert rows["steps"].split()[-1] == "2"
    assert rows["checkpoints written"].split()[-1] == "3"  # step-1, step-2, final
    assert "tokens" in rows and "mean tokens/s" in rows and "skipped samples" in rows


def test_resume_with_a_mistyped_checkpoint_dir_is_an_error(synthetic, finished):
    run_dir = finished["run_dir"]
    before = (run_dir / "metrics.jsonl").read_text()
    failed = _run(_stage2(synthetic, run_dir, "steps=4", f"checkpoint.dir={run_dir}/chekpoints"))
    assert failed.returncode == 1
    lines = _error_lines(failed.stderr)
    assert len(lines) == 1 and "chekpoints does not exist" in lines[0] and "fresh_run=true" in lines[0]
    assert "Traceback" not in failed.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # no duplicate step records


def test_a_stage_mismatch_is_refused_naming_both_stages(synthetic, finished):
    run_dir = finished["run_dir"]
    marker = (run_dir / "checkpoints" / "final" / "COMPLETE.json").read_text()
    args = ["recipe=stage1_align", f"run_dir={run_dir}", "steps=2", f"data.manifest={synthetic['manifest']}"]
    # Under torchrun: the error appears once, from rank 0, with torchrun's error file naming it.
    failed = _run([*args, "parallel.dp_shard=2"], nproc=2)
    assert failed.returncode != 0
    combined = failed.stdout + failed.stderr
    (line,) = _error_lines(combined)
    assert "stage2_multitask" in line and "stage1_align" in line
    assert (run_dir / "checkpoints" / "final" / "COMPLETE.json").read_text() == marker  # final untouched
    assert "on rank 0" in line
    assert "error_file: <N/A>" not in combined.split("Root Cause")[-1]


def _workers(pid: int) -> list[int]:
    """The keye-train processes torchrun `pid` started (not helpers such as a resource tracker)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    workers = []
    for child in (int(p) for p in out.split()):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"keye_train.cli.train" in cmdline:
            workers.append(child)
    return workers


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited (nobody reaped it yet)


def test_workers_exit_when_the_launcher_is_killed(synthetic, tmp_path):
    run_dir = tmp_path / "orphans"
    overrides = _stage2(synthetic, run_dir, "steps=500", "checkpoint.interval_steps=1000")
    overrides = [o for o in overrides if o != "parallel=single"] + ["parallel.dp_shard=2"]
    launcher = subprocess.Popen(
        train_command(nproc=2, overrides=overrides + COMMON),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=run_env(),
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    workers = _workers(launcher.pid)
    assert len(workers) == 2 and metrics.exists(), "the workers never started training"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 60  # the watcher polls every second; a step plus its checkpoint follow
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for pid in left:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their launcher"
    steps = metrics.read_text().count("\n")
    assert steps < 500, "the workers trained on to the end"
