"""Preflight checks of a run: what resume would continue, stage matching, fresh_run (issue 13), the run's
identity and the restart of a run preempted before its first checkpoint (issue 21)."""

import json

import pytest
import torch

from keye_train.checkpoint.dcp import read_meta
from keye_train.checkpoint.identity import read_identity
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.cli.train import main as train_main
from keye_train.config.loader import compose_config
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.train.preflight import PreflightError, check_resume, move_aside, run_preflight
from keye_train.train.stage_handoff import check_init_from
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
    assert latest.latest == stage2_run / "checkpoints" / "step-1"


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
    plan = check_resume(
        checkpoint_dir=str(stage2_run / "new" / "ckpt"),
        resume=True,
        **kwargs | {"run_dir": str(stage2_run / "new")},
    )
    assert plan.latest is None and not plan.restart


def test_init_from_a_later_stage_is_refused(stage2_run):
    source = stage2_run / "checkpoints" / "step-1"
    check_init_from(source, stage=_summary("stage3_anneal"))  # forward: fine
    with pytest.raises(ValueError, match="stage2_multitask.*after.*stage1_align"):
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


# --------------------------------------------------------------------------- run identity (issue 21)

RECIPE = "stage2_multitask"


def _config(run_dir, *extra, recipe=RECIPE):
    return compose_config(recipe, [f"run_dir={run_dir}", "data.manifest=/unused.yaml", *extra])[1]


def _preflight(cfg, recipe=RECIPE) -> list[str]:
    lines: list[str] = []
    run_preflight(cfg, rank=0, recipe=recipe, log=lines.append)
    return lines


def _interrupted_run(tmp_path, *extra):
    """A run started, then preempted after 2 steps in the middle of writing its first checkpoint."""
    run_dir = tmp_path / "run"
    _preflight(_config(run_dir, *extra))
    _metrics(run_dir, 2)
    (run_dir / "checkpoints" / "step-2").mkdir()  # DCP files, no marker
    return run_dir


def test_a_run_preempted_before_its_first_checkpoint_restarts_by_itself(tmp_path):
    run_dir = _interrupted_run(tmp_path)
    identity = read_identity(run_dir)
    lines = _preflight(_config(run_dir))  # the identical command, resume=true as always
    assert len(lines) == 1 and "restarting from step 0" in lines[0] and "2 earlier step records" in lines[0]
    assert not (run_dir / "metrics.jsonl").exists() and len(list(run_dir.glob("metrics.jsonl.old-*"))) == 1
    assert not (run_dir / "checkpoints" / "step-2").exists()
    # The identity survives the restart, an elastic resume (another layout, the same global batch) too.
    assert read_identity(run_dir) == read_identity(run_dir / "checkpoints") == identity
    _metrics(run_dir, 1)
    assert _preflight(_config(run_dir, "parallel=single", "data.microbatches=2"))[0].startswith("resume:")
    assert read_identity(run_dir)["run_id"] == identity["run_id"]


def test_a_mistyped_checkpoint_dir_is_one_line_naming_both(tmp_path, capsys):
    run_dir = _interrupted_run(tmp_path)
    mistyped = run_dir / "chekpoints"
    with pytest.raises(PreflightError) as caught:
        _preflight(_config(run_dir, f"checkpoint.dir={mistyped}"))
    message = str(caught.value)
    assert "\n" not in message and f"checkpoint.dir {mistyped} does not exist" in message
    assert str(run_dir / "checkpoints") in message and read_identity(run_dir)["run_id"] in message
    assert not mistyped.exists() and (run_dir / "metrics.jsonl").exists()  # nothing touched
    # keye-train itself prints it as one line, without a traceback.
    argv = [
        f"recipe={RECIPE}",
        f"run_dir={run_dir}",
        "data.manifest=/unused.yaml",
        f"checkpoint.dir={mistyped}",
    ]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(mistyped) in err


def test_a_foreign_checkpoint_dir_or_config_is_refused_naming_both(tmp_path):
    run_dir = _interrupted_run(tmp_path)
    other = tmp_path / "other"
    _preflight(_config(other))
    _metrics(other, 1)
    with pytest.raises(PreflightError, match="holds the checkpoints of run .* but run_dir .* holds run"):
        _preflight(_config(other, f"checkpoint.dir={run_dir / 'checkpoints'}"))
    with pytest.raises(PreflightError, match=r"differs from this launch's in seed: 0 vs 7"):
        _preflight(_config(run_dir, "seed=7"))
    assert (run_dir / "metrics.jsonl").exists()


def test_stage_init_from_takes_a_finished_run_and_records_it(tmp_path):
    stage1 = tmp_path / "stage1"
    _preflight(_config(stage1, recipe="stage1_align"), recipe="stage1_align")
    _metrics(stage1, 1)
    stage2 = _config(tmp_path / "stage2", f"stage.init_from={stage1}")
    with pytest.raises(PreflightError, match=r"final checkpoint .*final is not complete .* not finished"):
        _preflight(stage2)
    model = build_model(tiny(), seed=0)
    CheckpointManager(CheckpointConfig(dir=str(stage1 / "checkpoints")), log=print).save_final(
        TrainState(model=model, counters={"step": 1}, keye_cfg=tiny())
    )
    _preflight(stage2)
    previous, current = read_identity(stage1), read_identity(tmp_path / "stage2")
    assert current["init_from"]["run_id"] == previous["run_id"] != current["run_id"]
    assert read_meta(stage1 / "checkpoints" / "final")["run_id"] == previous["run_id"]
