"""Per-step training metrics to metrics.jsonl, the console, and optionally wandb / TensorBoard (rank 0)."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")
_EMPTY_HASH = hashlib.sha256(b"").hexdigest()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class WandbConfig:
    """Weights & Biases, off unless asked for (issue 13: its warning appeared on every run). online needs
    mode=online AND WANDB_API_KEY; offline writes wandb files into the run dir."""

    mode: str = "disabled"
    project: str = "keye_train"
    run_name: str | None = None  # default: the run directory's name

    def __post_init__(self) -> None:
        _require(self.mode in WANDB_MODES, f"logging.wandb.mode={self.mode!r} must be one of {WANDB_MODES}")
        _require(bool(self.project), "logging.wandb.project must not be empty")


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between console summary lines (metrics.jsonl gets every step)
    progress_bar: bool = True  # tqdm bar on rank 0
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)
        _require(self.log_interval >= 1, f"logging.log_interval={self.log_interval} must be >= 1")


def keys_hash(keys: Sequence[str]) -> str:
    """sha256 over sample keys in order; each key is length-prefixed so ["ab", "c"] != ["a", "bc"]."""
    digest = hashlib.sha256()
    for key in keys:
        raw = key.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()


def chain_hash(previous: str, step_hash: str) -> str:
    """The running hash after a step: sha256(previous running hash || this step's hash), both hex."""
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(step_hash)).hexdigest()


def imbalance(values: Sequence[float] | None) -> float | None:
    """max / mean over ranks (1.0 is perfect balance); None without values or with a zero mean."""
    if not values:
        return None
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else None


