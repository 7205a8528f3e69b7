"""Shared fixtures for end-to-end runs of the CLIs: a small synthetic dataset and a runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keye_train.data.synth.shards import SynthConfig, synth_dataset

# CPU runs: fp32 everywhere (bf16 mixed precision is the GPU default), no progress bar, no wandb.
COMMON = [
    "stage.max_seq_len=512",
    "schedule.warmup_steps=1",
    "precision=fp32",
    "logging.progress_bar=false",
    "logging.wandb.mode=disabled",
]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Synthetic shards with their indexes (the indexed loader plans from them)."""
    summary = synth_dataset(SynthConfig(out=tmp_path_factory.mktemp("e2e_data"), samples=30, seed=1))
    shards = sorted(str(p) for p in Path(summary["out"]).glob("*.tar"))
    subprocess.run(
        [sys.executable, "-m", "keye_train.cli.data", "index", *shards, "--tokenizer", summary["tokenizer"]],
        check=True,
        capture_output=True,
        env=run_env(),
    )
    return summary


# Stage-2 runs that several e2e files compare against each other, each layout launched once per session:
# the same global batch of 2 packed rows per step in every layout, evaluated every 2 steps.
LAYOUT_STEPS = 4
LAYOUTS = {
    "single": (1, ["parallel=single", "data.microbatches=2"]),
    "dp2": (2, ["parallel.dp_shard=2", "data.microbatches=1"]),
    "tp2": (2, ["parallel.tp=2", "parallel.dp_shard=1", "data.microbatches=2"]),
    "cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1", "data.microbatches=2"]),
    "pp2": (
        2,
        ["parallel.pp=2", "parallel.dp_shard=1", "data.microbatches=2", "parallel.pipeline.microbatches=2"],
    ),
}


@pytest.fixture(scope="session")
def layout_run(synthetic, tmp_path_factory):
    """layout_run(name) -> the run_dir of LAYOUTS[name]'s stage-2 run (trained on first use)."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            run_dir = tmp_path_factory.mktemp(f"layout_{name}")
            nproc, layout = LAYOUTS[name]
            overrides = [
                "recipe=stage2_multitask",
                f"run_dir={run_dir}",
                f"steps={LAYOUT_STEPS}",
                f"schedule.total_steps={LAYOUT_STEPS}",
                f"data.manifest={synthetic['manifest']}",
                f"data.eval_manifest={synthetic['manifest']}",
                "data.eval_interval=2",
                "data.eval_batches=2",
                "checkpoint.interval_steps=100",
                *layout,
            ]
            train(nproc=nproc, overrides=overrides)
            done[name] = run_dir
        return done[name]

    return get


def train_command(*, nproc: int, port: int = 0, overrides: list[str]) -> list[str]:
    """`port` is ignored (kept for callers): --standalone lets the rendezvous bind a free port itself, so
    runs never collide with another test, another suite on the machine or a leftover process."""
    if nproc == 1:
        return [sys.executable, "-m", "keye_train.cli.train", *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "keye_train.cli.train",
        *overrides,
    ]


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*, nproc: int = 1, port: int = 29700, overrides: list[str], timeout: int = 600) -> str:
    result = subprocess.run(
        train_command(nproc=nproc, port=port, overrides=overrides + COMMON),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=run_env(),
    )
    if result.returncode != 0:
        raise AssertionError(
            f"keye-train failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result.stdout


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step records; a resumed run appends, and the last record of a step wins."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records
