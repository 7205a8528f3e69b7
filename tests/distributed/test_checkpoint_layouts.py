"""DCP checkpoints move between layouts: FSDP (DP2) <-> one process <-> TP2, with training state intact."""

import pytest
import torch
from harness import run_ranks

from keye_train.checkpoint.hf import save_keye_hf
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.checkpoint.model_weights import load_model_weights
from keye_train.distributed.fsdp import apply_fsdp
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.tensor_parallel import apply_tensor_parallel
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

pytestmark = pytest.mark.dist

CFG = tiny()


def _forward(model) -> torch.Tensor:
    batch = toy_packed_batch(CFG, seed=0)
    return model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )


def _step(model, optimizer) -> float:
    loss_sum, count = token_cross_entropy(_forward(model), toy_packed_batch(CFG, seed=0)["labels"])
    loss = loss_sum / count
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _fsdp_model(world_size: int, seed: int):
    model = build_model(CFG, seed=seed)
    # fp32 compute so the sharded and the single-process model run the same arithmetic
    return apply_fsdp(model, dims=ParallelDims(world_size=world_size), precision="fp32")


def _fsdp_rank(rank, world_size, ckpt_dir, hf_dir):
    model = _fsdp_model(world_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(CheckpointConfig(dir=ckpt_dir, async_save=True))
    state = TrainState(model=model, optimizer=optimizer, counters={"step": 1})
    _step(model, optimizer)
    moments = _moments(model, optimizer)
    manager.save(1, state)  # async, on its own gloo group, while the next step runs collectives
    second_loss = _step(model, optimizer)
    manager.close()
    # init_from a Hugging Face dir into a sharded model (DTensor parameters)
    fresh = _fsdp_model(world_size, seed=5)
    load_model_weights(fresh, hf_dir, log=lambda _: None)
    with torch.no_grad():
        hf_logits = _forward(fresh)
    return {"second_loss": second_loss, "hf_logits": hf_logits, "moments": moments}


def _moments(model, optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) AdamW moments by parameter name."""
    out = {}
    for name, param in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            if param in optimizer.state:
                value = optimizer.state[param][key]
                out[f"{name}.{key}"] = value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
    return out


def test_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    source = build_model(CFG, seed=1)
    save_keye_hf(source.state_dict(), cfg=CFG, out_dir=tmp_path / "hf", dtype="fp32")
    results = run_ranks(_fsdp_rank, world_size=2, args=(str(tmp_path / "ckpt"), str(tmp_path / "hf")))

    model = build_model(CFG, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState(model=model, optimizer=optimizer)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt")))
    assert manager.resume(state) == 1
    # the AdamW moments were resharded from two FSDP shards into one process, exactly
    moments = _moments(model, optimizer)
    assert moments.keys() == results[0]["moments"].keys() and len(moments) > 0
    for key, value in results[0]["moments"].items():
        assert torch.equal(moments[key], value), key
    # the weights came along: the next loss matches the sharded run's
    loss = _step(model, optimizer)
    for result in results:
        assert result["second_loss"] == pytest.approx(loss, rel=1e-5)
    with torch.no_grad():
        expected = _forward(source)
    for result in results:
        torch.testing.assert_close(result["hf_logits"], expected, rtol=1e-5, atol=1e-5)


def _tp_rank(rank, world_size, source_dir, out_dir):
    dims = ParallelDims(world_size=world_size, tp=world_size)
    model = build_model(CFG, seed=5)
    apply_tensor_parallel(model, tp_mesh=dims.submesh("tp"), sequence_parallel=False, loss_parallel=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState(model=model, optimizer=optimizer)
    manager = CheckpointManager(CheckpointConfig(dir=out_dir))
    step = manager.load(source_dir, state)
    with torch.no_grad():
        logits = _forward(model)
    manager.save(step + 1, state)
    return {"logits": logits, "step": step, "exp_avg_norm": _exp_avg_norm(optimizer)}


def _exp_avg_norm(optimizer) -> float:
    total = 0.0
    for param_state in optimizer.state.values():
        moment = param_state["exp_avg"]
        moment = moment.full_tensor() if hasattr(moment, "full_tensor") else moment
        total += float(moment.double().pow(2).sum())
    return total


def test_single_process_checkpoint_loads_under_tp2_and_back(tmp_path):
    model = build_model(CFG, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optimizer)
    state = TrainState(model=model, optimizer=optimizer, counters={"step": 4})
    source_dir = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "single"))).save(4, state)
    with torch.no_grad():
        expected = _forward(model)

    results = run_ranks(_tp_rank, world_size=2, args=(str(source_dir), str(tmp_path / "tp")))
    for result in results:
        assert result["step"] == 4
        torch.testing.assert_close(result["logits"], expected, rtol=1e-5, atol=1e-5)
        assert result["exp_avg_norm"] == pytest.approx(_exp_avg_norm(optimizer), rel=1e-6)

    # and the TP2-written checkpoint loads back into one process unchanged
    back = build_model(CFG, seed=9)
    load_model_weights(back, tmp_path / "tp")
    for (name, original), loaded in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(loaded, original), name
