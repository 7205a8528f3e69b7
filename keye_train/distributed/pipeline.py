"""Pipeline parallelism of the decoder: manual stage split and torch.distributed.pipelining schedules.

How the inputs of a packed batch reach the stages (fixed shapes, so the schedule can cut microbatches
along the batch dimension; the layout helpers are `packed_rows.py`'s):

- stage 0 gets `input_ids` (B, S) and `visual` (B, S, D): the visual embeddings, encoded before the
  schedule runs (by the ViT router, which spreads them over all ranks), written densely at their
  placeholder slots. Variable-length visual embeddings cannot be chunked by the schedule; their dense
  (B, S, D) form can, and is no larger than the stage's own embedding output.
- every stage gets `position_ids` (3, B, S) (each layer applies M-RoPE) and `document_ids` (B, S) as
  keyword inputs of its own `step` call: each PP rank has the batch's small metadata, so nothing beyond
  the hidden states crosses the stage boundary and no integer tensor enters the P2P gradient traffic.
  cu_seqlens is variable-length, so each stage recomputes it per microbatch from the document ids.
- every stage also gets `labels` (B, S) as a keyword input (the others ignore it): the last stage's
  forward computes the LM head's chunked cross entropy (`models/lm_head.py`) and returns the summed
  loss of its microbatch, a scalar, instead of logits. Computing the loss in a `loss_fn` over returned
  logits would hold the microbatch's whole [tokens x vocab] fp32 logits, their log-softmax and their
  gradient; inside the stage's forward the head runs chunk by chunk, and the FSDP / TP hooks of the stage
  still wrap the head weight's use. The schedule's loss_fn only divides that sum by the number of
  target tokens of the whole global batch (`loss_kwargs`), so the microbatch losses of all DP replicas
  add up to the single-process mean loss. The labels also travel as the schedule's target, which the
  schedule requires on the last stage but the loss no longer reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.microbatch import TensorChunkSpec
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from keye_train.distributed.packed_rows import (
    cu_seqlens_from_document_ids,
    document_ids_from_cu_seqlens,
    visual_slots,
)
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.pipeline_config import SCHEDULE_PLACEMENT, PipelineConfig
from keye_train.models.language import Qwen3Model

# schedule name -> torch class (its stage placement over pp ranks: pipeline_config.SCHEDULE_PLACEMENT)
SCHEDULES = {
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
assert SCHEDULES.keys() == SCHEDULE_PLACEMENT.keys()

LossFn = Callable[..., Tensor]


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Contiguous layer ids per stage; the first stages take one extra layer when it does not divide."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, *, pp: int, virtual_stages: int, style: str) -> list[int]:
    """Stage indices held by one pp rank: round-robin ("loop") or V-shaped ("v", ZBV)."""
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


def normalised_stage_loss(loss_sum: Tensor, target: Tensor, *, num_target_tokens: int | Tensor) -> Tensor:
    """The last stage's summed cross entropy of one microbatch divided by the global batch's target tokens.

    `target` (the microbatch's labels) is unused: the stage already computed the chunked loss from the
    labels it got as a keyword input. Under TP the head hands back a plain tensor, already reduced over tp.
    """
    del target
    return loss_sum / num_target_tokens


class DecoderStage(nn.Module):
    """One pipeline stage of the decoder; parameter names equal the full model's (`model.layers.7...`).

    `self.model` is a Qwen3Model holding (references to) this stage's layers under their global keys, the
    token embedding on the first stage and the final norm on the last (None elsewhere), so whatever
    parallelises a whole model (TP plans, FSDP, hooks on `model.model`) applies to a stage unchanged.
    The first stage also splices the visual embeddings; the last applies lm_head, with labels as the
    chunked loss (whose `chunk_tokens` is the shared head's, i.e. the run's `loss.chunk_tokens`).
    """

    def __init__(self, model: nn.Module, *, layer_ids: Sequence[int], first: bool, last: bool) -> None:
        super().__init__()
        decoder = model.model
        self.visual_token_ids = tuple(model.visual_token_ids)
        self.first, self.last = first, last
        # Built empty on the meta device (no memory), then given the full model's own submodules.
        with torch.device("meta"):
            self.model = Qwen3Model(dataclasses.replace(decoder.cfg, num_layers=0))
        self.model.cfg = decoder.cfg
        self.model.embed_tokens = decoder.embed_tokens if first else None
        self.model.layers = nn.ModuleDict({str(i): decoder.layers[str(i)] for i in layer_ids})
        self.model.norm = decoder.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(
        self, *inputs: Tensor, position_ids: Tensor, document_ids: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """First stage: (input_ids, visual) -> hidden; middle: hidden -> hidden; last: ... -> the summed
        cross entropy over the labels' target tokens (a scalar), or logits when no labels are given."""
        if self.first:
            input_ids, visual = inputs
            hidden = self.model.embed_tokens(input_ids)
            is_visual = torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))
            hidden = torch.where(is_visual[..., None], visual.to(hidden.dtype), hidden)
        else:
            (hidden,) = inputs
        cu_seqlens = cu_seqlens_from_document_ids(document_ids)
        hidden = self.model(hidden, position_ids=position_ids, cu_seqlens=cu_seqlens)
        if not self.last:
            return hidden
        if labels is None:
            return self.lm_head(hidden)
        # The head's own forward runs the chunked loss, so no [tokens x vocab] logits exist (lm_head.py);
        # the count is not needed here: loss_fn divides by the global batch's target tokens.
        loss_sum, _ = self.lm_head(hidden, labels=labels)
        return loss_sum


