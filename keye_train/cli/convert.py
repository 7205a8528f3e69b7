"""keye-convert: build Keye-VL-1.5 HF checkpoints from SigLIP + Qwen3, inspect them, export/import DCP."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keye_train.checkpoint.export import export_to_hf, import_from_hf
from keye_train.checkpoint.hf_convert import init_from_siglip_qwen3
from keye_train.checkpoint.hf_inspect import inspect_checkpoint
from keye_train.checkpoint.safetensors_io import parse_size
from keye_train.cli.failure import run_command
from keye_train.models.configs import PRESETS, preset

_TOKEN_FIELDS = {
    "image": "image_token_id",
    "video": "video_token_id",
    "vision_start": "vision_start_token_id",
    "vision_end": "vision_end_token_id",
    "pad": "pad_token_id",
}


def _parse_token_ids(text: str) -> dict[str, int]:
    ids = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in _TOKEN_FIELDS or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"--token-ids item {item!r} is not NAME=ID with NAME one of {sorted(_TOKEN_FIELDS)}"
            )
        ids[_TOKEN_FIELDS[name.strip()]] = int(value)
    return ids


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _run_init(args: argparse.Namespace) -> int:
    summary = init_from_siglip_qwen3(
        siglip_dir=args.siglip,
        qwen3_dir=args.qwen3,
        out_dir=args.out,
        dtype=args.dtype,
        seed=args.seed,
        max_shard_bytes=args.max_shard_size,
        token_ids=args.token_ids,
        preset_cfg=preset(args.preset) if args.preset else None,
    )
    cfg = summary.cfg
    print(f"wrote Keye-VL-1.5 checkpoint to {args.out} ({args.dtype})")
    print(
        f"  vision {cfg.vision.hidden_size}x{cfg.vision.num_layers} layers -> projector "
        f"{cfg.projector.merged_size}->{cfg.projector.merged_size}->{cfg.projector.text_hidden_size} -> "
        f"Qwen3 {cfg.language.hidden_size}x{cfg.language.num_layers} layers"
    )
    print(
        f"  copied {summary.copied} tensors; text tower: {summary.text_tower_tensors} tensors in siglip_text/"
    )
    for item in summary.created:
        print(f"  created {item}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.dir)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _add_init(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("init", help="SigLIP + Qwen3 HF dirs -> a Keye-VL-1.5 HF dir (stage-0 start)")
    sub.add_argument("--siglip", required=True, help="HF SiglipModel dir (vision + text towers)")
    sub.add_argument("--qwen3", required=True, help="HF Qwen3ForCausalLM dir")
    sub.add_argument("--out", required=True, help="output dir; must not exist yet")
    sub.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    sub.add_argument("--seed", type=int, default=0, help="seed of the projector initialisation")
    sub.add_argument("--max-shard-size", type=_size, default=parse_size("5GB"), help="e.g. 5GB, 500MB")
    sub.add_argument(
        "--token-ids",
        type=_parse_token_ids,
        default=None,
        help="override vision token ids, e.g. image=151655,video=151656,vision_start=151652,"
        "vision_end=151653,pad=151643 (default: the Qwen3 dir's tokenizer_config.json, else the Qwen ids)",
    )
    sub.add_argument(
        "--preset", choices=sorted(PRESETS), help="require the sources to have this preset's sizes"
    )
    sub.set_defaults(func=_run_init)


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("inspect", help="kind, parameters, dtypes and layout check of a HF dir")
    sub.add_argument("dir", help="a Keye-VL, Qwen3 or SigLIP Hugging Face dir")
    sub.set_defaults(func=_run_inspect)


def _run_export(args: argparse.Namespace) -> int:
    export_to_hf(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        tokenizer_dir=args.tokenizer,
        max_shard_bytes=args.max_shard_size,
    )
    return 0


def _run_import(args: argparse.Namespace) -> int:
    import_from_hf(args.hf, args.out)
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser(
        "export", help="keye_train DCP checkpoint -> Keye-VL-1.5 HF dir (transformers remote code, vLLM)"
    )
    sub.add_argument("--ckpt", required=True, help="step-N or final dir, or a stage dir (final, else newest)")
    sub.add_argument("--out", required=True, help="output HF dir; must not exist yet")
    sub.add_argument(
        "--tokenizer",
        help="the run's tokenizer dir (default: the run's data.tokenizer); written with the Keye-1.5 tokens "
        "it lacks and our chat template",
    )
    sub.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    sub.add_argument("--max-shard-size", type=_size, default=parse_size("5GB"), help="e.g. 5GB, 500MB")
    sub.set_defaults(func=_run_export)


def _add_import(subparsers: argparse._SubParsersAction) -> None:
    sub = subparsers.add_parser("import", help="Keye-VL-1.5 HF dir -> DCP checkpoint (init_from / resume)")
    sub.add_argument("--hf", required=True, help="a Keye-VL-1.5 Hugging Face dir")
    sub.add_argument("--out", required=True, help="output DCP checkpoint dir; must not exist yet")
    sub.set_defaults(func=_run_import)


def build_parser() -> argparse.ArgumentParser:
    """The keye-convert parser; each subcommand registers itself through an _add_* function."""
    parser = argparse.ArgumentParser(prog="keye-convert", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_init, _add_inspect, _add_export, _add_import):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 checkpoint problems or a failed write, 2 usage errors,
    128 + N when stopped by signal N)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), prog=f"keye-convert {args.command}", target="--out")


if __name__ == "__main__":
    sys.exit(main())
