"""Weighted averaging of N checkpoints of one architecture (DCP or Hugging Face, mixed), streamed."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from keye_train.checkpoint.dcp import (
    keye_config_to_dict,
    make_meta,
    model_tensor_specs,
    read_model_tensors,
    resolve_checkpoint,
    saved_keye_config,
    write_model_checkpoint,
)
from keye_train.checkpoint.hf import expected_keye_layout, load_keye_config, save_keye_hf
from keye_train.checkpoint.safetensors_io import parse_dtype, read_layout
from keye_train.models.configs import KeyeConfig

OUT_FORMATS = ("hf", "dcp")
# Config fields that may differ between merged models: runtime choices that do not change the weights'
# meaning (attention kernels), and the stage-0 text tower, which is not part of a Keye-VL-1.5 model.
# Everything else must match; rope_theta in particular: weights annealed under different RoPE bases
# do not average into a working model.
IGNORED_CONFIG_FIELDS = ("vision.attn_backend", "language.attn_backend", "text_tower.")


@dataclass
class MergeInput:
    path: str
    weight: float = 1.0


@dataclass
class MergeConfig:
    """recipes/merge.yaml: inputs (list of {path, weight}), out, format hf|dcp, dtype."""

    inputs: list[MergeInput] = field(default_factory=list)
    out: str = ""
    format: str = "hf"
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        self.inputs = [MergeInput(**i) if isinstance(i, dict) else i for i in self.inputs]
        if not self.inputs:
            raise ValueError("merge.inputs is empty; list the checkpoints to merge as {path, weight} items")
        for number, item in enumerate(self.inputs):
            if not str(item.path).strip():
                raise ValueError(f"merge.inputs[{number}].path={item.path!r} is empty")
        if not str(self.out).strip():
            raise ValueError(f"merge.out={self.out!r} must name the output directory")
        if self.format not in OUT_FORMATS:
            raise ValueError(f"merge.format={self.format!r} must be one of {OUT_FORMATS}")
        parse_dtype(self.dtype)


def normalise_weights(weights: Sequence[float], *, log: Callable[[str], None] = print) -> list[float]:
    """Weights must be finite and >= 0 with a positive sum; they are scaled to sum to 1 (with a note)."""
    values = [float(w) for w in weights]
    for number, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"merge weight #{number} = {value} is not a finite number")
        if value < 0:
            raise ValueError(f"merge weight #{number} = {value} is negative; weights must be positive")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"merge weights {values} sum to 0; give at least one positive weight")
    for number, value in enumerate(values):
        if value == 0:
            log(f"merge: input #{number} has weight 0 and contributes nothing")
    if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-12):
        values = [v / total for v in values]
        log(f"merge: weights sum to {total:g}, normalised to {[round(v, 6) for v in values]}")
    return values


class _Source:
    """One merge input: its KeyeConfig, tensor shapes, and reading of selected tensors."""

    def __init__(self, path: str | Path, *, log: Callable[[str], None]) -> None:
        path = Path(path)
        if (path / "config.json").is_file() and not (path / ".metadata").exists():
            self.kind, self.path = "hf", path
            self.cfg: KeyeConfig = load_keye_config(path)
            self._layout = read_layout(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._layout.items()}
        else:
            self.kind, self.path = "dcp", resolve_checkpoint(path, log=log)
            self.cfg = saved_keye_config(self.path)
            self.shapes = {k: tuple(v.size) for k, v in model_tensor_specs(self.path).items()}

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.kind == "dcp":
            return read_model_tensors(self.path, keys)
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._layout[key].file, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    out[name] = handle.get_tensor(name)
        return out


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): list(data) if isinstance(data, tuple) else data}


def check_mergeable(sources: Sequence[_Source]) -> None:
    """ValueError naming both paths unless every source has the first one's config, keys and shapes."""
    first = sources[0]
    reference = _flat(keye_config_to_dict(first.cfg))
    for other in sources[1:]:
        config = _flat(keye_config_to_dict(other.cfg))
        differing = [
            f"{k}: {reference.get(k)!r} vs {config.get(k)!r}"
            for k in sorted(set(reference) | set(config))
            if not k.startswith(IGNORED_CONFIG_FIELDS) and reference.get(k) != config.get(k)
        ]
        if differing:
            raise ValueError(
                f"cannot merge {first.path} with {other.path}: their configs differ in "
                f"{'; '.join(differing[:5])} (only {list(IGNORED_CONFIG_FIELDS)} may differ)"
            )
        only_first = sorted(set(first.shapes) - set(other.shapes))
        only_other = sorted(set(other.shapes) - set(first.shapes))
        if only_first or only_other:
            raise ValueError(
                f"cannot merge {first.path} with {other.path}: different tensors (only in the first: "
                f"{only_first[:3]}, only in the second: {only_other[:3]})"
            )
        shapes = [
            f"{k} {list(first.shapes[k])} vs {list(other.shapes[k])}"
            for k in first.shapes
            if first.shapes[k] != other.shapes[k]
        ]
        if shapes:
            raise ValueError(f"cannot merge {first.path} with {other.path}: shapes differ: {shapes[:3]}")


