"""AdamW over per-module parameter groups, clipping of sharded (DTensor) grads, finiteness checks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from keye_train.distributed.collectives import all_reduce_group_

MODULE_GROUPS = ("vit", "projector", "llm", "text_tower")
IMPLEMENTATIONS = ("auto", "foreach", "fused", "for_loop")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class GroupLR:
    """Peak learning rate of each module group (the schedule scales all of them by the same factor)."""

    vit: float = 2e-5
    projector: float = 1e-4
    llm: float = 2e-5
    text_tower: float = 2e-5

    def __post_init__(self) -> None:
        for name in MODULE_GROUPS:
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"optim.lr.{name}={value!r} must be a finite number > 0 (freeze a module through the "
                f"stage's `train` list, not with a zero learning rate)",
            )


@dataclass
class OptimConfig:
    """AdamW hyper-parameters. Values are peak learning rates; schedule.py shapes them over time."""

    lr: GroupLR = field(default_factory=GroupLR)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Decay applies to matrices only: norms, biases and scalars never decay (decaying a norm's gain
    # towards zero fights the normalisation). Embedding tables are matrices, so this switch decides.
    decay_embeddings: bool = False
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping (the norm is still logged)
    impl: str = "auto"  # auto lets torch pick foreach/fused for the device; fused needs a supported device

    def __post_init__(self) -> None:
        if isinstance(self.lr, dict):  # a plain mapping from a YAML file
            self.lr = GroupLR(**self.lr)
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"optim.betas={list(self.betas)} must be two numbers in [0, 1)",
        )
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _require(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip={self.grad_clip} must be > 0, or null to disable clipping",
        )
        _require(self.impl in IMPLEMENTATIONS, f"optim.impl={self.impl!r} must be one of {IMPLEMENTATIONS}")


def _no_decay_names(module: nn.Module, *, decay_embeddings: bool) -> set[str]:
    """Qualified names of the parameters that must not decay: vectors/scalars (biases, norm gains,
    logit scale/bias), everything owned by a norm layer, and embedding tables unless configured."""
    names = set()
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(mod).__name__.endswith(
            "Norm"
        )
        is_embedding = isinstance(mod, nn.Embedding)
        for p_name, param in mod.named_parameters(recurse=False):
            if param.ndim < 2 or is_norm or (is_embedding and not decay_embeddings):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def param_groups(model_parts: dict[str, nn.Module], cfg: OptimConfig) -> list[dict]:
    """One group per (module group, decay/no-decay), trainable parameters only, empty groups dropped.

    Each group carries `name` (e.g. "llm.no_decay") so logs and checkpoints can tell them apart.
    """
    unknown = sorted(set(model_parts) - set(MODULE_GROUPS))
    _require(not unknown, f"model_parts has unknown module groups {unknown}; use names from {MODULE_GROUPS}")
    seen: dict[int, str] = {}
    groups = []
    for group in MODULE_GROUPS:  # fixed order: the optimizer state layout must not depend on dict order
        module = model_parts.get(group)
        if module is None:
            continue
        no_decay = _no_decay_names(module, decay_embeddings=cfg.decay_embeddings)
        decay_params, no_decay_params = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue  # frozen: no optimizer state at all
            if id(param) in seen:
                raise ValueError(
                    f"parameter {group}:{name} is also in module group {seen[id(param)]!r}; a parameter "
                    f"may belong to one module group only"
                )
            seen[id(param)] = group
            (no_decay_params if name in no_decay else decay_params).append(param)
        lr = getattr(cfg.lr, group)
        if decay_params:
            groups.append(
                {"params": decay_params, "lr": lr, "weight_decay": cfg.weight_decay, "name": f"{group}.decay"}
            )
        if no_decay_params:
            groups.append(
                {"params": no_decay_params, "lr": lr, "weight_decay": 0.0, "name": f"{group}.no_decay"}
            )
    return groups


def build_optimizer(model_parts: dict[str, nn.Module], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model_parts` (module group name -> module).

    Call after the stage has frozen what does not train (stages.apply_stage) and after parallelisation
    (FSDP/TP turn parameters into DTensors; the optimizer must hold those, not the originals).
    """
    groups = param_groups(model_parts, cfg)
    if not groups:
        raise ValueError(
            f"no trainable parameters in module groups {sorted(model_parts)}: every parameter has "
            f"requires_grad=False; check the stage's `train` list"
        )
    impl = {
        "auto": {},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "for_loop": {"foreach": False},
    }[cfg.impl]
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, **impl)


