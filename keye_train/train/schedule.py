"""Learning-rate schedules (warmup + cosine, warmup-stable-decay, constant) as a checkpointable LambdaLR."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)

KINDS = ("cosine", "wsd", "constant")
WSD_DECAY_SHAPES = ("linear", "cosine", "sqrt")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ScheduleConfig:
    """Multiplier of every param group's peak lr, as a function of the optimizer step (0-based).

    warmup: linear from 1/warmup_steps to 1 over the first warmup_steps steps (never a zero-lr step).
    cosine: then cosine from 1 at step warmup_steps to min_lr_ratio at step total_steps - 1.
    wsd: then constant 1 until the last round(wsd_decay_fraction * total_steps) steps, which decay to
         min_lr_ratio (linear, cosine or 1 - sqrt shape) ending at step total_steps - 1.
    constant: 1 after warmup.
    Steps past total_steps keep the final value, so a run extended by a few steps does not jump.
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.1
    wsd_decay_shape: str = "linear"

    def __post_init__(self) -> None:
        _require(self.kind in KINDS, f"schedule.kind={self.kind!r} must be one of {KINDS}")
        _require(
            isinstance(self.total_steps, int) and self.total_steps >= 1,
            f"schedule.total_steps={self.total_steps!r} must be an integer >= 1",
        )
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"schedule.warmup_steps={self.warmup_steps!r} must be an integer >= 0",
        )
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
        )
        _require(
            0.0 < self.wsd_decay_fraction <= 1.0,
            f"schedule.wsd_decay_fraction={self.wsd_decay_fraction} must be in (0, 1]",
        )
        _require(
            self.wsd_decay_shape in WSD_DECAY_SHAPES,
            f"schedule.wsd_decay_shape={self.wsd_decay_shape!r} must be one of {WSD_DECAY_SHAPES}",
        )
        self._clamp_warmup()
        if self.kind == "wsd":
            _require(
                self.decay_steps <= self.total_steps - self.warmup_steps,
                f"schedule.wsd_decay_fraction={self.wsd_decay_fraction} gives {self.decay_steps} decay "
                f"steps, more than the {self.total_steps - self.warmup_steps} steps left after "
                f"warmup_steps={self.warmup_steps}",
            )

    def _clamp_warmup(self) -> None:
        """A short run (steps=6 under a recipe's warmup of 100) warms up over its whole length instead of
        failing; WSD keeps its decay tail after the warmup."""
        tail = self.decay_steps if self.kind == "wsd" else 0
        limit = max(0, self.total_steps - tail)
        if self.warmup_steps > limit:
            log.info(
                "schedule.warmup_steps=%d is longer than the run (total_steps=%d%s): clamped to %d",
                self.warmup_steps,
                self.total_steps,
                f", {tail} WSD decay steps" if tail else "",
                limit,
            )
            self.warmup_steps = limit

    @property
    def decay_steps(self) -> int:
        """Length of the final decay phase: all post-warmup steps for cosine, the tail for WSD."""
        if self.kind == "cosine":
            return self.total_steps - self.warmup_steps
        if self.kind == "wsd":
            return max(1, round(self.wsd_decay_fraction * self.total_steps))
        return 0


def _decay_shape(progress: float, shape: str) -> float:
    """1 at progress 0 down to 0 at progress 1."""
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """The multiplier at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    decay_start = cfg.total_steps - cfg.decay_steps
    if step < decay_start:
        return 1.0
    # The decay's first step is at full lr and its last (total_steps - 1) at min_lr_ratio exactly.
    span = cfg.decay_steps - 1
    progress = 1.0 if span <= 0 else min(1.0, (step - decay_start) / span)
    shape = "cosine" if cfg.kind == "cosine" else cfg.wsd_decay_shape
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * _decay_shape(progress, shape)


def _factor_fn(cfg: ScheduleConfig) -> Callable[[int], float]:
    # A closure, not a callable object: LambdaLR.state_dict() then stores only the step counters, so a
    # resumed run keeps the schedule of its (validated) config rather than one pickled in the checkpoint.
    def factor(step: int) -> float:
        return lr_factor(step, cfg)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> LambdaLR:
    """LambdaLR over every param group (each keeps its own peak lr). Call scheduler.step() once after
    each optimizer.step(). Its state_dict()/load_state_dict() make it a DCP Stateful; on resume build it
    first, then load the optimizer and scheduler state."""
    return LambdaLR(optimizer, lr_lambda=_factor_fn(cfg))
