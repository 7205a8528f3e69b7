"""parallelize() at world = 1: compile (inductor on CPU) and activation checkpointing apply without FSDP,
and the step equals eager; bf16 autocast wraps the forward with fp32 master weights."""

import pytest
import torch

from keye_train.distributed.activation_checkpoint import ActivationCheckpointConfig, transformer_blocks
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import ParallelConfig, parallelize
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.testing.packed_row import row_loss_backward
from keye_train.testing.toy_batch import toy_packed_batch


def _step(model, batch):
    loss = row_loss_backward(model, batch)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(cfg: ParallelConfig, *, precision: str = "fp32"):
    model = build_model(tiny(), seed=0)
    parallelize(model, dims=ParallelDims(world_size=1), cfg=cfg, precision=precision)
    return model, _step(model, toy_packed_batch(tiny()))


def _assert_same(got, ref, tol):
    torch.testing.assert_close(got[0], ref[0], atol=tol, rtol=tol)
    assert got[1].keys() == ref[1].keys()
    for name, g in got[1].items():
        torch.testing.assert_close(g, ref[1][name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_compile_with_inductor_and_ac_equal_eager_at_world_1():
    torch._dynamo.reset()
    _, eager = _run(ParallelConfig())
    compiled_model, compiled = _run(ParallelConfig(compile=True, ac=ActivationCheckpointConfig(mode="full")))
    blocks = [b for tower in transformer_blocks(compiled_model).values() for b in tower]
    assert len(blocks) == 4 and all(getattr(b, "_keye_checkpointed", False) for b in blocks)  # AC, no FSDP
    # compiled: each checkpoint runs a torch.compile'd inner forward (inductor, the default backend)
    assert all(b.forward.args[0] is not b._keye_inner_forward for b in blocks)
    # The wrappers keep every parameter's name (checkpoints and optimizer state are keyed by them).
    names = [n for n, _ in build_model(tiny(), seed=0).named_parameters()]
    assert [n for n, _ in compiled_model.named_parameters()] == names
    _assert_same(compiled, eager, 1e-5)


def test_compile_backend_is_validated():
    with pytest.raises(ValueError, match="parallel.compile_backend='tvm' must be one of"):
        ParallelConfig(compile=True, compile_backend="tvm")


def test_bf16_autocast_at_world_1_keeps_fp32_masters():
    model, (loss, grads) = _run(ParallelConfig(), precision="bf16")
    _, (ref_loss, _) = _run(ParallelConfig())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert loss.dtype == torch.float32
    assert loss.item() != ref_loss.item()  # bf16 compute did happen ...
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)  # ... and stays close to fp32
