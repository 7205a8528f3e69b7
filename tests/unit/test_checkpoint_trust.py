"""Verified checkpoints (issue 13): checksums in the marker, fallback past a bit-flipped checkpoint, export
refused, staging dirs of killed conversions removed, disk-full and read-only saves as one-line errors."""

import errno
import json
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from keye_train.checkpoint.dcp import MARKER_FILE, checkpoint_problem
from keye_train.checkpoint.manager import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointWriteError,
    TrainState,
)
from keye_train.checkpoint.staging import remove_stale_staging
from keye_train.cli.convert import main as convert_main
from keye_train.cli.failure import one_line
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model

CFG = tiny()


def _state(seed: int) -> TrainState:
    model = build_model(CFG, seed=seed)
    return TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()), keye_cfg=CFG)


def _params(state: TrainState) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


def _flip_bytes(step_dir) -> str:
    """Flips 16 bytes in the middle of the largest data file (tensor bytes, not its metadata)."""
    data = max((p for p in step_dir.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    for i in range(middle, middle + 16):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    return data.name


@pytest.fixture
def two_checkpoints(tmp_path):
    """step-1 and step-2 of two different models (so a fallback is visible in the weights)."""
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"), keep_last=0), log=lambda _: None)
    first, second = _state(0), _state(1)
    manager.save(1, first)
    manager.save(2, second)
    return {"dir": tmp_path / "ckpt", "step1": _params(first), "step2": _params(second)}


def test_the_marker_records_a_checksum_of_every_file(two_checkpoints):
    step_dir = two_checkpoints["dir"] / "step-2"
    files = json.loads((step_dir / MARKER_FILE).read_text())["files"]
    on_disk = sorted(p.name for p in step_dir.iterdir() if p.name != MARKER_FILE)
    assert sorted(files) == on_disk and ".metadata" in files
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())
    assert checkpoint_problem(step_dir) is None


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(two_checkpoints):
    name = _flip_bytes(two_checkpoints["dir"] / "step-2")
    # The size is unchanged: only the checksum can tell.
    problem = checkpoint_problem(two_checkpoints["dir"] / "step-2")
    assert problem is not None and name in problem and "sha256" in problem
    messages: list[str] = []
    fresh = _state(5)
    manager = CheckpointManager(CheckpointConfig(dir=str(two_checkpoints["dir"])), log=messages.append)
    assert manager.resume(fresh) == 1
    skipped = [m for m in messages if "skipping" in m]
    assert len(skipped) == 1 and "step-2" in skipped[0] and name in skipped[0] and "sha256" in skipped[0]
    for key, value in two_checkpoints["step1"].items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="sha256"):
        manager.load(two_checkpoints["dir"] / "step-2", _state(5))


def test_export_refuses_a_bit_flipped_checkpoint(two_checkpoints, tmp_path, capsys):
    _flip_bytes(two_checkpoints["dir"] / "step-2")
    out = tmp_path / "hf"
    assert convert_main(["export", "--ckpt", str(two_checkpoints["dir"] / "step-2"), "--out", str(out)]) == 1
    assert "sha256" in capsys.readouterr().err
    assert not out.exists()
    # The intact one still exports.
    assert convert_main(["export", "--ckpt", str(two_checkpoints["dir"] / "step-1"), "--out", str(out)]) == 0


def test_staging_dirs_of_killed_conversions_are_removed(tmp_path):
    target = tmp_path / "hf"
    dead_pid = 2**22 + 12345  # above the default pid_max: no process has it
    leftovers = [
        tmp_path / ".hf.tmp-abc123",
        tmp_path / f".hf.export-{dead_pid}",
        tmp_path / f"..hf.export-{dead_pid}.tmp-x1y2",  # the nested staging of exports before issue 21
        tmp_path / f".hf.tmp-{dead_pid}-x1y2",  # today's form
        tmp_path / f".other.tmp-{dead_pid}",
        tmp_path / f".other.tmp-{dead_pid}-x1y2",
    ]
    alive = tmp_path / f".other.tmp-{os.getpid()}"  # a conversion still running (this process)
    for folder in [*leftovers, alive]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    messages: list[str] = []
    removed = remove_stale_staging(target, log=messages.append)
    assert sorted(removed) == sorted(leftovers)
    assert all(not p.exists() for p in leftovers) and alive.exists()
    assert len(messages) == len(leftovers) and all("1000 bytes" in m for m in messages)


