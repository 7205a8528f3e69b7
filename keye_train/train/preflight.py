"""Checks before a run touches anything: writable dirs, what resume will continue, matching stages.

Each failure is one `PreflightError` line naming the path or the two stages and the fix. Rank 0 decides
(one rank reads the file system) and every rank raises the same error, so it is printed once.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from keye_train.checkpoint.dcp import (
    FINAL_DIR,
    checkpoint_problem,
    read_meta,
    step_dirs,
)

METRICS_FILE = "metrics.jsonl"
# The stages in curriculum order: initialising from a later stage than the one being trained is refused.
CURRICULUM = ("stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal")


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


def saved_stage(step_dir: Path) -> dict[str, Any] | None:
    """{name, train, loss} of the stage that wrote a checkpoint, from the config saved in its meta (the
    YAML holds the stage as given; StageConfig fills in the named stage's preset, as at training time)."""
    from keye_train.train.stages import StageConfig

    try:
        text = read_meta(step_dir).get("config_yaml") or ""
        stage = (yaml.safe_load(text) or {}).get("stage") or {}
        if not stage.get("name"):
            return None
        saved = StageConfig(name=stage["name"], train=stage.get("train"), loss=stage.get("loss"))
        return stage_summary(saved)
    except (ValueError, TypeError, yaml.YAMLError):
        return None


def _describe(stage: dict[str, Any]) -> str:
    return f"{stage['name']} (trains {','.join(stage['train'])}, loss {stage['loss']})"


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


def check_resume(
    *,
    run_dir: str,
    checkpoint_dir: str,
    resume: bool,
    fresh_run: bool,
    stage: dict[str, Any],
    checkpoints_enabled: bool = True,
) -> Path | None:
    """What the run continues from; PreflightError when that is not what the operator can have meant.

    - resume=true, no checkpoint, but run_dir holds another run's metrics: the checkpoint dir is
      mistyped or deleted; refusing beats silently starting at step 0 and appending duplicate steps.
    - resume=false in a run_dir with metrics (or checkpoints): needs fresh_run=true.
    - a checkpoint of another stage: refused, naming both.
    """
    ckpt = Path(checkpoint_dir)
    recorded = metrics_steps(run_dir)
    latest = newest_checkpoint(ckpt) if ckpt.is_dir() and checkpoints_enabled else None
    if not resume or not checkpoints_enabled or fresh_run:
        if (recorded or latest is not None) and not fresh_run:
            why = "resume=false" if checkpoints_enabled else "checkpoint.enabled=false (nothing to resume)"
            held = f"{recorded} step records in {METRICS_FILE}" + (f", checkpoint {latest}" if latest else "")
            raise PreflightError(
                f"{why} but run_dir {run_dir} already holds an earlier run ({held}); pass fresh_run=true "
                "to start over (the old metrics and checkpoints are moved aside), or choose another run_dir"
            )
        return None
    if latest is None:
        if recorded:
            state = "does not exist" if not ckpt.exists() else "holds no complete checkpoint"
            raise PreflightError(
                f"resume=true but checkpoint.dir {ckpt} {state}, while run_dir {run_dir} holds {recorded} "
                f"step records of an earlier run in {METRICS_FILE}; point checkpoint.dir at that run's "
                "checkpoints, or pass fresh_run=true to start over"
            )
        return None
    saved = saved_stage(latest)
    if (
        saved is not None
        and saved["name"] != "custom"
        and (
            saved["name"] != stage["name"]
            or saved["train"] != stage["train"]
            or saved["loss"] != stage["loss"]
        )
    ):
        raise PreflightError(
            f"checkpoint {latest} was written by stage {_describe(saved)}, but this run is stage "
            f"{_describe(stage)}: resuming across stages is refused; use another run_dir for this stage "
            f"(with stage.init_from={ckpt.parent if ckpt.name == 'checkpoints' else ckpt} to start from "
            "its weights)"
        )
    return latest


def check_init_from(source: Path, *, stage: dict[str, Any]) -> None:
    """Initialising from a checkpoint of a LATER curriculum stage (e.g. stage 1 from stage 2's) is refused."""
    saved = saved_stage(source)
    if saved is None or saved["name"] not in CURRICULUM or stage["name"] not in CURRICULUM:
        return
    if CURRICULUM.index(saved["name"]) > CURRICULUM.index(stage["name"]):
        raise PreflightError(
            f"stage.init_from={source} holds stage {_describe(saved)}, which comes after this run's stage "
            f"{_describe(stage)} in the curriculum; initialise from an earlier stage's output"
        )


def move_aside(run_dir: str, checkpoint_dir: str, *, log: Callable[[str], None]) -> None:
    """fresh_run=true: the earlier run's metrics.jsonl and checkpoint dir get a timestamped suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (Path(run_dir) / METRICS_FILE, Path(checkpoint_dir)):
        if path.exists():
            target = path.with_name(f"{path.name}.old-{stamp}")
            path.rename(target)
            log(f"fresh_run=true: moved the earlier run's {path} to {target}")


def stage_summary(stage_cfg: Any) -> dict[str, Any]:
    return {"name": stage_cfg.name, "train": sorted(stage_cfg.train), "loss": stage_cfg.loss}


def run_preflight(cfg: Any, *, rank: int, log: Callable[[str], None] = print) -> None:
    """All checks for a keye-train run (rank 0 does them; the caller broadcasts the outcome)."""
    if rank != 0:
        return
    stage = stage_summary(cfg.stage)
    if cfg.stage.init_from:
        from keye_train.checkpoint.dcp import resolve_checkpoint

        source = Path(cfg.stage.init_from)
        if not (source / "config.json").is_file():
            try:
                source = resolve_checkpoint(source, log=log)
            except ValueError as err:
                raise PreflightError(f"stage.init_from={cfg.stage.init_from}: {err}") from None
            check_init_from(source, stage=stage)
    fresh_run = bool(getattr(cfg, "fresh_run", False))
    check_resume(
        run_dir=cfg.run_dir,
        checkpoint_dir=cfg.checkpoint.dir,
        resume=cfg.resume,
        fresh_run=fresh_run,
        stage=stage,
        checkpoints_enabled=cfg.checkpoint.enabled,
    )
    if fresh_run:
        move_aside(cfg.run_dir, cfg.checkpoint.dir, log=log)
    # Last: creating the dirs first would make a mistyped checkpoint.dir look like an empty one.
    check_writable(cfg.run_dir, what="run_dir")
    if cfg.checkpoint.enabled:
        check_writable(cfg.checkpoint.dir, what="checkpoint.dir")


def broadcast_preflight(cfg: Any, *, rank: int, log: Callable[[str], None] = print) -> None:
    """run_preflight on rank 0; its PreflightError raised on every rank (none waits for a failed rank 0)."""
    from keye_train.distributed.collectives import broadcast_object_from_rank0

    error: str | None = None
    try:
        run_preflight(cfg, rank=rank, log=log)
    except PreflightError as err:
        error = str(err)
    error = broadcast_object_from_rank0(error)
    if error is not None:
        raise PreflightError(error)


__all__ = [
    "PreflightError",
    "broadcast_preflight",
    "check_init_from",
    "check_resume",
    "check_writable",
]
