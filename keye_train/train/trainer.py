"""The training loop: set-up, one step = microbatches -> optimizer update, evaluation, checkpoints, stop."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keye_train.checkpoint.manager import CheckpointManager, TrainState
from keye_train.config.schema import TrainConfig
from keye_train.data.batch import PackedBatch
from keye_train.distributed.collectives import gather_scalars, max_scalars, rank_in, sum_scalars
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.train.build import (
    build_loader,
    build_tokenizer,
    build_weights,
    keye_config,
)
from keye_train.train.metrics import MetricsLogger
from keye_train.train.optim import build_optimizer, grads_are_finite
from keye_train.train.schedule import build_scheduler
from keye_train.train.stages import apply_stage
from keye_train.train.step import StepResult, TrainStep, build_train_step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StepInput:
    keys: list[str]  # every sample of the global batch, in a layout-independent order
    mine: list[PackedBatch]  # this rank's packed rows
    global_count: float  # target tokens of the whole global batch (the loss normaliser)
    tokens: int  # tokens of the whole global batch
    report: dict[str, float] = field(default_factory=dict)  # the planner's balance report (indexed loader)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, *, dims: ParallelDims, device: torch.device, resolved_yaml: str
    ) -> None:
        self.cfg = cfg
        self.dims = dims
        self.device = device
        self.resolved_yaml = resolved_yaml
        self.rank = rank_in(dims, over="world")
        self.stop_requested = False
        self.step = 0
        self.nonfinite_steps = 0

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.tokenizer = build_tokenizer(cfg)
        self.keye_cfg = keye_config(cfg, self.tokenizer)
        trained = self.build_model()
        self.optimizer = build_optimizer(trained, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.params = self.train_step_impl.trained_parameters
        self.stream = self.build_stream()
        self.metrics = MetricsLogger(
            cfg.logging,
            run_dir=cfg.run_dir,
            rank=self.rank,
            total_steps=cfg.steps,
            run_config={"recipe": self.resolved_yaml},
            first_record={"precision": cfg.precision},
        )
        self.checkpoints = CheckpointManager(cfg.checkpoint, log=self._log)
        self.state = TrainState(
            model=self.train_step_impl.checkpointed_model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            dataloader=self.stream,
            counters={},
            config_yaml=self.resolved_yaml,
            keye_cfg=self.keye_cfg,
        )
        if cfg.resume and self.checkpoints.resume(self.state) is not None:
            self._restore_counters()
            self._log(f"resumed at step {self.step}; data state {self.stream.state_dict()}")

    def build_model(self) -> dict[str, torch.nn.Module]:
        """The model on this rank, frozen per stage and parallelised; returns the trained module groups."""
        cfg = self.cfg
        lm = self.keye_cfg.language
        self.dims.validate_for_model(
            num_layers=lm.num_layers, num_heads=lm.num_heads, num_kv_heads=lm.num_kv_heads
        )
        if self.dims.cp > 1 and cfg.parallel.context.cp_impl != "ulysses":
            raise ValueError(
                f"parallel.context.cp_impl={cfg.parallel.context.cp_impl!r}: the trainer drives Ulysses CP "
                "only; ring attention exists in distributed/context_parallel.py, not yet wired into training"
            )
        self.model, tower = build_weights(cfg, self.keye_cfg, device=self.device)
        # Freeze before sharding: every FSDP unit must be all-trainable or all-frozen.
        apply_stage(self.model, tower, cfg.stage)
        self.keye_cfg = self.model.cfg  # a RoPE reset is recorded in the model's config
        # The one step protocol: the plain, pipeline or SigLIP step (chosen by build_train_step).
        self.train_step_impl: TrainStep = build_train_step(
            self.model, tower=tower, cfg=cfg, dims=self.dims, device=self.device
        )
        return self.train_step_impl.trained_groups

    def build_stream(self):
        """The run's loader: planned from the shard indexes, built when missing (data/loader/planned.py)."""
        return build_loader(self.cfg, self.tokenizer, dims=self.dims)

    def _restore_counters(self) -> None:
        counters = self.state.counters
        self.step = int(counters["step"])
        self.nonfinite_steps = int(counters["nonfinite_steps"])
        self.metrics.load_state_dict(counters["metrics"])

    def _sync_counters(self) -> None:
        self.state.counters.update(
            step=self.step, nonfinite_steps=self.nonfinite_steps, metrics=self.metrics.state_dict()
        )

    def _log(self, message: str) -> None:
        if self.rank == 0:
            # Through the metrics logger once it exists: the line goes above the tqdm bar (issue 13).
            metrics = getattr(self, "metrics", None)
            (metrics.print_line if metrics is not None else print)(message)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        try:
            while self.step < self.cfg.steps:
                self.train_step()
                if self._stop_agreed():
                    self._log(f"stop signal received: checkpointing step {self.step} and exiting")
                    self.save_checkpoint()
                    return
                if self.checkpoints.should_save(self.step):
                    self.save_checkpoint()
                self.maybe_evaluate()
            if not self.checkpoints.should_save(self.step):  # the last step's checkpoint, once
                self.save_checkpoint()
            self.checkpoints.save_final(self.state)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.checkpoints.close()
            self.metrics.close()
            if hasattr(self.stream, "close"):
                self.stream.close()  # the indexed loader's prefetch thread and decoding workers

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True  # acted on at the end of the step, after every rank agrees

    def _stop_agreed(self) -> bool:
        return bool(max_scalars(self.dims, [float(self.stop_requested)], over="world")[0])

    def save_checkpoint(self) -> None:
        self._sync_counters()
        self.checkpoints.save(self.step, self.state)

    # -- one optimizer step -------------------------------------------------------------------------
    def next_step_input(self) -> StepInput:
        """This rank's packed rows of the step, the step's global sample keys and target-token count."""
        return self._step_input(self.stream.next_step())

    def _step_input(self, step) -> StepInput:
        mine = step.microbatches
        # TP/CP/PP peers of a replica hold the same rows: sum over replicas only.
        totals = sum_scalars(
            self.dims,
            [sum(b.num_target_tokens for b in mine), sum(b.input_ids.numel() for b in mine)],
            over="dp",
        )
        report = {f"plan_{k}": float(v) for k, v in step.report.items() if isinstance(v, (int, float))}
        return StepInput(step.global_keys, mine, totals[0], int(totals[1]), report=report)

    def train_step(self) -> None:
        started = time.perf_counter()
        step = self.next_step_input()
        global_count = torch.tensor(max(1.0, step.global_count))
        self.optimizer.zero_grad(set_to_none=True)
        result = self.train_step_impl.forward_backward(step.mine, global_count=global_count)
        self._finish_step(
            result=result,
            tokens=step.tokens,
            keys=step.keys,
            started=started,
            extra=dict(step.report),
            flops=self._step_flops(step.mine),
        )

    def _step_flops(self, mine: list) -> float | None:
        """Model FLOPs of the global batch (keye-estimate's convention) when MFU is asked for."""
        if self.cfg.peak_tflops is None:
            return None
        local = self.train_step_impl.local_flops(mine, self.keye_cfg)
        if local is None:
            return None
        # Peers inside a replica hold the same rows: sum over replicas only.
        return sum_scalars(self.dims, [local], over="dp")[0]

    def _finish_step(
        self,
        *,
        result: StepResult,
        tokens: int,
        keys: list[str],
        started: float,
        extra: dict[str, float] | None = None,
        flops: float | None = None,
    ) -> None:
        """The optimizer update of a step whose gradients are in place, then its metrics record."""
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        loss = result.loss
        grad_norm = self._update(loss)
        step_time = time.perf_counter() - started
        extra = dict(extra or {})
        per_rank = {}
        if result.vit_patches_global:
            # How the heterogeneous ViT spread this step's images and frames: each is encoded once in the
            # world, so the per-rank counts add up to the global batch's patches.
            extra.update(vit_patches_global=result.vit_patches_global, vit_imbalance=result.vit_imbalance)
            per_rank["vit_patches"] = self._gather(result.vit_patches)
        self.metrics.log_step(
            self.step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens=tokens,
            samples=len(keys),
            step_time_s=step_time,
            sample_keys=keys,
            skipped_samples=sum(self.stream.counter.skipped.values()),
            rank_step_times_s=self._gather(step_time),
            rank_tokens=self._gather(result.rank_load),
            extra=extra,
            per_rank=per_rank,
            flops_per_step=flops,
            peak_flops=None if flops is None else self.cfg.peak_tflops * 1e12 * self.dims.world_size,
        )
        self.step += 1

    def _gather(self, value: float) -> list[float]:
        """One number from every rank (per-rank imbalance in the metrics)."""
        return gather_scalars(self.dims, value, over="world")

    def _update(self, loss: float) -> float | None:
        """Clip, then step unless the loss or a gradient is not finite (skipped and counted)."""
        finite = math.isfinite(loss) and grads_are_finite(self.params)
        if not finite:
            self.nonfinite_steps += 1
            self._log(
                f"step {self.step + 1}: non-finite loss or gradient, update skipped ({self.nonfinite_steps})"
            )
            if self.nonfinite_steps > self.cfg.max_nonfinite_steps:
                raise RuntimeError(
                    f"{self.nonfinite_steps} steps had a non-finite loss or gradient (max_nonfinite_steps="
                    f"{self.cfg.max_nonfinite_steps}); lower the learning rate or inspect the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            return None
        norm = self.train_step_impl.clip_grad_norm(self.cfg.optim.grad_clip)  # None: measure only
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    # -- evaluation ---------------------------------------------------------------------------------
    def maybe_evaluate(self) -> None:
        data = self.cfg.data
        if not data.eval_manifest or not data.eval_interval or self.step % data.eval_interval:
            return
        mine, count = self._eval_set()
        eval_loss = self.train_step_impl.evaluate(mine, global_count=count)
        sequences = self.dims.dp * data.eval_batches
        self._log(f"step {self.step}: eval loss {eval_loss:.4f} over {sequences} held-out sequences")
        if self.rank == 0:
            with open(Path(self.cfg.run_dir) / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "eval_loss": eval_loss}) + "\n")

    def _eval_set(self) -> tuple[list[PackedBatch], torch.Tensor]:
        """This replica's held-out rows and the target count of all of them: one planned step of
        data.eval_batches rows per replica over the eval manifest, the same at every evaluation, so
        it is read and decoded once."""
        if not hasattr(self, "_eval_cache"):
            data = self.cfg.data
            loader = build_loader(
                self.cfg,
                self.tokenizer,
                dims=self.dims,
                manifest=data.eval_manifest,
                microbatches=data.eval_batches,
                prefetch=0,
            )
            try:
                step = self._step_input(loader.next_step())
            finally:
                loader.close()
            self._eval_cache = (step.mine, torch.tensor(float(max(1.0, step.global_count))))
        return self._eval_cache
