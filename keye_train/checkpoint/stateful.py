"""The DCP Stateful objects of a checkpoint: model chunks, optimizers, and blobs (scheduler, data loader,
counters, RNG). A checkpoint is a dict of these (as in torchtitan); DCP calls their state_dict() on save
and load_state_dict() on load, in the dict's order."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from keye_train.checkpoint.layout import OPTIM_KEY

# The optimizer state is keyed by parameter FQN (not by index) so that it reshards with the model.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def pack(obj: Any) -> bytes:
    """Any torch-saveable object -> bytes, so DCP stores it as one opaque item instead of flattening it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(blob: bytes) -> Any:
    # Our own checkpoint blobs hold plain Python and numpy objects (RNG states), hence weights_only=False.
    return torch.load(io.BytesIO(blob), weights_only=False)


def as_list(items: Any) -> list:
    """None -> [], one object -> [object], a sequence -> list (PP ranks may hold several model chunks)."""
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def combine_modules(*modules: nn.Module) -> nn.Module:
    """One module whose parameter names are those of all `modules` (no prefix), e.g. the Keye model and
    the stage-0 SigLIP text tower trained by one optimizer, checkpointed as one model."""
    combined = nn.Module()
    for module in modules:
        for name, child in module.named_children():
            if hasattr(combined, name):
                raise ValueError(f"combine_modules: two modules both have a child named {name!r}")
            combined.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            combined.register_parameter(name, param)
        for name, buffer in module.named_buffers(recurse=False):
            combined.register_buffer(name, buffer)
    return combined


class ModelStateful:
    """DCP Stateful over one or more model chunks; keys are FQNs, values DTensor shards under FSDP/TP."""

    def __init__(self, models: nn.Module | Sequence[nn.Module]) -> None:
        self.models = as_list(models)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for model in self.models:
            merged.update(get_model_state_dict(model))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model in self.models:
            set_model_state_dict(model, state_dict, options=StateDictOptions(strict=False))


class OptimizerStateful:
    """DCP Stateful over (model chunk, optimizer) pairs, FQN-keyed so it loads under another layout."""

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        optimizers: torch.optim.Optimizer | Sequence,
        *,
        saved_keys: Collection[str] | None = None,
    ) -> None:
        self.models, self.optimizers = as_list(models), as_list(optimizers)
        # When loading: the DCP keys of the checkpoint. A parameter that never had a gradient (the unused
        # packing position table, say) has no saved state, while DSD gives every fresh parameter one.
        self.saved_keys = saved_keys
        if len(self.models) != len(self.optimizers):
            raise ValueError(
                f"got {len(self.models)} model chunks but {len(self.optimizers)} optimizers; give one "
                "optimizer per model chunk"
            )

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for model, optimizer in zip(self.models, self.optimizers):
            merged.update(get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS))
        self._template = merged
        if self.saved_keys is not None:
            merged = {k: v for k, v in merged.items() if f"{OPTIM_KEY}.{k}" in self.saved_keys}
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Absent entries keep the fresh template values so DSD sees a complete state ...
        full = {**getattr(self, "_template", {}), **state_dict}
        for model, optimizer in zip(self.models, self.optimizers):
            set_optimizer_state_dict(model, optimizer, full, options=_OPTIM_OPTIONS)
            if self.saved_keys is None:
                continue
            # ... and are then dropped: without state the optimizer initialises a parameter lazily on its
            # first gradient, exactly as in the run that saved the checkpoint.
            for name, param in model.named_parameters():
                fqn = next(iter(_get_fqns(model, name)))
                prefix = f"state.{fqn}."
                if param in optimizer.state and not any(k.startswith(prefix) for k in state_dict):
                    del optimizer.state[param]


def rng_state() -> dict[str, Any]:
    """This rank's generators: torch CPU, CUDA (if present), Python, NumPy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


BLOB = "blob"  # the one key of a BlobStateful's state dict (DCP stores it as `<item>.blob`)


class BlobStateful:
    """A DCP Stateful holding one object's state as a single opaque blob: the LR scheduler and the data
    loader (their own state_dict()/load_state_dict()), the trainer's counters (a dict restored in place)
    and this rank's RNG. Opaque because these are small Python structures (tuples, numpy RNG state)
    that DCP would otherwise try to flatten and reshard."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]) -> None:
        self._get, self._put = get, put

    def state_dict(self) -> dict[str, Any]:
        return {BLOB: pack(self._get())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._put(unpack(state_dict[BLOB]))

    @classmethod
    def of(cls, obj: Any) -> BlobStateful:
        """Over an object with state_dict()/load_state_dict()."""
        return cls(obj.state_dict, obj.load_state_dict)

    @classmethod
    def of_dict(cls, counters: dict[str, Any], **fixed: Any) -> BlobStateful:
        """Over a plain dict (saved with `fixed` entries on top; loading replaces its contents)."""

        def put(value: dict[str, Any]) -> None:
            counters.clear()
            counters.update(value)

        return cls(lambda: {**counters, **fixed}, put)

    @classmethod
    def of_rng(cls) -> BlobStateful:
        return cls(rng_state, set_rng_state)
