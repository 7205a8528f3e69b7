"""Preflight checks of a run: what resume would continue, stage matching, fresh_run (issue 13)."""

import json

import pytest
import torch

from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.train.preflight import PreflightError, check_init_from, check_resume, move_aside
from keye_train.train.stages import StageConfig


def _summary(name: str) -> dict:
    stage = StageConfig(name=name)
    return {"name": stage.name, "train": sorted(stage.train), "loss": stage.loss}


def _checkpoint(directory, stage_name: str) -> None:
    # The resolved YAML as keye-train saves it: the stage as the recipe gives it (presets not filled in).
    yaml_text = f"stage:\n  name: {stage_name}\n  train: null\n  loss: null\n"
    model = build_model(tiny(), seed=0)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters()), config_yaml=yaml_text)
    CheckpointManager(CheckpointConfig(dir=str(directory)), log=lambda _: None).save(1, state)


def _metrics(run_dir, steps: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s}) for s in range(steps)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("preflight") / "s2"
    _checkpoint(run_dir / "checkpoints", "stage2_multitask")
    _metrics(run_dir, 1)
    return run_dir


def test_resuming_the_same_stage_is_allowed(stage2_run):
    latest = check_resume(
        run_dir=str(stage2_run),
        checkpoint_dir=str(stage2_run / "checkpoints"),
        resume=True,
        fresh_run=False,
        stage=_summary("stage2_multitask"),
    )
    assert latest == stage2_run / "checkpoints" / "step-1"


def test_resuming_another_stage_is_refused_naming_both(stage2_run):
    with pytest.raises(PreflightError, match="stage2_multitask.*stage1_align"):
        check_resume(
            run_dir=str(stage2_run),
            checkpoint_dir=str(stage2_run / "checkpoints"),
            resume=True,
            fresh_run=False,
            stage=_summary("stage1_align"),
        )


def test_a_missing_checkpoint_dir_beside_earlier_metrics_is_refused(stage2_run):
    kwargs = dict(run_dir=str(stage2_run), fresh_run=False, stage=_summary("stage2_multitask"))
    with pytest.raises(PreflightError, match="chekpoints does not exist.*1 step records"):
        check_resume(checkpoint_dir=str(stage2_run / "chekpoints"), resume=True, **kwargs)
    with pytest.raises(PreflightError, match="resume=false.*fresh_run=true"):
        check_resume(checkpoint_dir=str(stage2_run / "checkpoints"), resume=False, **kwargs)
    # A first run in an empty run_dir starts fresh without any override.
    assert (
        check_resume(
            checkpoint_dir=str(stage2_run / "new" / "ckpt"),
            resume=True,
            **kwargs | {"run_dir": str(stage2_run / "new")},
        )
        is None
    )


def test_init_from_a_later_stage_is_refused(stage2_run):
    source = stage2_run / "checkpoints" / "step-1"
    check_init_from(source, stage=_summary("stage3_anneal"))  # forward: fine
    with pytest.raises(PreflightError, match="stage2_multitask.*after.*stage1_align"):
        check_init_from(source, stage=_summary("stage1_align"))


def test_fresh_run_moves_the_earlier_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    _metrics(run_dir, 3)
    (run_dir / "checkpoints" / "step-3").mkdir(parents=True)
    messages = []
    move_aside(str(run_dir), str(run_dir / "checkpoints"), log=messages.append)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    assert (
        len(list(run_dir.glob("metrics.jsonl.old-*"))) == 1
        and len(list(run_dir.glob("checkpoints.old-*"))) == 1
    )
    assert len(messages) == 2
