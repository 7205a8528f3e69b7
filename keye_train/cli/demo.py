"""`keye-demo`: the whole curriculum on this CPU with the tiny model, 2 processes, synthetic data.

stage 0 (SigLIP loss, DP2) -> stage 1 (projector only, DP2 ZeRO-3) -> stage 2 (all, DP2 ZeRO-2) -> two
stage-3 anneals with the RoPE base reset to 8e6 on different data mixtures (CP2 Ulysses, TP2) -> merge
-> export to Hugging Face, then a summary table. Each stage starts from the previous one's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from keye_train.data.synth.shards import SynthConfig, synth_dataset

# The tiny model learns quickly with larger rates than the 8B recipes use.
LR = "optim.lr={vit: 2.0e-3, projector: 5.0e-3, llm: 3.0e-3, text_tower: 2.0e-3}"
MIX_B = "data.shares={video: 0.4, caption: 0.15, conversation: 0.15, interleaved: 0.1, text: 0.2}"
STAGES = [
    # name, recipe, layout description, layout overrides, extra overrides
    ("stage0", "stage0_vit", "DP2 (ViT + text tower)", ["parallel=dp_zero2"], ["stage.max_seq_len=3000"]),
    (
        "stage1",
        "stage1_align",
        "DP2 ZeRO-3, ViT+LLM frozen",
        ["parallel=dp_zero2", "parallel.fsdp.zero_stage=3"],
        [],
    ),
    ("stage2", "stage2_multitask", "DP2 ZeRO-2", ["parallel=dp_zero2"], []),
    ("stage3_a", "stage3_anneal_128k", "CP2 Ulysses ZeRO-1, rope 8e6", ["parallel.pp=1"], []),
    ("stage3_b", "stage3_anneal_128k", "TP2 + SP, rope 8e6, mixture B", ["parallel=tp2"], [MIX_B]),
]
PREVIOUS = {"stage1": "stage0", "stage2": "stage1", "stage3_a": "stage2", "stage3_b": "stage2"}


def run(command: list[str], *, log_file: Path) -> None:
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_file, "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"demo step failed (exit {result.returncode}); last lines of {log_file}:\n{tail}")


def train_stage(
    name: str, recipe: str, overrides: list[str], *, out: Path, nproc: int, port: int | None
) -> None:
    # Without --port, --standalone lets the rendezvous bind a free port itself: the demo never collides
    # with another job on the machine (or a second demo, or the test suite running it).
    rendezvous = ["--standalone"] if port is None else [f"--master_port={port}"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc_per_node={nproc}",
        "-m",
        "keye_train.cli.train",
        f"recipe={recipe}",
        f"run_dir={out / name}",
        *overrides,
    ]
    run(command, log_file=out / f"{name}.log")


def stage_summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["step_time_s"] for r in records)
    return {
        "steps": len(records),
        "loss_first": records[0]["loss"],
        "loss_last": records[-1]["loss"],
        "tokens_per_s": sum(r["tokens"] for r in records) / seconds if seconds else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="demo_out", help="output folder (data, runs, merged and exported model)"
    )
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per stage")
    parser.add_argument("--samples", type=int, default=80, help="synthetic samples to generate")
    parser.add_argument(
        "--seq", type=int, default=1024, help="packed sequence length (stage 3 would be 128K)"
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--port", type=int, default=None, help="first master port (one per stage); default: a free port"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it or pass --out to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = synth_dataset(SynthConfig(out=out / "data", samples=args.samples, seed=0), progress=print)
    common = [
        f"data.manifest={data['manifest']}",
        f"steps={args.steps}",
        f"stage.max_seq_len={args.seq}",
        "schedule.warmup_steps=2",
        "checkpoint.interval_steps=8",
        "precision=fp32",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        "logging.log_interval=4",
        LR,
    ]
    layouts = {}
    for index, (name, recipe, layout, layout_args, extra) in enumerate(STAGES):
        init = [f"stage.init_from={out / PREVIOUS[name]}"] if name in PREVIOUS else []
        print(f"\n== {name}: {recipe} on {layout}", flush=True)
        train_stage(
            name,
            recipe,
            common + layout_args + init + extra,
            out=out,
            nproc=args.nproc,
            port=None if args.port is None else args.port + index,
        )
        layouts[name] = layout

    print("\n== merge the two stage-3 anneals (equal weights) and export to Hugging Face", flush=True)
    # The merged checkpoint stays fp32 (it can seed further training); the export is bf16 as released.
    merge_args = ["--input", f"{out / 'stage3_a'}:1", "--input", f"{out / 'stage3_b'}:1"]
    merge_args += ["--out", str(out / "merged"), "--format", "dcp", "--dtype", "fp32"]
    run([sys.executable, "-m", "keye_train.cli.merge", *merge_args], log_file=out / "merge.log")
    export_args = ["export", "--ckpt", str(out / "merged"), "--out", str(out / "hf")]
    export_args += ["--tokenizer", data["tokenizer"], "--dtype", "bf16"]
    run([sys.executable, "-m", "keye_train.cli.convert", *export_args], log_file=out / "export.log")

    rows = {name: stage_summary(out / name) for name in layouts}
    (out / "summary.json").write_text(json.dumps({"stages": rows, "layouts": layouts}, indent=2) + "\n")
    print(f"\n{'stage':<10} {'layout':<32} {'steps':>5} {'loss first -> last':>20} {'tokens/s':>9}")
    for name, row in rows.items():
        loss = f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}"
        print(f"{name:<10} {layouts[name]:<32} {row['steps']:>5} {loss:>20} {row['tokens_per_s']:>9.0f}")
    print("(stage 0 counts ViT patches, the others LLM tokens)")
    print(f"\nmerged model: {out / 'merged'}\nHugging Face export: {out / 'hf'}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s; logs in {out}/*.log")


if __name__ == "__main__":
    main()
