"""keye-merge: weighted average of checkpoints annealed on different mixtures (YAML recipe or flags)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from keye_train.checkpoint.merge import OUT_FORMATS, MergeConfig, merge_from_config
from keye_train.cli.failure import run_command


def _input(text: str) -> dict[str, Any]:
    """'PATH:WEIGHT' or 'PATH' (weight 1); the weight is whatever follows the last colon, if a number."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": text, "weight": 1.0}


def _read_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"merge config {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"merge config {file} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"merge config {file} must be a mapping with inputs, out, format, dtype")
    unknown = sorted(set(data) - {"inputs", "out", "format", "dtype"})
    if unknown:
        raise ValueError(
            f"merge config {file} has unknown keys {unknown}; allowed: inputs, out, format, dtype"
        )
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keye-merge", description=__doc__)
    parser.add_argument("--config", help="YAML with inputs [{path, weight}], out, format, dtype")
    parser.add_argument(
        "--input",
        action="append",
        type=_input,
        help="PATH[:WEIGHT], repeatable; replaces the config's inputs (DCP step/final/stage dir or HF dir)",
    )
    parser.add_argument("--out", help="output dir; must not exist yet")
    parser.add_argument("--format", choices=OUT_FORMATS, help="output format (default hf)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default bf16)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 on a bad config or checkpoint or a failed write, 128 + N when
    stopped by signal N."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _merge(args), prog="keye-merge", target="--out")


def _merge(args: argparse.Namespace) -> int:
    data = _read_config(args.config) if args.config else {}
    for key in ("out", "format", "dtype"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.input:
        data["inputs"] = args.input
    try:
        cfg = MergeConfig(**data)
    except TypeError as err:  # an input item with a key other than path/weight
        raise ValueError(f"merge config: {err}") from None
    merge_from_config(cfg, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
