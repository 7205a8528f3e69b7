"""Activation checkpointing (full or every k-th block) and per-block torch.compile for ViT and decoder layers.

Both are applied to each block in place, without wrapper modules, so parameter and state-dict names stay
the Hugging Face names (a `checkpoint_wrapper` would insert `_checkpoint_wrapped_module.` into
`named_parameters()`, which the optimizer state, DCP and the parity tests key on).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full", "selective")


@dataclass
class ActivationCheckpointConfig:
    """`parallel.ac`. mode: none | full (every block) | selective (every `every`-th block, counted per
    tower)."""

    mode: str = "none"
    every: int = 2

    def __post_init__(self) -> None:
        if self.mode not in AC_MODES:
            raise ValueError(f"parallel.ac.mode={self.mode!r} must be one of {AC_MODES}")
        if self.every < 1:
            raise ValueError(f"parallel.ac.every={self.every} must be >= 1")


TOWERS = ("vision", "language")


def transformer_blocks(model: nn.Module, *, towers: Sequence[str] = TOWERS) -> dict[str, list[nn.Module]]:
    """The repeated blocks per tower (ViT encoder layers, decoder layers); absent towers are skipped."""
    found = _all_blocks(model)
    return {name: found[name] for name in towers if name in found}


def _all_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    towers: dict[str, list[nn.Module]] = {}
    visual = getattr(model, "visual", None)
    if visual is not None:
        towers["vision"] = list(visual.vision_model.encoder.layers)
    language = getattr(model, "model", None)
    if language is not None and getattr(language, "layers", None) is not None:
        towers["language"] = list(language.layers.values())
    return towers


def _checkpoint_block(block: nn.Module) -> None:
    # Non-reentrant checkpointing: supports keyword arguments (rope, cu_seqlens) and inputs that do not
    # require grad (frozen towers), and composes with FSDP2's hooks, which stay on the module's __call__.
    block._keye_inner_forward = block.forward
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    block._keye_checkpointed = True


def apply_activation_checkpointing(
    model: nn.Module, *, mode: str, every: int = 2, towers: Sequence[str] = TOWERS
) -> list[str]:
    """Recompute blocks' activations in backward; returns the names of the checkpointed blocks.

    full: every ViT and decoder layer keeps only its input. selective: layers 0, k, 2k, ... of each
    tower (a middle ground when memory allows keeping part of the activations); on a pipeline stage the
    count starts at the stage's first layer.
    """
    cfg = ActivationCheckpointConfig(mode=mode, every=every)
    if cfg.mode == "none":
        return []
    step = 1 if cfg.mode == "full" else cfg.every
    done = []
    for tower, blocks in transformer_blocks(model, towers=towers).items():
        for i, block in enumerate(blocks):
            if i % step == 0 and not getattr(block, "_keye_checkpointed", False):
                _checkpoint_block(block)
                done.append(f"{tower}.{i}")
    return done


def apply_compile(model: nn.Module, *, towers: Sequence[str] = TOWERS, backend: str = "inductor") -> int:
    """torch.compile each block in place (`nn.Module.compile`), keeping names; returns the block count.

    Per block rather than whole-model: the blocks are identical so one graph is reused, and FSDP's
    per-block hooks stay outside the compiled region. A checkpointed block gets its inner forward
    compiled inside the checkpoint: dynamo silently skips a module whose forward is a checkpoint partial.
    """
    count = 0
    for blocks in transformer_blocks(model, towers=towers).values():
        for block in blocks:
            if getattr(block, "_keye_checkpointed", False):
                # Static shapes: with automatic dynamic shapes the recomputation can pick another graph
                # than the forward did and save differently shaped tensors (pytorch/pytorch#166926).
                inner = torch.compile(block._keye_inner_forward, dynamic=False, backend=backend)
                block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
            else:
                block.compile(backend=backend)
            count += 1
    return count
