"""The training loop: set-up, one step = microbatches -> optimizer update, evaluation, checkpoints, stop."""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from keye_train.checkpoint.manager import CheckpointManager, TrainState
from keye_train.config.schema import TrainConfig
from keye_train.data.batch import PackedBatch
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.train.build import (
    build_indexed_loader,
    build_stream,
    build_tokenizer,
    build_weights,
    keye_config,
)
from keye_train.train.metrics import MetricsLogger
from keye_train.train.optim import build_optimizer, clip_grad_norm, grads_are_finite
from keye_train.train.schedule import build_scheduler
from keye_train.train.stages import apply_stage, module_groups
from keye_train.train.step import LanguageModelStep

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
        self.rank = dist.get_rank() if dist.is_initialized() else 0
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
        self.params = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
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
            model=self.checkpointed_model,
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
        self.model, _ = build_weights(cfg, self.keye_cfg, device=self.device)
        # Freeze before sharding: every FSDP unit must be all-trainable or all-frozen.
        apply_stage(self.model, None, cfg.stage)
        self.keye_cfg = self.model.cfg  # a RoPE reset is recorded in the model's config
        if self.dims.pp > 1:
            return self._build_pipeline()
        from keye_train.distributed.parallelize import parallelize

        parallelize(self.model, dims=self.dims, cfg=cfg.parallel, precision=cfg.precision)
        self.checkpointed_model = self.model
        self.lm_step = LanguageModelStep(
            model=self.model,
            dims=self.dims,
            loss_parallel=cfg.parallel.tensor.loss_parallel,
            device=self.device,
        )
        return {k: v for k, v in module_groups(self.model, None).items() if k in cfg.stage.train}

    def _build_pipeline(self) -> dict[str, torch.nn.Module]:
        from keye_train.train.pipeline_step import PipelineTrainStep

        data = self.cfg.data
        if data.eval_interval and data.eval_manifest and data.eval_batches % data.microbatches:
            # The schedule's stages keep the training step's microbatch shape: evaluate in whole steps.
            raise ValueError(
                f"data.eval_batches={data.eval_batches} must be a multiple of data.microbatches="
                f"{data.microbatches} under parallel.pp > 1 (evaluation runs the pipeline in training-step "
                "groups of rows)"
            )

        self.pp_step = PipelineTrainStep(self.model, dims=self.dims, cfg=self.cfg, device=self.device)
        stages = self.pp_step.stages
        # Checkpoint names stay the full model's (stages keep global layer keys): resumable in any layout.
        self.checkpointed_model = self.pp_step.checkpoint_view()
        replicated = (self.model.visual, self.model.mlp_AR)
        self.pp_replicated = [p for m in replicated for p in m.parameters() if p.requires_grad]
        groups = {
            "vit": self.model.visual,
            "projector": self.model.mlp_AR,
            "llm": torch.nn.ModuleList(stages),
        }
        return {k: v for k, v in groups.items() if k in self.cfg.stage.train}

    def build_stream(self):
        if self.cfg.data.loader == "indexed":
            return build_indexed_loader(self.cfg, self.tokenizer, dims=self.dims)
        return build_stream(self.cfg, self.tokenizer)

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
            print(message, flush=True)

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
        flag = torch.tensor([float(self.stop_requested)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_checkpoint(self) -> None:
        self._sync_counters()
        self.checkpoints.save(self.step, self.state)

    # -- one optimizer step -------------------------------------------------------------------------
    def next_step_input(self) -> StepInput:
        """This rank's packed rows of the step, the step's global sample keys and target-token count."""
        per_rank = self.cfg.data.microbatches
        if self.cfg.data.loader == "indexed":
            step = self.stream.next_step()
            mine = step.microbatches
            totals = torch.tensor(
                [sum(b.num_target_tokens for b in mine), sum(b.input_ids.numel() for b in mine)],
                dtype=torch.float64,
            )
            if self.dims.dp > 1:  # TP/CP/PP peers of a replica hold the same rows: sum over replicas only
                dist.all_reduce(totals, group=self.dims.submesh("dp").get_group())
            report = {f"plan_{k}": float(v) for k, v in step.report.items() if isinstance(v, (int, float))}
            return StepInput(step.global_keys, mine, totals[0].item(), int(totals[1]), report=report)
        # The stream loader: every rank reads the whole global batch and keeps its DP replica's rows.
        rows = [self.stream.next_batch() for _ in range(self.dims.dp * per_rank)]
        replicas = [rows[d * per_rank : (d + 1) * per_rank] for d in range(self.dims.dp)]
        return StepInput(
            keys=[key for b in rows for key in b.sample_keys],
            mine=replicas[self.dims.dp_rank],
            global_count=float(sum(b.num_target_tokens for b in rows)),
            tokens=sum(b.input_ids.numel() for b in rows),
        )

    def train_step(self) -> None:
        started = time.perf_counter()
        step = self.next_step_input()
        global_count = torch.tensor(max(1.0, step.global_count))
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(step, global_count=global_count)
        extra = dict(step.report)
        if self.dims.pp > 1 and self.pp_step.visual_report is not None:
            # How the heterogeneous ViT spread this step's images and frames over the world.
            spread = self.pp_step.visual_report
            extra.update(
                vit_imbalance=spread.imbalance,
                vit_patches_max=max(spread.patches_per_rank),
                vit_patches_min=min(spread.patches_per_rank),
            )
        self._finish_step(
            loss=loss,
            tokens=step.tokens,
            keys=step.keys,
            started=started,
            rank_load=float(sum(b.num_target_tokens for b in step.mine)),
            extra=extra,
            flops=self._step_flops(step.mine),
        )

    def _step_flops(self, mine: list[PackedBatch]) -> float | None:
        """Model FLOPs of the global batch (keye-estimate's convention) when MFU is asked for."""
        if self.cfg.peak_tflops is None:
            return None
        from keye_train.distributed.accounting import packed_batch_flops

        local = sum(
            packed_batch_flops(self.keye_cfg, cu_seqlens=b.cu_seqlens.tolist(), grid_thw=b.grid_thw.tolist())
            for b in mine
        )
        total = torch.tensor(local, dtype=torch.float64)
        if self.dims.dp > 1:  # peers inside a replica hold the same rows: sum over replicas only
            dist.all_reduce(total, group=self.dims.submesh("dp").get_group())
        return total.item()

    def _finish_step(
        self,
        *,
        loss: float,
        tokens: int,
        keys: list[str],
        started: float,
        rank_load: float,
        extra: dict[str, float] | None = None,
        flops: float | None = None,
    ) -> None:
        """The optimizer update of a step whose gradients are in place, then its metrics record."""
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        grad_norm = self._update(loss)
        step_time = time.perf_counter() - started
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
            rank_tokens=self._gather(rank_load),
            extra=extra,
            flops_per_step=flops,
            peak_flops=None if flops is None else self.cfg.peak_tflops * 1e12 * self.dims.world_size,
        )
        self.step += 1

    def _gather(self, value: float) -> list[float]:
        """One number from every rank (per-rank imbalance in the metrics)."""
        if self.dims.world_size == 1:
            return [value]
        out = [torch.zeros(1) for _ in range(self.dims.world_size)]
        dist.all_gather(out, torch.tensor([value]))
        return [t.item() for t in out]

    def _forward_backward(self, step: StepInput, *, global_count: torch.Tensor) -> float:
        """Gradients of the step's globally normalised loss; returns the loss (the same on every rank)."""
        if self.dims.pp > 1:
            return self.pp_step(step.mine, global_count=global_count)
        loss_sum = 0.0
        for index, batch in enumerate(step.mine):
            self._prepare_microbatch(is_last=index == len(step.mine) - 1)
            loss_sum += self.lm_step(batch, global_count=global_count)[0]
        return self._global_loss(loss_sum) / global_count.item()

    def _prepare_microbatch(self, *, is_last: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):
            from keye_train.distributed.fsdp import set_microbatch

            set_microbatch(self.model, is_last=is_last)

    def _global_loss(self, local_sum: float) -> float:
        """Sum of the loss sums of every rank that saw different tokens (TP peers hold the same value)."""
        total = torch.tensor(local_sum, dtype=torch.float64)
        if self.dims.world_size > 1:
            dist.all_reduce(total, group=self.dims.submesh("dp_cp").get_group())
        return total.item()

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
        params, pipeline = self.params, {}
        if self.dims.pp > 1:  # stage norms add up over pp; the replicated ViT and projector count once
            shared = {id(p) for p in self.pp_replicated}
            params = [p for p in self.params if id(p) not in shared]
            pipeline = {"pp_group": self.dims.submesh("pp"), "pp_replicated_params": self.pp_replicated}
        norm = clip_grad_norm(params, self.cfg.optim.grad_clip, **pipeline)  # None: measure only
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    # -- evaluation ---------------------------------------------------------------------------------
    def maybe_evaluate(self) -> None:
        data = self.cfg.data
        if not data.eval_manifest or not data.eval_interval or self.step % data.eval_interval:
            return
        mine, count = self._eval_set()
        with torch.no_grad():
            if self.dims.pp > 1:
                per_step = data.microbatches
                groups = [mine[i : i + per_step] for i in range(0, len(mine), per_step)]
                eval_loss = sum(self.pp_step(rows, global_count=count, backward=False) for rows in groups)
            else:
                local = sum(self.lm_step(b, global_count=count, backward=False)[0] for b in mine)
                eval_loss = self._global_loss(local) / count.item()
        sequences = self.dims.dp * data.eval_batches
        self._log(f"step {self.step}: eval loss {eval_loss:.4f} over {sequences} held-out sequences")
        if self.rank == 0:
            with open(Path(self.cfg.run_dir) / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "eval_loss": eval_loss}) + "\n")

    def _eval_set(self) -> tuple[list[PackedBatch], torch.Tensor]:
        """This replica's held-out rows and the target count of all of them: the same at every
        evaluation, so they are read and decoded once."""
        if not hasattr(self, "_eval_cache"):
            data = self.cfg.data
            stream = build_stream(self.cfg, self.tokenizer, manifest=data.eval_manifest)
            batches = [stream.next_batch() for _ in range(self.dims.dp * data.eval_batches)]
            count = torch.tensor(float(max(1, sum(b.num_target_tokens for b in batches))))
            start = self.dims.dp_rank * data.eval_batches
            self._eval_cache = (batches[start : start + data.eval_batches], count)
        return self._eval_cache
