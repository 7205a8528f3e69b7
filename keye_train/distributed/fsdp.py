"""FSDP2 (`fully_shard`) sharding of the Keye model, with the ZeRO-stage mapping and frozen-unit handling.

ZeRO stages on FSDP2
--------------------
FSDP2 always keeps the persistent parameters, the gradients it hands to the optimizer and therefore the
optimizer states as dim-0 shards (DTensors) over the data-parallel mesh. What the stages change is how
long the *unsharded* (gathered) parameters and gradients live, and so how often FSDP communicates:

========  =====================================  ===================================================
stage     per micro-batch                        per optimizer step (G micro-batches)
========  =====================================  ===================================================
ZeRO-3    params all-gathered in forward, freed  G x (forward all-gather + backward all-gather +
          after each block's forward             reduce-scatter)
          (`reshard_after_forward=True`), re-
          gathered in backward; grads reduce-
          scattered after each block's backward
ZeRO-2    params kept unsharded from forward to  1 all-gather (first forward) + G reduce-scatters;
          backward and across micro-batches      gradients accumulate as shards
          (`reshard_after_forward=False`,
          `set_reshard_after_backward(False)`
          until the last micro-batch); grads
          reduce-scattered every micro-batch
ZeRO-1    as ZeRO-2, and gradients accumulate    1 all-gather + 1 reduce-scatter; full gradients
          unsharded (`set_requires_gradient_     live on every rank during accumulation
          sync(False)` until the last micro-
          batch)
========  =====================================  ===================================================

What FSDP2 cannot express exactly, and what we do instead:

- Replicated parameters *between* optimizer steps (DeepSpeed ZeRO-1/2 keep a full bf16 copy on every
  rank and all-gather the updated shards right after `step()`). FSDP2 frees the gathered copy at the end of
  the step and gathers it again at the first forward of the next step: same volume, one step later, and
  less memory at rest.
- Gradient reduction is always a reduce-scatter (never an all-reduce into full gradients); ZeRO-1's full
  gradients exist only during accumulation, which is where they matter for communication volume.
- Under pipeline parallelism `torch.distributed.pipelining` itself disables gradient sync and resharding
  until the last micro-batch for FSDP stage modules, so every stage reduces once per step there; the
  stages then differ only by `reshard_after_forward`.

Gradients are summed, not averaged: the loss is divided by the global number of target tokens (all-reduced
over every rank that sees different tokens), so the correct gradient is the plain sum of the ranks'
gradients. FSDP's own division by the mesh size is switched off (`set_gradient_divide_factor(1.0)`,
sum-only collectives, which gloo also requires). Visual units divide by `visual_replicas`, the number of
ranks that back-propagate the same loss terms through the same visual item: 1 under the heterogeneous
ViT router and under CP (each CP rank keeps only its slice's visual tokens), tp when every TP peer runs
the ViT itself (TP peers compute identical losses).

Frozen parameters: every FSDP unit must be all-trainable or all-frozen (checked). A unit whose parameters
do not require gradients gets no gradients, hence no reduce-scatter and no optimizer state (build the
optimizer over `trainable_parameters(model)`). Freeze before calling `apply_fsdp`.

Collectives are per unit: every rank of a unit's mesh must run that unit forward and backward each step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.precision import fsdp_policy

ZERO_STAGES = (1, 2, 3)


@dataclass
class FSDPConfig:
    """`parallel.fsdp`: how the model is sharded over the data-parallel ranks. Precision is the run's
    root `precision` (distributed/precision.py: bf16 compute, fp32 masters and gradient reduction)."""

    zero_stage: int = 3
    cpu_offload: bool = False  # sharded params, grads and optimizer states live in (pinned) host memory
    # Ranks that back-propagate the same loss terms through the same visual item (see the module
    # docstring). None = tp: every TP peer runs the ViT inside the model's forward and computes identical
    # visual gradients. 1 under the heterogeneous ViT router (each item is encoded once in the world).
    visual_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"parallel.fsdp.zero_stage={self.zero_stage} must be one of {ZERO_STAGES}")
        if self.visual_replicas is not None and self.visual_replicas < 1:
            raise ValueError(f"parallel.fsdp.visual_replicas={self.visual_replicas} must be >= 1 (or null)")


@dataclass
class _Unit:
    name: str
    modules: list[nn.Module]
    visual: bool  # ViT and projector: sharded over the world, not over dp


def world_mesh(dims: ParallelDims) -> DeviceMesh:
    """A 1-D view of all ranks (the ViT and projector are data-parallel over the whole world)."""
    return dims.submesh("world")


def llm_mesh(dims: ParallelDims) -> DeviceMesh:
    """FSDP mesh of the LLM: shard over dp_shard x cp, replicate over dp_replicate (HSDP) when > 1."""
    if dims.dp_replicate > 1:
        return dims.mesh["dp_replicate", "dp_shard_cp"]
    return dims.submesh("dp_shard_cp")


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def fsdp_units(model: nn.Module) -> list[_Unit]:
    """The sharding units, innermost first: one per ViT and decoder layer, then the remainders.

    Works on the whole model and on a pipeline stage (pieces a stage does not own are None or absent).
    The norm and the LM head form one unit: they run back to back at the end of the forward.
    """
    units: list[_Unit] = []
    vit_layers = _get(model, "visual.vision_model.encoder.layers")
    for i, layer in enumerate(vit_layers if vit_layers is not None else []):
        units.append(_Unit(f"visual.vision_model.encoder.layers.{i}", [layer], visual=True))
    if _get(model, "visual") is not None:
        units.append(_Unit("visual", [model.visual], visual=True))
    if _get(model, "mlp_AR") is not None:
        units.append(_Unit("mlp_AR", [model.mlp_AR], visual=True))
    if _get(model, "model.embed_tokens") is not None:
        units.append(_Unit("model.embed_tokens", [model.model.embed_tokens], visual=False))
    layers = _get(model, "model.layers")
    for name, layer in layers.items() if layers is not None else []:
        units.append(_Unit(f"model.layers.{name}", [layer], visual=False))
    tail = [m for m in (_get(model, "model.norm"), _get(model, "lm_head")) if m is not None]
    if tail:
        units.append(_Unit("model.norm+lm_head", tail, visual=False))
    return units


def _check_homogeneous(units: list[_Unit], model: nn.Module) -> None:
    """Frozen and trainable parameters must not share a unit: a mixed unit would reduce-scatter (and
    gather) its frozen parameters' gradient buffers for nothing."""
    seen: set[int] = set()
    groups = [(u.name, [p for m in u.modules for p in m.parameters()]) for u in units]
    groups.append(("<root>", list(model.parameters())))
    for name, params in groups:
        own = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in own)
        flags = {p.requires_grad for p in own}
        if len(flags) > 1:
            raise ValueError(
                f"FSDP unit {name!r} mixes frozen and trainable parameters; freeze whole units "
                f"(ViT layers, visual, mlp_AR, embed_tokens, decoder layers, norm+lm_head)"
            )


