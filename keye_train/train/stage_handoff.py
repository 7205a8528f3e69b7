"""What a stage starts from and continues: the stage a checkpoint was written by, and stage.init_from.

Each check raises ValueError naming both sides and the fix; train/preflight.py runs them on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from keye_train.checkpoint.dcp import FINAL_DIR, checkpoint_problem, read_meta, resolve_checkpoint, step_dirs
from keye_train.train.run_identity import load_identity

# The stages in curriculum order: initialising from a later stage than the one being trained is refused.
CURRICULUM = ("stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal")


def stage_summary(stage_cfg: Any) -> dict[str, Any]:
    """{name, train, loss} of a StageConfig, the parts two stages are compared by."""
    return {"name": stage_cfg.name, "train": sorted(stage_cfg.train), "loss": stage_cfg.loss}


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


def check_same_stage(latest: Path, *, checkpoint_dir: Path, stage: dict[str, Any]) -> None:
    """Resuming a checkpoint written by another stage is refused."""
    saved = saved_stage(latest)
    if saved is None or saved["name"] == "custom":
        return
    if saved["name"] != stage["name"] or saved["train"] != stage["train"] or saved["loss"] != stage["loss"]:
        parent = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
        raise ValueError(
            f"checkpoint {latest} was written by stage {_describe(saved)}, but this run is stage "
            f"{_describe(stage)}: resuming across stages is refused; use another run_dir for this stage "
            f"(with stage.init_from={parent} to start from its weights)"
        )


def check_init_from(source: Path, *, stage: dict[str, Any]) -> None:
    """Initialising from a checkpoint of a LATER curriculum stage (e.g. stage 1 from stage 2's) is refused."""
    saved = saved_stage(source)
    if saved is None or saved["name"] not in CURRICULUM or stage["name"] not in CURRICULUM:
        return
    if CURRICULUM.index(saved["name"]) > CURRICULUM.index(stage["name"]):
        raise ValueError(
            f"stage.init_from={source} holds stage {_describe(saved)}, which comes after this run's stage "
            f"{_describe(stage)} in the curriculum; initialise from an earlier stage's output"
        )


def check_stage_input(
    init_from: str, *, stage: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The checkpoint stage.init_from names, checked; returns {path, run_id[, recipe]} for the new run's
    identity (None for a Hugging Face folder).

    A run dir (or its checkpoint dir) with a run identity hands over its `final` checkpoint only, which
    must be complete and written by that run: a stage that has not finished is refused, naming the fix.
    """
    source = Path(init_from)
    if (source / "config.json").is_file():
        return None
    previous = load_identity(source) if source.is_dir() else None
    if previous is None:
        try:
            source = resolve_checkpoint(source, log=log)
        except ValueError as err:
            raise ValueError(f"stage.init_from={init_from}: {err}") from None
        check_init_from(source, stage=stage)
        return {"path": str(source.absolute()), "run_id": _written_by(source)}
    own_checkpoints = (source / FINAL_DIR).exists() or step_dirs(source)
    checkpoints = source if own_checkpoints else previous.checkpoint_path(source)
    final = checkpoints / FINAL_DIR
    problem = checkpoint_problem(final) if final.is_dir() else "it does not exist"
    if problem is not None:
        raise ValueError(
            f"stage.init_from={init_from} holds {previous.describe()}, whose final checkpoint {final} is not "
            f"complete ({problem}): that stage has not finished; relaunch its command to finish it, or name "
            f"one of its step dirs (stage.init_from={checkpoints}/step-N) to start from it anyway"
        )
    written_by = _written_by(final)
    if written_by not in (None, previous.run_id):
        raise ValueError(
            f"stage.init_from={init_from}: its final checkpoint {final} was written by run {written_by}, "
            f"not by {previous.describe()} whose dir it is in; name the dir of the run that wrote it"
        )
    check_init_from(final, stage=stage)
    return {"path": str(final.absolute()), "run_id": previous.run_id, "recipe": previous.recipe}


def _written_by(checkpoint: Path) -> str | None:
    """The run id a checkpoint's meta records (None: written before run identities, or by a conversion)."""
    try:
        return read_meta(checkpoint).get("run_id")
    except ValueError:
        return None