@pytest.mark.parametrize(
    ("code", "cause"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")]
)
def test_a_failed_write_is_one_line_and_keeps_the_last_checkpoint(two_checkpoints, monkeypatch, code, cause):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(dcp_filesystem, "_write_item", refuse)
    manager = CheckpointManager(CheckpointConfig(dir=str(two_checkpoints["dir"]), keep_last=1))
    with pytest.raises(CheckpointWriteError) as caught:
        manager.save(3, _state(2))
    line = one_line(caught.value)
    assert "\n" not in line and cause in line and errno.errorcode[code] in line
    assert str(two_checkpoints["dir"] / "step-3") in line and "step-2 is intact" in line
    # Nothing half written; nothing pruned; the last complete checkpoint still verifies and resumes.
    assert not (two_checkpoints["dir"] / "step-3").exists()
    assert checkpoint_problem(two_checkpoints["dir"] / "step-2") is None
    monkeypatch.undo()
    fresh = _state(5)
    assert CheckpointManager(CheckpointConfig(dir=str(two_checkpoints["dir"]))).resume(fresh) == 2
    for key, value in two_checkpoints["step2"].items():
        assert torch.equal(fresh.model.state_dict()[key], value), key


def test_disabled_checkpointing_writes_nothing_not_even_final(tmp_path):
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"), enabled=False))
    assert manager.save(1, _state(0)) is None
    assert manager.save_final(_state(0)) is None
    assert not (tmp_path / "ckpt").exists() and manager.saved == []


class _Counters:
    """A trainer-like object with its own state (registered through TrainState.extra)."""

    def __init__(self, step: int) -> None:
        self.step, self.nonfinite = step, step % 2

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite = state["step"], state["nonfinite"]


def test_the_checkpoint_is_a_dict_of_statefuls_and_old_blobs_still_load(tmp_path):
    from keye_train.checkpoint.dcp import pack, read_dcp_metadata, write_marker
    from keye_train.checkpoint.manager import _stateful_items

    state = _state(0)
    scheduler = torch.optim.lr_scheduler.StepLR(state.optimizer, step_size=1, gamma=0.5)
    state.scheduler, state.counters, state.extra = scheduler, {"tokens": 7}, {"trainer": _Counters(5)}
    scheduler.step()
    items = _stateful_items(state, rank=0, step=3)
    assert all(hasattr(v, "state_dict") and hasattr(v, "load_state_dict") for v in items.values())
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "new"))).save(3, state)
    keys = set(read_dcp_metadata(tmp_path / "new" / "step-3").state_dict_metadata)
    assert {"counters.blob", "scheduler.blob", "trainer.blob", "rng_rank0.blob"} <= keys
    fresh = _state(1)
    fresh.scheduler = torch.optim.lr_scheduler.StepLR(fresh.optimizer, step_size=1, gamma=0.5)
    fresh.extra = {"trainer": _Counters(0)}
    assert CheckpointManager(CheckpointConfig(dir=str(tmp_path / "new"))).resume(fresh) == 3
    assert fresh.counters == {"tokens": 7, "step": 3} and fresh.scheduler.last_epoch == 1
    assert fresh.extra["trainer"].state_dict() == {"step": 5, "nonfinite": 1}
    # A checkpoint of the earlier layout (bare bytes under plain keys) still resumes.
    import torch.distributed.checkpoint as dcp

    from keye_train.checkpoint.dcp import ModelStateful, quiet_dcp

    old = tmp_path / "old" / "step-2"
    with quiet_dcp():
        dcp.save(
            {"model": ModelStateful(state.model), "counters": pack({"step": 2, "tokens": 9})},
            checkpoint_id=str(old),
            no_dist=True,
        )
    write_marker(old, step=2)
    fresh = _state(1)
    assert CheckpointManager(CheckpointConfig(dir=str(tmp_path / "old"))).resume(fresh) == 2
    assert fresh.counters == {"step": 2, "tokens": 9}
