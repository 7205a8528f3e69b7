"""Spawn gloo process groups on this CPU and compute single-process references for parallel layouts."""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keye_train.distributed.parallel_dims import shutdown_distributed
from keye_train.models.configs import KeyeConfig
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

# Parity tests train with SGD (momentum 0.9), never several AdamW steps: SGD's update is linear in the
# gradient, so a layout's round-off in a gradient moves a parameter by about lr times that round-off.
# Adam divides by sqrt(v) + eps and turns a round-off-sized gradient into an lr-sized step, so after a few
# AdamW steps single elements differ by a large fraction of lr under a different reduction order
# (issue 13: 0.06 and 0.2 relative on a loaded machine). Momentum gives the optimizer a state, so the
# tests still see which parameters hold one. lr 0.5: the smallest gradients the tests check for movement
# (~5e-3) move a parameter ~100x PARAM_ATOL.
PARITY_LR = 0.5
# fp32 gradients agree to ~1e-7 across layouts; two SGD steps move parameters by lr * (1.9 g1 + g2).
PARAM_ATOL, PARAM_RTOL = 1e-5, 1e-5


def parity_optimizer(params, *, lr: float = PARITY_LR) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


# Ranks are forked from one server process that has imported torch and the trainer already
# (keye_train.testing.rank_preload, an installed module: Python 3.11's fork server ignores the tests'
# sys.path), not spawned as fresh interpreters that each import them (and pytest) again: ~4 CPU-s per
# rank, most of a small layout's time on a loaded 2-core machine. Forking is safe: the server only imports
# (no process group, no parallel op); each rank sets its threads and joins its group after the fork.
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["keye_train.testing.rank_preload"])  # the server starts on first use


def _entry(rank: int, world_size: int, store: str, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # several ranks share 2 cores: oversubscription would only slow them down
    # A file rendezvous, not a TCP port: a port picked free here can be taken by another test process
    # (several suites share the machine) before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        # No barrier: a rank that failed must not wait for peers that will never arrive.
        shutdown_distributed(barrier=False)


def run_ranks(fn: Callable, *, world_size: int, args: tuple = (), timeout_s: float = 240) -> list:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; returns every rank's return value.

    fn must be a module-level function (it is pickled into the forked processes).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        store = os.path.join(out_dir, "rendezvous")
        procs = [
            _CONTEXT.Process(target=_entry, args=(rank, world_size, store, fn, args, out_dir))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        for rank in range(world_size):
            err = os.path.join(out_dir, f"rank{rank}.err")
            if os.path.exists(err):
                with open(err) as f:
                    errors.append(f"--- rank {rank} ---\n" + f.read())
        if errors or hung or any(p.exitcode != 0 for p in procs):
            raise RuntimeError(
                f"distributed run failed (hung ranks: {hung}, exit codes: {[p.exitcode for p in procs]})\n"
                + "\n".join(errors)
            )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]


def reference_run(
    cfg: KeyeConfig, *, steps: int = 2, lr: float = PARITY_LR, seed: int = 0, seq_len: int | None = None
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process reference: `steps` SGD steps on the toy batch; losses and updated parameters."""
    model = build_model(cfg, seed=seed)
    batch = toy_packed_batch(cfg, seed=seed, seq_len=seq_len)
    optimizer = parity_optimizer(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            pixel_values=batch["pixel_values"],
            grid_thw=batch["grid_thw"],
        )
        loss_sum, count = token_cross_entropy(logits, batch["labels"])
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
