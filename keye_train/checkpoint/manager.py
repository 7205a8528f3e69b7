"""CheckpointManager: periodic (async) DCP saves, keep-last-k, resume from the newest complete checkpoint."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from keye_train.checkpoint.dcp import (
    FINAL_DIR,
    MARKER_FILE,
    META_KEY,
    MODEL_KEY,
    OPTIM_KEY,
    ModelStateful,
    OptimizerStateful,
    as_list,
    checkpoint_problem,
    find_latest_complete,
    make_meta,
    pack,
    quiet_dcp,
    read_dcp_metadata,
    resolve_checkpoint,
    step_dirs,
    write_marker,
)
from keye_train.checkpoint.identity import read_run_id
from keye_train.checkpoint.kill_points import kill_point
from keye_train.checkpoint.model_weights import check_model_keys
from keye_train.checkpoint.ranks import _barrier, _on_rank0, _rank, _world_size
from keye_train.checkpoint.stateful import BLOB, BlobStateful
from keye_train.checkpoint.verify import root_os_error
from keye_train.models.configs import KeyeConfig

__all__ = [
    "CheckpointConfig",
    "CheckpointManager",
    "TrainState",
    "find_latest_complete",
    "resolve_checkpoint",
]

SCHEDULER_KEY = "scheduler"
COUNTERS_KEY = "counters"


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


# The data-loader state is global (the same on every rank: a position in the global sample order), so it
# is stored once under one key and every rank loads it; a resume with more ranks than were saved then
# continues the same order instead of restarting the data on the new ranks.
DATA_KEY = "data"


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint. keep_last=0 keeps every checkpoint."""

    dir: str = "checkpoints"
    interval_steps: int = 1000
    keep_last: int = 3
    async_save: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.enabled and not str(self.dir).strip():
            raise ValueError(
                f"checkpoint.dir={self.dir!r} must name a directory when checkpointing is enabled"
            )
        if self.interval_steps < 1:
            raise ValueError(f"checkpoint.interval_steps={self.interval_steps} must be >= 1")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 keeps all)")


@dataclass
class TrainState:
    """What a checkpoint holds. The trainer keeps these objects; load() restores them in place.

    model / optimizer may be lists (one entry per pipeline chunk on this rank). `dataloader` and
    `scheduler` need state_dict()/load_state_dict(); `counters` (step, tokens seen, ...) is updated in place.
    """

    model: nn.Module | Sequence[nn.Module]
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None
    scheduler: Any = None
    dataloader: Any = None
    counters: dict[str, Any] = field(default_factory=dict)
    config_yaml: str = ""
    keye_cfg: KeyeConfig | None = None
    # More Stateful objects (state_dict()/load_state_dict()) saved under their keys, e.g. a trainer's own.
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_keye_cfg(self) -> KeyeConfig | None:
        if self.keye_cfg is not None:
            return self.keye_cfg
        cfg = getattr(as_list(self.model)[0], "cfg", None)
        return cfg if isinstance(cfg, KeyeConfig) else None


def _stateful_items(state: TrainState, *, rank: int, step: int | None, model: bool = True) -> dict[str, Any]:
    """The Stateful objects of `state`, keyed as in the checkpoint (model and optimizer only if `model`)."""
    items: dict[str, Any] = {}
    if model:
        items[MODEL_KEY] = ModelStateful(state.model)
        if state.optimizer is not None:
            items[OPTIM_KEY] = OptimizerStateful(state.model, state.optimizer)
    if state.scheduler is not None:
        items[SCHEDULER_KEY] = BlobStateful.of(state.scheduler)
    items[COUNTERS_KEY] = BlobStateful.of_dict(state.counters, **({} if step is None else {"step": step}))
    # RNG and loader positions differ per rank, so each rank stores its own key (DCP dedups equal keys).
    items[_rng_key(rank)] = BlobStateful.of_rng()
    if state.dataloader is not None:
        items[DATA_KEY] = BlobStateful.of(state.dataloader)
    for key, extra in state.extra.items():
        items[key] = BlobStateful.of(extra)
    return items


class CheckpointWriteError(OSError):
    """A save that failed (disk full, read-only, ...): its partial dir is removed, older ones are intact.
    `detail` says so (the one-line error of keye-train prints it after the cause)."""

    detail = ""

    def __str__(self) -> str:
        return f"{super().__str__()}; {self.detail}" if self.detail else super().__str__()