def _grads(params: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _group_norms(grads: list[Tensor], *, norm_type: float, foreach: bool | None) -> list[Tensor]:
    """Norm of each homogeneous set of grads, as full (replicated) plain tensors.

    DTensors on different meshes or with different placements (the ViT sharded over every rank, the LLM
    over a TP x FSDP sub-mesh) cannot be stacked into one norm, so each (mesh, placements) set is reduced
    on its own and only the resulting scalars are combined. Sets are visited in first-seen order, which is
    the same on every rank of a mesh, so the collectives inside full_tensor() line up.
    """
    sets: dict[object, list[Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else "local"
        sets.setdefault(key, []).append(grad)
    norms = []
    for members in sets.values():
        norm = torch.nn.utils.get_total_norm(members, norm_type=norm_type, foreach=foreach)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # Partial (sharded) -> the norm over the whole mesh
        norms.append(norm.float())
    return norms


def _combine(norms: list[Tensor], *, norm_type: float, device: torch.device) -> Tensor:
    if not norms:
        return torch.zeros((), device=device)
    stacked = torch.stack([n.to(device) for n in norms])
    return stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def _reduce_over_group(norm: Tensor, *, norm_type: float, group: dist.ProcessGroup) -> Tensor:
    if math.isinf(norm_type):
        return all_reduce_group_(norm, group=group, op="max")
    powered = norm.pow(norm_type)
    all_reduce_group_(powered, group=group)
    return powered.pow(1.0 / norm_type)


def _as_group(group_or_mesh: object) -> dist.ProcessGroup:
    get_group = getattr(group_or_mesh, "get_group", None)
    return get_group() if callable(get_group) else group_or_mesh  # a 1-D DeviceMesh or a ProcessGroup


@torch.no_grad()
def grad_norm(
    params: Iterable[Tensor],
    *,
    norm_type: float = 2.0,
    pp_group: dist.ProcessGroup | object | None = None,
    pp_replicated_params: Iterable[Tensor] = (),
    foreach: bool | None = None,
) -> Tensor:
    """The global gradient norm, identical on every rank, as a 0-d fp32 tensor.

    `params` may mix plain tensors (replicated, e.g. after DDP's all-reduce) and DTensors (FSDP Shard,
    TP Shard/Replicate); DTensor norms are completed over their mesh. With pipeline parallelism each
    stage holds different layers: pass `pp_group` (a ProcessGroup or 1-D "pp" DeviceMesh) to add the
    stages' contributions. Parameters every pp rank holds in full (e.g. a ViT that is data-parallel over
    all ranks) go in `pp_replicated_params` so they are counted once, not once per stage.
    """
    params, shared = list(params), list(pp_replicated_params)
    device = next((p.device for p in params + shared), torch.device("cpu"))
    norm = _combine(
        _group_norms(_grads(params), norm_type=norm_type, foreach=foreach), norm_type=norm_type, device=device
    )
    if pp_group is not None:
        norm = _reduce_over_group(norm, norm_type=norm_type, group=_as_group(pp_group))
    if shared:
        shared_norms = _group_norms(_grads(shared), norm_type=norm_type, foreach=foreach)
        norm = _combine([norm, *shared_norms], norm_type=norm_type, device=device)
    return norm


@torch.no_grad()
def clip_grad_norm(
    params: Iterable[Tensor],
    max_norm: float | None,
    *,
    norm_type: float = 2.0,
    pp_group: dist.ProcessGroup | object | None = None,
    pp_replicated_params: Iterable[Tensor] = (),
    foreach: bool | None = None,
) -> Tensor:
    """Scale all grads so their global norm is at most max_norm; returns the norm before clipping.

    max_norm=None only measures. A non-finite norm leaves the grads untouched (scaling by nan would
    poison them); the caller skips the step when `torch.isfinite(total_norm)` is False — the value is
    the same on every rank, so every rank skips together.
    """
    params, shared = list(params), list(pp_replicated_params)
    total = grad_norm(
        params, norm_type=norm_type, pp_group=pp_group, pp_replicated_params=shared, foreach=foreach
    )
    if max_norm is not None and torch.isfinite(total):
        # Same rule as torch.nn.utils.clip_grad_norm_. The norm is already global, so each rank scales
        # its local shards; torch's clip_grads_with_norm_ cannot take plain and DTensor grads together.
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for grad in _grads(params + shared):
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            by_device.setdefault((local.device, local.dtype), []).append(local)
        for (device, dtype), members in by_device.items():
            factor = scale.to(device, dtype)
            if foreach is False:
                for g in members:
                    g.mul_(factor)
            else:
                torch._foreach_mul_(members, factor)
    return total


@torch.no_grad()
def grads_are_finite(params: Iterable[Tensor], *, group: dist.ProcessGroup | None = None) -> bool:
    """True when every local grad shard is finite on every rank of `group` (default: the world, when
    torch.distributed is initialised). All ranks return the same answer, so they skip a step together."""
    local = [g.to_local() if isinstance(g, DTensor) else g for g in _grads(params)]
    bad = any(not bool(torch.isfinite(g).all()) for g in local)
    if dist.is_available() and dist.is_initialized():
        device = local[0].device if local else torch.device("cpu")
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        bad = bool(all_reduce_group_(flag, group=group, op="max").item() > 0)
    return not bad