def _merged_tensors(
    sources: Sequence[_Source],
    weights: Sequence[float],
    keys: Sequence[str],
    *,
    group_bytes: int,
    log: Callable[[str], None],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, weighted average) in groups of about `group_bytes` of float64 accumulators; float64 keeps a
    checkpoint merged with itself bit-identical to it."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = 8 * math.prod(sources[0].shapes[key])
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    done = 0
    for group in groups:
        total: dict[str, torch.Tensor] = {}
        for source, weight in zip(sources, weights):
            for key, tensor in source.read(group).items():
                if not tensor.is_floating_point():
                    # Integer buffers are not averaged; they must agree.
                    if key in total and not torch.equal(total[key], tensor):
                        raise ValueError(
                            f"integer tensor {key!r} differs between inputs; it cannot be merged"
                        )
                    total[key] = tensor
                    continue
                contribution = tensor.to(torch.float64) * weight
                total[key] = contribution if key not in total else total[key].add_(contribution)
        done += len(group)
        log(f"merge: {done}/{len(keys)} tensors")
        yield from ((key, total[key]) for key in group)


def merge_checkpoints(
    inputs: Sequence[tuple[str | Path, float]],
    out: str | Path,
    *,
    out_format: str = "hf",
    dtype: str | torch.dtype = "bf16",
    group_bytes: int = 1 << 29,
    max_shard_bytes: int = 5 * 10**9,
    log: Callable[[str], None] = print,
) -> Path:
    """Weighted average of checkpoints (DCP step/final/stage dirs or HF dirs) written as HF or DCP.

    Every input must have the same KeyeConfig (see IGNORED_CONFIG_FIELDS), tensor names and shapes.
    Weights are validated and normalised to sum 1. The output appears only when complete.
    """
    if out_format not in OUT_FORMATS:
        raise ValueError(f"out_format={out_format!r} must be one of {OUT_FORMATS}")
    if not inputs:
        raise ValueError("nothing to merge: no inputs given")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"output directory {out} already exists; remove it or choose another path")
    torch_dtype = parse_dtype(dtype)
    weights = normalise_weights([w for _, w in inputs], log=log)
    sources = [_Source(path, log=log) for path, _ in inputs]
    check_mergeable(sources)
    cfg = sources[0].cfg
    keys = list(sources[0].shapes)
    if out_format == "hf":
        expected = expected_keye_layout(cfg)
        extra = [k for k in keys if k not in expected]
        if extra:
            log(f"merge: leaving out {len(extra)} tensors outside the Keye-VL-1.5 layout, e.g. {extra[:3]}")
        keys = [k for k in keys if k in expected]
    for (path, _), weight, source in zip(inputs, weights, sources):
        log(f"merge: {weight:.6f} x {path} ({source.kind})")
    merged = _merged_tensors(sources, weights, keys, group_bytes=group_bytes, log=log)
    if out_format == "hf":
        save_keye_hf(
            merged, cfg=cfg, out_dir=out, dtype=torch_dtype, max_shard_bytes=max_shard_bytes, log=log
        )
    else:
        # DCP writes one checkpoint from one state dict: the merged model is held once, in `dtype`.
        state = {k: t.to(torch_dtype) if t.is_floating_point() else t for k, t in merged}
        meta = make_meta(step=None, keye_cfg=cfg)
        meta["merged_from"] = [{"path": str(p), "weight": w} for (p, _), w in zip(inputs, weights)]
        write_model_checkpoint(state, out, meta=meta, log=log)
    log(f"merge: wrote {out} ({out_format}, {torch_dtype})")
    return out


def merge_from_config(cfg: MergeConfig, *, log: Callable[[str], None] = print) -> Path:
    """merge_checkpoints driven by a validated MergeConfig (what keye-merge runs)."""
    return merge_checkpoints(
        [(item.path, item.weight) for item in cfg.inputs],
        cfg.out,
        out_format=cfg.format,
        dtype=cfg.dtype,
        log=log,
    )


__all__ = [
    "IGNORED_CONFIG_FIELDS",
    "MergeConfig",
    "MergeInput",
    "check_mergeable",
    "merge_checkpoints",
    "merge_from_config",
    "normalise_weights",
]