def apply_fsdp(
    model: nn.Module,
    *,
    dims: ParallelDims,
    zero_stage: int = 3,
    precision: str = "fp32",
    cpu_offload: bool = False,
    visual_replicas: int = 1,
) -> nn.Module:
    """Shard `model` in place with FSDP2 and return it (now an FSDPModule).

    LLM units are sharded over dp_shard x cp (HSDP over dp_replicate), visual units over the world.
    precision bf16: bf16 compute with fp32 sharded masters and fp32 reduce-scatter (precision.py).
    """
    cfg = FSDPConfig(zero_stage=zero_stage, cpu_offload=cpu_offload, visual_replicas=visual_replicas)
    units = fsdp_units(model)
    _check_homogeneous(units, model)
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=dims.device_type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    )
    common = dict(mp_policy=fsdp_policy(precision), offload_policy=offload)
    meshes = {True: world_mesh(dims), False: llm_mesh(dims)}
    for i, unit in enumerate(units):
        # The last unit's backward starts right after its forward: resharding it would only add a gather.
        reshard = cfg.zero_stage == 3 and i != len(units) - 1
        target = unit.modules[0] if len(unit.modules) == 1 else unit.modules
        fully_shard(target, mesh=meshes[unit.visual], reshard_after_forward=reshard, **common)
    fully_shard(model, mesh=meshes[False], reshard_after_forward=cfg.zero_stage == 3, **common)
    for unit in units:
        _set_sum_reduction(unit.modules[0], divide=visual_replicas if unit.visual else 1)
    _set_sum_reduction(model, divide=1)
    model._keye_zero_stage = cfg.zero_stage  # read by set_microbatch
    return model


def _set_sum_reduction(module: nn.Module, *, divide: int) -> None:
    assert isinstance(module, FSDPModule)
    module.set_gradient_divide_factor(float(divide))
    module.set_force_sum_reduction_for_comms(True)


def set_microbatch(model: nn.Module, *, is_last: bool) -> None:
    """Call before each micro-batch's forward under gradient accumulation (outside a pipeline schedule).

    ZeRO-1/2 keep the gathered parameters until the last micro-batch; ZeRO-1 also skips the gradient
    reduce-scatter until then. ZeRO-3 resharding and reducing every micro-batch is FSDP2's default.
    """
    if not isinstance(model, FSDPModule):
        raise ValueError("set_microbatch needs a model returned by apply_fsdp")
    stage = getattr(model, "_keye_zero_stage", 3)
    if stage <= 2:
        model.set_reshard_after_backward(is_last)
    if stage == 1:
        model.set_requires_gradient_sync(is_last)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should own: frozen ones get no optimizer state."""
    return [p for p in model.parameters() if p.requires_grad]
