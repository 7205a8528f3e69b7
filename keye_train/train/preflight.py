"""Checks before a run touches anything: writable dirs, what resume will continue, matching stages, the
run's identity (train/run_identity.py) and what a stage starts from (train/stage_handoff.py).

Each failure is one `PreflightError` line naming the path or the two stages and the fix. Rank 0 decides
(one rank reads the file system) and every rank raises the same error, so it is printed once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye_train.checkpoint.dcp import FINAL_DIR, checkpoint_problem, step_dirs
from keye_train.checkpoint.identity import IDENTITY_FILE
from keye_train.train.run_identity import RunIdentity, check_own_run, settle_identity
from keye_train.train.stage_handoff import check_same_stage, check_stage_input, stage_summary

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


class PreflightError(ValueError):
    """A problem with the run's directories or checkpoints, the same on every rank."""

    same_on_every_rank = True


def check_writable(path: str | Path, *, what: str) -> None:
    """PreflightError naming `path` and the cause unless a file can be created in it (mkdir -p first)."""
    path = Path(path)
    probe = path / f".keye_write_probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as err:
        cause = err.strerror or str(err)
        code = errno.errorcode.get(err.errno or 0, "")
        raise PreflightError(
            f"{what} {path} is not writable: {cause}" + (f" ({code})" if code else "")
        ) from None


def metrics_steps(run_dir: str | Path) -> int:
    """How many step records run_dir/metrics.jsonl holds (0 when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


@contextlib.contextmanager
def _as_preflight_error() -> Iterator[None]:
    """The ValueErrors of the identity and stage checks, as PreflightErrors (printed once, by rank 0)."""
    try:
        yield
    except PreflightError:
        raise
    except ValueError as err:
        raise PreflightError(str(err)) from None


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest step dir (else `final`) with a readable marker and metadata; checksums are left to
    the resume itself, which falls back further if this one fails them."""
    for _, path in step_dirs(directory):
        if checkpoint_problem(path, checksums=False) is None:
            return path
    final = directory / FINAL_DIR
    if final.is_dir() and checkpoint_problem(final, checksums=False) is None:
        return final
    return None


@dataclass
class ResumePlan:
    """What a start continues: `latest` (a checkpoint) or nothing; `restart` when run_dir holds this run's
    own metrics but no complete checkpoint (stopped before its first one): start over from step 0."""

    latest: Path | None = None
    restart: bool = False


def check_resume(
    *,
    run_dir: str,
    checkpoint_dir: str,
    resume: bool,
    fresh_run: bool,
    stage: dict[str, Any],
    checkpoints_enabled: bool = True,
    identity: RunIdentity | None = None,
) -> ResumePlan:
    """What the run continues from; PreflightError when that is not what the operator can have meant.

    - resume=true, no complete checkpoint, run_dir holds metrics: this run's own (its identity matches and
      checkpoint.dir is its own) restarts from step 0; another's, or one without identity, is refused:
      a mistyped checkpoint.dir would otherwise silently restart at step 0 over the earlier metrics.
    - a checkpoint.dir of another run, or a run_dir whose run had another config: refused, naming both.
    - resume=false in a run_dir with metrics (or checkpoints): needs fresh_run=true.
    - a checkpoint of another stage: refused, naming both.
    """
    ckpt = Path(checkpoint_dir)
    recorded = metrics_steps(run_dir)
    latest = newest_checkpoint(ckpt) if ckpt.is_dir() and checkpoints_enabled else None
    if fresh_run or (recorded == 0 and latest is None):
        return ResumePlan()
    if not resume and checkpoints_enabled:
        held = f"{recorded} step records in {METRICS_FILE}" + (f", checkpoint {latest}" if latest else "")
        raise PreflightError(
            f"resume=false but run_dir {run_dir} already holds an earlier run ({held}); pass fresh_run=true "
            "to start over (the old metrics and checkpoints are moved aside), or choose another run_dir"
        )
    with _as_preflight_error():
        if latest is not None:  # first: another stage's checkpoint is named as such
            check_same_stage(latest, checkpoint_dir=ckpt, stage=stage)
        own = identity is not None and check_own_run(
            run_dir=run_dir,
            checkpoint_dir=ckpt if checkpoints_enabled else None,
            identity=identity,
            records=recorded,
        )
    if latest is not None:
        return ResumePlan(latest=latest)
    if own:
        return ResumePlan(restart=True)
    if not checkpoints_enabled:
        raise PreflightError(
            f"checkpoint.enabled=false (nothing to resume) but run_dir {run_dir} already holds an earlier "
            f"run ({recorded} step records in {METRICS_FILE}); pass fresh_run=true to start over (the old "
            "metrics are moved aside), or choose another run_dir"
        )
    state = "does not exist" if not ckpt.exists() else "holds no complete checkpoint"
    raise PreflightError(
        f"resume=true but checkpoint.dir {ckpt} {state}, while run_dir {run_dir} holds {recorded} "
        f"step records of an earlier run in {METRICS_FILE}; point checkpoint.dir at that run's "
        "checkpoints, or pass fresh_run=true to start over"
    )