class MetricsLogger:
    """Records one step at a time. Every rank keeps the running sample-key hash and totals (so its
    state_dict is the same everywhere and DCP can save it from any rank); only rank 0 writes
    metrics.jsonl, prints, and talks to wandb/TensorBoard.

    Per-step values come from the caller, already reduced across ranks where that matters: `tokens` and
    `samples` of the global batch, `flops_per_step` of the whole job and `peak_flops` summed over all
    devices (so MFU = flops / (time * peak)), and per-rank lists for imbalance.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        *,
        run_dir: str | Path,
        rank: int = 0,
        total_steps: int | None = None,
        run_config: dict[str, Any] | None = None,
        first_record: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        # Run facts (e.g. precision) written into the first record this process logs (also after a resume).
        self._first_record = dict(first_record or {})
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.total_steps = total_steps
        self.running_hash = _EMPTY_HASH
        self.tokens_total = 0
        self.samples_total = 0
        self.last_step = -1
        self._file = None
        self._bar = None
        self._wandb_run = None
        self._tb_writer = None
        self._redirect = None  # tqdm's logging redirect while the bar is shown
        self._run_config = run_config
        self._started = False

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        """Opens outputs on first use, after load_state_dict, so a resumed bar starts at its step."""
        self._started = True
        if not self.is_writer:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file; readers keep the last record of a step.
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.cfg.progress_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=self.last_step + 1, desc="train", dynamic_ncols=True
            )
            # Log records (skipped samples, I/O servers) go above the bar too, never through it.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
        if self.cfg.wandb.mode != "disabled":
            self._wandb_run = self._init_wandb()
        if self.cfg.tensorboard:
            self._tb_writer = self._init_tensorboard()

    def _init_wandb(self) -> Any:
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            log.warning(
                "logging.wandb.mode=%s but wandb is not installed; not logging to wandb. Install it with "
                "`pip install wandb`, or set logging.wandb.mode=disabled to silence this warning.",
                self.cfg.wandb.mode,
            )
            return None
        mode = self.cfg.wandb.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning("logging.wandb.mode=online but WANDB_API_KEY is not set; logging to wandb offline")
            mode = "offline"
        name = self.cfg.wandb.run_name or self.run_dir.name
        # A stable id from the run directory: a resumed run appends to the same wandb run.
        run_id = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
        return wandb.init(
            project=self.cfg.wandb.project,
            name=name,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(self.run_dir),
            config=self._run_config,
        )

    def _init_tensorboard(self) -> Any:
        try:
            module = importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            log.warning(
                "logging.tensorboard=true but the tensorboard package is not installed; not writing "
                "TensorBoard events. Install it with `pip install tensorboard`, or set "
                "logging.tensorboard=false."
            )
            return None
        return module.SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def close(self) -> None:
        if getattr(self, "_redirect", None) is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        for closer in (self._file, self._bar, self._tb_writer):
            if closer is not None:
                closer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._file = self._bar = self._tb_writer = self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "running_hash": self.running_hash,
            "tokens_total": self.tokens_total,
            "samples_total": self.samples_total,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_hash = str(state["running_hash"])
        self.tokens_total = int(state["tokens_total"])
        self.samples_total = int(state["samples_total"])
        self.last_step = int(state["last_step"])

    # -- per step ----------------------------------------------------------------------------------
    def log_step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens: int,
        samples: int,
        step_time_s: float,
        sample_keys: Sequence[str] = (),
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        skipped_samples: int = 0,
        rank_step_times_s: Sequence[float] | None = None,
        rank_tokens: Sequence[float] | None = None,
        extra: dict[str, float] | None = None,
        per_rank: dict[str, Sequence[float]] | None = None,
    ) -> dict[str, Any]:
        """Record optimizer step `step` (0-based); returns the record (on every rank).

        `sample_keys` are the keys of every sample of the global batch in a layout-independent order
        (e.g. sorted by global index), so runs under different parallel layouts hash the same.
        """
        if not self._started:
            self._start()
        step_hash = keys_hash(sample_keys)
        self.running_hash = chain_hash(self.running_hash, step_hash)
        self.tokens_total += int(tokens)
        self.samples_total += int(samples)
        self.last_step = step
        record: dict[str, Any] = {
            "step": step,
            "loss": _num(loss),
            "lr": _num(lr),
            "grad_norm": _num(grad_norm),
            "tokens": int(tokens),
            "samples": int(samples),
            "tokens_total": self.tokens_total,
            "samples_total": self.samples_total,
            "step_time_s": _num(step_time_s),
            "tokens_per_s": _num(tokens / step_time_s) if step_time_s > 0 else None,
            "mfu": _mfu(flops_per_step, peak_flops, step_time_s),
            "skipped_samples": int(skipped_samples),
            "step_time_imbalance": imbalance(rank_step_times_s),
            "tokens_imbalance": imbalance(rank_tokens),
            "num_keys": len(sample_keys),
            "step_hash": step_hash,
            "running_hash": self.running_hash,
        }
        for key, value in (extra or {}).items():
            record[key] = _num(value)
        for key, values in (per_rank or {}).items():  # one value per rank, in world rank order
            record[key] = [_num(v) for v in values]
        record.update(self._first_record)
        self._first_record = {}
        if self.is_writer:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        # allow_nan=False would raise on a diverged loss; non-finite values are already None (JSON null).
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {
            k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "num_keys")
        }
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=record["step"])
        if self._tb_writer is not None:
            for key, value in numeric.items():
                self._tb_writer.add_scalar(f"train/{key}", value, record["step"])
        if self._bar is not None:
            self._bar.update(record["step"] + 1 - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']}", refresh=False)
        if (record["step"] + 1) % self.cfg.log_interval == 0:
            self._print(summary_line(record))

    def print_line(self, line: str) -> None:
        """A console line from the trainer (rank 0): above the progress bar, never through it."""
        if self.is_writer:
            self._print(line)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)  # keeps the bar intact below the line
        else:
            print(line, flush=True)


def _num(value: float | None) -> float | None:
    """A JSON-safe float: nan/inf become None (a diverged step is then visible as null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mfu(flops: float | None, peak: float | None, seconds: float) -> float | None:
    if flops is None or peak is None or peak <= 0 or seconds <= 0:
        return None
    return flops / (seconds * peak)


def summary_line(record: dict[str, Any]) -> str:
    """One console line for a step record."""

    def fmt(key: str, spec: str) -> str:
        value = record.get(key)
        return "n/a" if value is None else format(value, spec)

    return (
        f"step {record['step']} loss {fmt('loss', '.4f')} lr {fmt('lr', '.3e')} "
        f"grad_norm {fmt('grad_norm', '.3f')} tok/s {fmt('tokens_per_s', ',.0f')} mfu {fmt('mfu', '.3f')} "
        f"step {fmt('step_time_s', '.2f')}s skipped {record['skipped_samples']} "
        f"imbalance {fmt('step_time_imbalance', '.2f')} hash {record['running_hash'][:12]}"
    )