@dataclass
class Pipeline:
    """This rank's stage modules and the schedule that drives them."""

    stages: list[DecoderStage]
    schedule: object
    config: PipelineConfig
    visual_token_ids: tuple[int, ...]
    hidden_size: int
    loss_parallel: bool = False
    pipeline_stages: list[PipelineStage] = field(repr=False, default_factory=list)

    @property
    def has_first_stage(self) -> bool:
        return any(s.first for s in self.stages)

    @property
    def has_last_stage(self) -> bool:
        return any(s.last for s in self.stages)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for stage in self.stages:
            yield from stage.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def step(
        self,
        batch: dict[str, Tensor],
        *,
        visual_embeds: Tensor | None,
        num_target_tokens: int | Tensor,
        backward: bool = True,
    ) -> Tensor | None:
        """Forward and backward of one global batch of fixed-length rows (this DP replica's share).

        batch: input_ids, labels (B, S), position_ids (3, B, S), cu_seqlens over the B*S tokens. Every pp
        rank passes the same batch metadata; visual_embeds are this replica's visual tokens in order on
        the rank holding stage 0 (possibly an empty routed tensor elsewhere). With context parallelism the
        per-token tensors are this CP rank's `split_for_context_parallel` slice, cu_seqlens stays the full
        rows' and visual_embeds are the slice's own (`local_visual_embeds`). Gradients reach the
        visual_embeds' graph after the schedule, on every rank that passed a tensor requiring grad, so a
        routed ViT's reverse all-to-all runs on all ranks. Returns the summed microbatch losses on the
        rank holding the last stage, None elsewhere. backward=False runs the forward schedule only
        (evaluation: call it under torch.no_grad(), with the training step's microbatch shape).
        """
        input_ids = batch["input_ids"]
        rows = input_ids.shape[0]
        # Under context parallelism the rows hold this rank's S/cp slice while cu_seqlens (and so the
        # document ids every stage rebuilds it from) describe the full rows that Ulysses attention sees.
        seq_len = int(batch["cu_seqlens"][-1]) // rows
        if rows % self.config.microbatches:
            raise ValueError(
                f"the batch has {rows} rows, not divisible by parallel.pipeline.microbatches="
                f"{self.config.microbatches}"
            )
        kwargs = {
            "position_ids": batch["position_ids"],
            "document_ids": document_ids_from_cu_seqlens(batch["cu_seqlens"], batch=rows, seq_len=seq_len),
            # The last stage computes its loss from these in its forward (the module docstring says why).
            "labels": batch["labels"],
        }
        args: tuple[Tensor, ...] = ()
        dense_leaf = None
        if self.has_first_stage:
            dense = visual_slots(
                input_ids, visual_embeds, token_ids=self.visual_token_ids, hidden_size=self.hidden_size
            )
            # The schedule sees a leaf: its per-microbatch views accumulate the gradient that the
            # ViT graph (kept outside the schedule) receives below, once for the whole batch.
            dense_leaf = dense.detach().requires_grad_(dense.requires_grad)
            args = (input_ids, dense_leaf)
        losses: list[Tensor] = []
        # Vocab-sharded chunk logits need their cross entropy and its backward (the chunks' recompute)
        # inside loss_parallel; the schedule runs both, so the whole step goes inside.
        run = self.schedule.step if backward else self.schedule.eval
        with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
            run(
                *args,
                target=batch["labels"] if self.has_last_stage else None,
                losses=losses,
                return_outputs=False,
                loss_kwargs={"num_target_tokens": num_target_tokens},
                **kwargs,
            )
        if backward and visual_embeds is not None and visual_embeds.requires_grad:
            grad = torch.zeros_like(visual_embeds)
            if dense_leaf is not None and dense_leaf.grad is not None:
                is_visual = torch.isin(
                    input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device)
                )
                grad = dense_leaf.grad[is_visual]
            torch.autograd.backward(visual_embeds, grad)
        return torch.stack(losses).sum().detach() if self.has_last_stage else None


