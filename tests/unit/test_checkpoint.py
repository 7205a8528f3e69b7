"""CheckpointManager: exact resume, keep-last-k, partial/corrupt skipping, async save, init_from sources."""

import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keye_train.checkpoint.dcp import MARKER_FILE, combine_modules, read_meta
from keye_train.checkpoint.hf import save_keye_hf
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.checkpoint.model_weights import load_model_weights
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.models.siglip_text import SiglipTextTower
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

CFG = tiny()


class CountingLoader:
    """A stand-in data loader whose position is its whole state (like the real loader's sample cursor)."""

    def __init__(self) -> None:
        self.position = 0

    def next_seed(self) -> int:
        self.position += 1
        return self.position % 3

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _objects(seed: int):
    model = build_model(CFG, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, dataloader=CountingLoader())


def _train_step(state: TrainState) -> float:
    """One step that consumes every RNG the checkpoint restores (torch dropout, Python, NumPy)."""
    batch = toy_packed_batch(CFG, seed=state.dataloader.next_seed())
    logits = state.model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )
    logits = F.dropout(logits, p=0.2) * (1.0 + random.random()) * (1.0 + float(np.random.rand()))
    loss_sum, count = token_cross_entropy(logits, batch["labels"])
    loss = loss_sum / count
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.counters["step"] = state.counters.get("step", 0) + 1
    return loss.item()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="interval_steps=0"):
        CheckpointConfig(dir="x", interval_steps=0)
    with pytest.raises(ValueError, match="keep_last=-1"):
        CheckpointConfig(dir="x", keep_last=-1)
    with pytest.raises(ValueError, match="checkpoint.dir"):
        CheckpointConfig(dir=" ")


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path, async_save):
    _seed_all(7)
    reference = _objects(seed=0)
    expected = [_train_step(reference) for _ in range(4)]

    _seed_all(7)
    first = _objects(seed=0)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path), interval_steps=2, async_save=async_save))
    for _ in range(2):
        _train_step(first)
    manager.save(2, first)
    # the save must not depend on the live objects afterwards: keep training them (async staging copies)
    _train_step(first)
    manager.wait()
    assert (tmp_path / "step-2" / MARKER_FILE).is_file()

    _seed_all(999)  # a different process state, as after a restart
    resumed = _objects(seed=1)
    step = CheckpointManager(CheckpointConfig(dir=str(tmp_path))).resume(resumed)
    assert step == 2 and resumed.counters["step"] == 2
    assert resumed.dataloader.position == 2
    assert resumed.scheduler.last_epoch == 2
    continued = [_train_step(resumed) for _ in range(2)]
    assert continued == expected[2:]  # bitwise: float equality of the Python losses
    for (name, p), q in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    state = TrainState(model=build_model(CFG, seed=0))
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path), interval_steps=1, keep_last=2))
    (tmp_path / "step-0").mkdir(parents=True)  # an old partial save: not ours to judge, never deleted
    for step in (1, 2, 3):
        manager.save(step, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0", "step-2", "step-3"]
    assert manager.should_save(4) and not manager.should_save(0)


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_message(tmp_path, capsys):
    state = TrainState(model=build_model(CFG, seed=0), counters={"tokens": 5})
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep_last=0))
    for step in (1, 2, 3, 4, 5):
        manager.save(step, state)
    (tmp_path / "step-5" / MARKER_FILE).unlink()  # crashed before the marker
    (tmp_path / "step-4" / ".metadata").unlink()  # marker but no DCP metadata
    (tmp_path / "step-3" / MARKER_FILE).write_text('{"format_version": 99, "step": 3}')
    data = next((tmp_path / "step-2").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])  # truncated data file
    capsys.readouterr()
    assert manager.latest_complete() == tmp_path / "step-1"
    out = capsys.readouterr().out
    assert f"skipping {tmp_path / 'step-5'}: partial" in out
    assert f"skipping {tmp_path / 'step-4'}: corrupt" in out and ".metadata" in out
    assert f"skipping {tmp_path / 'step-3'}: corrupt: format version 99" in out
    assert f"skipping {tmp_path / 'step-2'}: corrupt: data file" in out
    fresh = TrainState(model=build_model(CFG, seed=3))
    assert manager.resume(fresh) == 1 and fresh.counters == {"tokens": 5, "step": 1}
    with pytest.raises(ValueError, match="step-5.*partial"):
        manager.load(tmp_path / "step-5", fresh)


def test_meta_records_format_config_and_yaml(tmp_path):
    state = TrainState(model=build_model(CFG, seed=0), config_yaml="optim:\n  lr: 0.1\n")
    path = CheckpointManager(CheckpointConfig(dir=str(tmp_path))).save(3, state)
    meta = read_meta(path)
    assert meta["format_version"] == 1 and meta["step"] == 3
    assert meta["config_yaml"] == "optim:\n  lr: 0.1\n"
    assert meta["keye_config"]["language"]["hidden_size"] == CFG.language.hidden_size


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_load_model_weights_from_stage_dir_final_step_and_hf(tmp_path, capsys):
    source = build_model(CFG, seed=0)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "stage")))
    state = TrainState(model=source, optimizer=torch.optim.AdamW(source.parameters()))
    manager.save(1, state)
    # stage dir without `final`: its newest complete step
    target = build_model(CFG, seed=1)
    assert load_model_weights(target, tmp_path / "stage") == tmp_path / "stage" / "step-1"
    assert _same_weights(source, target)
    # `final` is preferred over steps
    with torch.no_grad():
        source.lm_head.weight.add_(1.0)
    manager.save_final(state)
    target = build_model(CFG, seed=1)
    assert load_model_weights(target, tmp_path / "stage") == tmp_path / "stage" / "final"
    assert _same_weights(source, target)
    # a Hugging Face dir goes through hf.py
    save_keye_hf(source.state_dict(), cfg=CFG, out_dir=tmp_path / "hf", dtype="fp32")
    target = build_model(CFG, seed=1)
    load_model_weights(target, tmp_path / "hf")
    assert _same_weights(source, target)


def test_load_model_weights_errors_name_the_path(tmp_path):
    model = build_model(CFG, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"init_from={tmp_path / 'empty'}"):
        load_model_weights(model, tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_model_weights(model, tmp_path / "nowhere")
    # another architecture: a clear error, not a DCP traceback
    other = build_model(tiny(vocab_size=640), seed=0)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "other"))).save(1, TrainState(model=other))
    shutil.rmtree(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"other/step-1 does not fit this model.*embed_tokens"):
        load_model_weights(model, tmp_path / "other")


def test_model_and_text_tower_under_one_optimizer_round_trip(tmp_path):
    def pair(seed):
        torch.manual_seed(seed)
        model, tower = build_model(CFG, seed=seed), SiglipTextTower(CFG.text_tower)
        combined = combine_modules(model, tower)
        return model, tower, combined, torch.optim.AdamW(combined.parameters())

    model, tower, combined, optimizer = pair(0)
    assert set(combined.state_dict()) == set(model.state_dict()) | set(tower.state_dict())
    optimizer.step()  # no grads: nothing changes, but the layout is that of a real run
    CheckpointManager(CheckpointConfig(dir=str(tmp_path))).save(
        1, TrainState(model=combined, optimizer=optimizer)
    )
    model2, tower2, combined2, optimizer2 = pair(1)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path))).resume(
        TrainState(model=combined2, optimizer=optimizer2)
    )
    assert _same_weights(tower, tower2) and _same_weights(model, model2)
