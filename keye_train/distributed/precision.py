"""The run's numeric precision (`precision: bf16 | fp32`), applied the same way on every path.

bf16 means bf16 parameters in compute and bf16 matmuls, with fp32 master weights, fp32 optimizer state
and fp32 gradient reductions:

- where FSDP shards a module, FSDP2's MixedPrecisionPolicy (param_dtype=bf16, reduce_dtype=fp32): the
  sharded fp32 parameters are the masters, each unit's all-gather casts them to bf16 for compute, and
  gradients are reduce-scattered in fp32;
- where no FSDP wraps a module (a single process, the replicated ViT and projector under the ViT router,
  stage 0's towers), autocast to bf16 around its forward: the fp32 parameters stay the masters and their
  gradients (all-reduced by the caller) stay fp32.

The loss is always fp32 (the LM head casts each chunk's logits; models/lm_head.py). On CUDA, fp32
matmuls use TF32 either way (`configure_matmul`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

PRECISIONS = ("bf16", "fp32")


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"precision={value!r} must be one of {PRECISIONS} (a root key of the recipe)")
    return value


def fsdp_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16, reduce gradients in fp32; fp32: FSDP's default (no casts)."""
    if check_precision(precision) == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@contextlib.contextmanager
def autocast(precision: str, device_type: str) -> Iterator[None]:
    """bf16 autocast for modules without FSDP (a no-op in fp32). Wrap the forward only: backward runs
    in the dtypes the forward recorded."""
    if check_precision(precision) == "fp32":
        yield
        return
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
        yield


def autocast_method(obj: nn.Module, name: str, *, precision: str, device_type: str) -> bool:
    """Run `obj.<name>` (e.g. forward, encode_visual) under `autocast`, in place (an instance attribute,
    so parameter names and the class stay as they were). Idempotent; returns whether it wrapped."""
    if check_precision(precision) == "fp32" or name in getattr(obj, "_keye_autocast", ()):
        return False
    inner = getattr(obj, name)

    @functools.wraps(inner)
    def wrapped(*args, **kwargs):
        with autocast(precision, device_type):
            return inner(*args, **kwargs)

    setattr(obj, name, wrapped)
    obj._keye_autocast = (*getattr(obj, "_keye_autocast", ()), name)
    return True


def module_device_type(module: nn.Module) -> str:
    param = next(module.parameters(), None)
    return "cpu" if param is None else param.device.type


def configure_matmul(device_type: str) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later): the fp32 paths of a bf16 run
    (and fp32 runs) use the tensor cores at ~10-bit mantissa products with fp32 accumulation."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