def build_pipeline(
    model: nn.Module,
    *,
    dims: ParallelDims,
    schedule: str = "1f1b",
    microbatches: int,
    virtual_stages: int = 1,
    loss_fn: LossFn = normalised_stage_loss,
    parallelize_stage: Callable[[nn.Module], nn.Module] | None = None,
) -> Pipeline:
    """Cut `model`'s decoder into pp * virtual_stages stages, keep this rank's, wrap them in a schedule.

    The stage modules reference the model's own submodules (no copy): build on the meta device and
    materialise the stages for large models. `parallelize_stage` (e.g. TP/FSDP) is applied to each stage
    module before it is handed to the schedule. The schedule does not rescale gradients: loss_fn already
    divides by the global target count (it receives `num_target_tokens` as a keyword).
    """
    config = PipelineConfig(schedule=schedule, microbatches=microbatches, virtual_stages=virtual_stages)
    num_layers = len(model.model.layers)
    config.validate(pp=dims.pp, num_layers=num_layers)
    schedule_cls, style = SCHEDULES[config.schedule], SCHEDULE_PLACEMENT[config.schedule]
    num_stages = dims.pp * config.virtual_stages
    layers = split_layers(num_layers, num_stages)
    pp_rank = dims.rank_coordinates["pp"]
    pp_group = dims.submesh("pp").get_group()
    # PipelineStage allocates its receive buffers on this device.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dims.device_type == "cuda"
        else torch.device("cpu")
    )
    stage_ids = stages_of_rank(pp_rank, pp=dims.pp, virtual_stages=config.virtual_stages, style=style)
    modules, wrapped = [], []
    for stage_id in stage_ids:
        module = DecoderStage(
            model, layer_ids=layers[stage_id], first=stage_id == 0, last=stage_id == num_stages - 1
        )
        if parallelize_stage is not None:
            module = parallelize_stage(module)
        modules.append(module)
        wrapped.append(PipelineStage(module, stage_id, num_stages, device, group=pp_group))
    chunking = {
        "position_ids": TensorChunkSpec(1),
        "document_ids": TensorChunkSpec(0),
        "labels": TensorChunkSpec(0),
    }
    common = dict(n_microbatches=config.microbatches, loss_fn=loss_fn, kwargs_chunk_spec=chunking)
    if schedule_cls is Schedule1F1B:
        runner = schedule_cls(wrapped[0], scale_grads=False, **common)
    else:
        runner = schedule_cls(wrapped, scale_grads=False, **common)
    return Pipeline(
        stages=modules,
        schedule=runner,
        config=config,
        visual_token_ids=tuple(model.visual_token_ids),
        hidden_size=model.model.cfg.hidden_size,
        loss_parallel=any(_on_tp_mesh(m.lm_head.weight) for m in modules if m.lm_head is not None),
        pipeline_stages=wrapped,
    )


def _on_tp_mesh(param: Tensor) -> bool:
    """A tensor-parallel parameter: a DTensor whose mesh has a "tp" dimension (FSDP alone has none)."""
    return isinstance(param, DTensor) and "tp" in (param.device_mesh.mesh_dim_names or ())