def _aside(path: Path, stamp: str) -> Path:
    target = path.with_name(f"{path.name}.old-{stamp}")
    path.rename(target)
    return target


def move_aside(run_dir: str, checkpoint_dir: str, *, log: Callable[[str], None]) -> None:
    """fresh_run=true: the earlier run's metrics, identity and checkpoint dir get a timestamped suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(run_dir)
    for path in (run / METRICS_FILE, run / EVAL_FILE, run / IDENTITY_FILE, Path(checkpoint_dir)):
        if path.exists():
            log(f"fresh_run=true: moved the earlier run's {path} to {_aside(path, stamp)}")


def restart_interrupted(run_dir: str, checkpoint_dir: str, *, log: Callable[[str], None]) -> None:
    """This run stopped before its first complete checkpoint: its metrics move aside (timestamped), its
    incomplete checkpoints go, and it starts over from step 0, saying so in one line."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    records = metrics_steps(run_dir)
    moved = [
        _aside(p, stamp).name for p in (Path(run_dir) / METRICS_FILE, Path(run_dir) / EVAL_FILE) if p.exists()
    ]
    partial = [p for _, p in step_dirs(checkpoint_dir) if checkpoint_problem(p, checksums=False) is not None]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    log(
        f"resume: no complete checkpoint of this run in {checkpoint_dir} (it stopped before its first one "
        f"completed): restarting from step 0; its {records} earlier step records moved to "
        + " and ".join(moved)
        + (f", {len(partial)} incomplete checkpoints removed" if partial else "")
    )


def run_preflight(cfg: Any, *, rank: int, recipe: str = "", log: Callable[[str], None] = print) -> None:
    """All checks for a keye-train run (rank 0 does them; the caller broadcasts the outcome), then the
    run's identity recorded in run_dir and checkpoint.dir."""
    if rank != 0:
        return
    stage = stage_summary(cfg.stage)
    with _as_preflight_error():
        lineage = (
            check_stage_input(cfg.stage.init_from, stage=stage, log=log) if cfg.stage.init_from else None
        )
    identity = RunIdentity.of(cfg, recipe=recipe, init_from=lineage)
    fresh_run = bool(getattr(cfg, "fresh_run", False))
    plan = check_resume(
        run_dir=cfg.run_dir,
        checkpoint_dir=cfg.checkpoint.dir,
        resume=cfg.resume,
        fresh_run=fresh_run,
        stage=stage,
        checkpoints_enabled=cfg.checkpoint.enabled,
        identity=identity,
    )
    if fresh_run:
        move_aside(cfg.run_dir, cfg.checkpoint.dir, log=log)
    # Last: creating the dirs first would make a mistyped checkpoint.dir look like an empty one.
    check_writable(cfg.run_dir, what="run_dir")
    if cfg.checkpoint.enabled:
        check_writable(cfg.checkpoint.dir, what="checkpoint.dir")
    if plan.restart:
        restart_interrupted(cfg.run_dir, cfg.checkpoint.dir, log=log)
    with _as_preflight_error():
        settle_identity(
            identity,
            run_dir=cfg.run_dir,
            checkpoint_dir=cfg.checkpoint.dir if cfg.checkpoint.enabled else None,
            continues=plan.latest is not None or plan.restart,
            log=log,
        )


def broadcast_preflight(cfg: Any, *, rank: int, recipe: str = "", log: Callable[[str], None] = print) -> None:
    """run_preflight on rank 0; its PreflightError raised on every rank (none waits for a failed rank 0)."""
    from keye_train.distributed.collectives import broadcast_object_from_rank0

    error: str | None = None
    try:
        run_preflight(cfg, rank=rank, recipe=recipe, log=log)
    except PreflightError as err:
        error = str(err)
    error = broadcast_object_from_rank0(error)
    if error is not None:
        raise PreflightError(error)


__all__ = [
    "PreflightError",
    "ResumePlan",
    "broadcast_preflight",
    "check_resume",
    "check_writable",
    "move_aside",
    "restart_interrupted",
]