class CheckpointManager:
    """Saves `<dir>/step-N` DCP checkpoints of a TrainState and restores them, on every rank collectively.

    With async_save, save() returns once the state is copied to CPU; the write finishes in a thread and is
    finalised (marker, pruning) by the next save() or by wait(), which the trainer calls before exiting.
    """

    def __init__(self, cfg: CheckpointConfig, *, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self._log = log
        self.saved: list[Path] = []  # checkpoints this manager completed (the run summary lists them)
        self._pending: tuple[int, Path, Future] | None = None
        # DCP's async writer runs collectives from a thread; a group of its own keeps them from
        # interleaving with the training collectives (gloo also serves CPU tensors under NCCL training).
        self._async_group = (
            dist.new_group(backend="gloo")
            if cfg.enabled and cfg.async_save and dist.is_initialized()
            else None
        )

    def log(self, message: str) -> None:
        if _rank() == 0:
            self._log(message)

    def should_save(self, step: int) -> bool:
        return self.cfg.enabled and step > 0 and step % self.cfg.interval_steps == 0

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step-{step}"

    def _save_dict(self, step: int, state: TrainState) -> dict[str, Any]:
        """The checkpoint: a dict of Stateful objects (model, optimizer, scheduler, counters, RNG, data
        loader, any `extra`) plus the `meta` blob that export/merge read without a model."""
        items: dict[str, Any] = _stateful_items(state, rank=_rank(), step=step)
        items[META_KEY] = pack(self._meta(step, state))
        return items

    def _meta(self, step: int | None, state: TrainState) -> dict[str, Any]:
        # The run id of the identity that preflight recorded in this dir (none in plain API use).
        return make_meta(
            step=step,
            keye_cfg=state.resolved_keye_cfg(),
            config_yaml=state.config_yaml,
            world_size=_world_size(),
            run_id=read_run_id(self.dir),
        )

    def _prepare_dir(self, path: Path) -> None:
        if _rank() == 0:
            if path.exists():  # a leftover of a crashed save, or a rerun of the same step
                self.log(f"checkpoint: removing stale {path} before saving again")
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        _barrier()

    def save(self, step: int, state: TrainState) -> Path | None:
        """Collective. Saves step-`step` (returns its path), or nothing when checkpointing is disabled."""
        if not self.cfg.enabled:
            return None
        self.wait()
        kill_point("checkpoint.start")
        path = self.step_dir(step)
        self._prepare_dir(path)
        items = self._save_dict(step, state)
        try:
            with quiet_dcp():
                if self.cfg.async_save:
                    response = dcp.async_save(items, checkpoint_id=str(path), process_group=self._async_group)
                    self._pending = (step, path, getattr(response, "upload_completion", response))
                    self.log(f"checkpoint: step {step} staged, writing {path} in the background")
                    return path
                dcp.save(items, checkpoint_id=str(path))
            self._finalize(step, path)
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            self._failed(path, err)
        return path

    def _failed(self, path: Path, err: BaseException) -> None:
        """A save failed: remove its partial dir (no marker: never loaded anyway) and re-raise, as a
        CheckpointWriteError naming the path and the cause when the file system refused a write."""
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        os_error = root_os_error(err)
        if os_error is None or isinstance(err, CheckpointWriteError):
            raise err
        previous = next(
            (p for _, p in step_dirs(self.dir) if p != path and (p / MARKER_FILE).is_file()), None
        )
        kept = f"the last complete checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        failure = CheckpointWriteError(
            os_error.errno, os_error.strerror or str(os_error), os_error.filename or str(path)
        )
        failure.detail = f"checkpoint {path} was not saved (removed), {kept}"
        raise failure from err

    def wait(self) -> None:
        """Collective. Finishes an in-flight async save: waits for the write, then marker and pruning."""
        if self._pending is None:
            return
        step, path, future = self._pending
        self._pending = None
        try:
            future.result()
            self._finalize(step, path)
        except BaseException as err:
            self._failed(path, err)

    def _finalize(self, step: int, path: Path) -> None:
        kill_point("checkpoint.written")
        _barrier()  # every rank's files and DCP's .metadata are written
        if _rank() == 0:
            write_marker(path, step=step)
            self.log(f"checkpoint: saved {path}")
            self._prune()
        self.saved.append(path)
        _barrier()  # nobody looks for the marker before it exists
        kill_point("checkpoint.saved")

    def _prune(self) -> None:
        if self.cfg.keep_last == 0:
            return
        complete = [p for _, p in step_dirs(self.dir) if checkpoint_problem(p) is None]
        for old in complete[self.cfg.keep_last :]:
            self.log(f"checkpoint: deleting {old} (keep_last={self.cfg.keep_last})")
            shutil.rmtree(old, ignore_errors=True)

    def latest_complete(self) -> Path | None:
        """Newest complete step dir. Rank 0 decides and broadcasts, so every rank resumes the same one."""
        choice = [find_latest_complete(self.dir, log=self._log) if _rank() == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def load(self, step_dir: str | Path, state: TrainState, *, verified: bool = False) -> int:
        """Collective. Restores everything the checkpoint holds into `state`; returns the saved step.

        Model keys must all be present. A model-only checkpoint (import, merge, `final`) leaves optimizer,
        scheduler and loader fresh, with a message; so does a rank that did not exist when it was saved.
        Rank 0 verifies the files' checksums first unless the caller just did (`verified`).
        """
        step_dir = Path(step_dir)
        problem = _on_rank0(lambda: checkpoint_problem(step_dir, checksums=not verified))
        if problem is not None:
            raise ValueError(f"checkpoint {step_dir} cannot be loaded: {problem}")
        saved = read_dcp_metadata(step_dir).state_dict_metadata
        rank = _rank()
        items: dict[str, Any] = {MODEL_KEY: ModelStateful(state.model)}
        check_model_keys(items[MODEL_KEY], saved, step_dir)
        optimizers = as_list(state.optimizer)
        if optimizers and any(k.startswith(OPTIM_KEY + ".") for k in saved):
            items[OPTIM_KEY] = OptimizerStateful(state.model, optimizers, saved_keys=set(saved))
        elif optimizers:
            self.log(f"checkpoint: {step_dir} holds no optimizer state; the optimizer starts fresh")
        legacy: dict[str, BlobStateful] = {}
        for key, blob in _stateful_items(state, rank=rank, step=None, model=False).items():
            if f"{key}.{BLOB}" in saved:
                items[key] = blob
            elif key in saved:  # written before the blobs were Stateful: a bare bytes item
                items[key], legacy[key] = b"", blob
            else:
                self._log(f"checkpoint: {step_dir} has no '{key}' for rank {rank}; it starts fresh")
        # The RNG last (dict order is DCP's load order), so nothing consumes randomness after it.
        rng = _rng_key(rank)
        if rng in items:
            items[rng] = items.pop(rng)
        state.counters.clear()
        with quiet_dcp():
            dcp.load(items, checkpoint_id=str(step_dir))
        for key in sorted(legacy, key=lambda k: k == rng):  # the RNG last here too
            legacy[key].load_state_dict({BLOB: items[key]})
        counters = state.counters
        self.log(f"checkpoint: resumed from {step_dir}")
        return int(counters.get("step", 0))

    def resume(self, state: TrainState) -> int | None:
        """Collective. Loads the newest complete checkpoint if any; returns its step or None."""
        latest = self.latest_complete() if self.cfg.enabled else None
        return None if latest is None else self.load(latest, state, verified=True)

    def save_final(self, state: TrainState) -> Path | None:
        """Collective. `<dir>/final`: the model weights only (plus meta), the hand-off to the next stage.
        Nothing when checkpointing is disabled (checkpoint.enabled=false writes no checkpoint at all)."""
        if not self.cfg.enabled:
            return None
        self.wait()
        path = self.dir / FINAL_DIR
        self._prepare_dir(path)
        step = state.counters.get("step")
        meta = self._meta(step, state)
        try:
            with quiet_dcp():
                items = {MODEL_KEY: ModelStateful(state.model), META_KEY: pack(meta)}
                dcp.save(items, checkpoint_id=str(path))
            _barrier()
            if _rank() == 0:
                write_marker(path, step=step)
                self.log(f"checkpoint: saved final weights to {path}")
        except BaseException as err:
            self._failed(path, err)
        self.saved.append(path)
        _barrier()
        return path

    def close(self) -> None:
        """Collective. Finishes any pending save and releases the async process group."""
        self.wait()
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None
