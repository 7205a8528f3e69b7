"""Tensor (and sequence) parallelism of the Qwen3 decoder with DTensor `parallelize_module` plans."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

from keye_train.train.loss import token_cross_entropy


@dataclass
class TensorParallelConfig:
    """How the decoder is split over the tp mesh dimension (its degree lives in ParallelDims).

    sequence_parallel: norms and residual stream hold S/tp tokens per rank (Megatron-SP), which divides the
        activation memory outside attention/MLP by tp; needs the sequence length divisible by tp.
    loss_parallel: the head's logits stay sharded over the vocabulary and the cross entropy is computed on
        the shards, so no rank materialises (B, S, vocab) logits.
    """

    sequence_parallel: bool = True
    loss_parallel: bool = True

    def __post_init__(self) -> None:
        for key in ("sequence_parallel", "loss_parallel"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ValueError(f"parallel.tensor.{key}={value!r} must be a bool")


class VocabParallelHead(ColwiseParallel):
    """ColwiseParallel for the LM head (weight Shard(0) over the vocabulary) that also passes through
    the head's chunked-loss output: with labels the head returns (loss sum, count), scalars that are
    already reduced over tp, handed back as local tensors; without labels, logits as ColwiseParallel."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if isinstance(outputs, tuple):
            return tuple(t.to_local() if isinstance(t, DTensor) else t for t in outputs)
        return ColwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)


def _check_sequence_divisible(tp: int):
    """A pre-hook: SequenceParallel rebuilds global shapes as local * tp, so an uneven split would be
    silently wrong downstream; refuse it here with the numbers instead."""

    def hook(module: nn.Module, args: tuple) -> None:
        seqlen = args[0].shape[1]
        if seqlen % tp:
            raise ValueError(
                f"sequence parallelism needs the sequence length divisible by tp: S={seqlen}, tp={tp}; "
                f"pad the packed batch to a multiple of {tp} (toy_packed_batch(seq_len=...), packing.seq_len)"
            )

    return hook


def _layer_plan(*, sequence_parallel: bool) -> dict[str, object]:
    """Plan of one Qwen3DecoderLayer, keyed by submodule path."""
    # The residual stream between blocks: sequence-sharded local tensors with SP, full replicas without.
    stream = Shard(1) if sequence_parallel else Replicate()
    # Entering attention/MLP the stream becomes one Replicate DTensor (all-gather with SP), and stays a
    # DTensor so that q/k/v (gate/up) share it: their input gradients add up as Partial and are reduced
    # once (reduce-scatter with SP, all-reduce without) instead of once per projection.
    plan: dict[str, object] = {
        "self_attn": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=stream),
        # q/k RMSNorm act per head, and each rank holds whole heads (columns of q/k_proj are head-major):
        # the weight is replicated and the local (B, S, H/tp, D) tensor is a Shard over the head dim. As a
        # DTensor, the weight's gradient (a sum over this rank's heads only) is reduced over tp by DTensor;
        # a plain parameter would silently keep a per-rank partial gradient.
        "self_attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "self_attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
        "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=stream),
    }
    if sequence_parallel:
        plan["input_layernorm"] = SequenceParallel()
        plan["post_attention_layernorm"] = SequenceParallel()
    # Without SP the layer norms stay plain parameters: every tp rank normalises the same full sequence,
    # so their gradients agree across tp without any communication.
    return plan


def apply_tensor_parallel(
    model: nn.Module,
    *,
    tp_mesh: DeviceMesh,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
) -> nn.Module:
    """Shard a KeyeForConditionalGeneration (or a pipeline stage of it) over tp_mesh, in place.

    Attention heads and MLP columns are split (colwise q/k/v and gate/up, rowwise o/down); the embedding
    table and the head are split over the vocabulary. M-RoPE cos/sin stay full-length: attention runs on the
    whole sequence after the all-gather, on local heads. The ViT and the mlp_AR projector stay replicated:
    they are ~5% of the 8B parameters, run on visual tokens only, and the ViT is data-parallel over all
    ranks (DESIGN decision 4), so sharding them would add collectives for little memory.

    With loss_parallel the logits come out as a DTensor sharded over the vocabulary: compute the loss with
    `vocab_parallel_cross_entropy` and run backward inside `loss_parallel_context`.
    """
    tp = tp_mesh.size()
    lm = model.model
    for layer in lm.layers.values():
        parallelize_module(layer, tp_mesh, _layer_plan(sequence_parallel=sequence_parallel))

    if lm.embed_tokens is not None:
        # The embedding output stays Replicate (an all-reduce rather than a reduce-scatter into Shard(1)):
        # the visual splice in `model.embed` addresses pad tokens over the full sequence, so it needs the
        # full (B, S, D) embeddings; the decoder input is then cut to this rank's sequence shard below.
        parallelize_module(
            lm.embed_tokens, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        )
        if sequence_parallel:
            lm.register_forward_pre_hook(_check_sequence_divisible(tp))
            # Replicate -> Shard(1) is a local slice forward and an all-gather of the gradient backward.
            parallelize_module(
                lm,
                tp_mesh,
                PrepareModuleInput(
                    input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
                ),
            )
    if lm.norm is not None and sequence_parallel:
        parallelize_module(lm.norm, tp_mesh, SequenceParallel())
    if getattr(model, "lm_head", None) is not None:
        head_input = Shard(1) if sequence_parallel else Replicate()
        head = (
            VocabParallelHead(input_layouts=head_input, output_layouts=Shard(-1), use_local_output=False)
            if loss_parallel
            else VocabParallelHead(input_layouts=head_input, output_layouts=Replicate())
        )
        parallelize_module(model.lm_head, tp_mesh, head)
    return model


@contextlib.contextmanager
def loss_parallel_context(enabled: bool = True) -> Iterator[None]:
    """Wrap the loss AND its backward: PyTorch's vocab-parallel cross entropy (and its gradient) only
    dispatch to the sharded kernels inside `loss_parallel()`; outside it the logits would be gathered."""
    with torch_loss_parallel() if enabled else contextlib.nullcontext():
        yield


def vocab_parallel_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """`token_cross_entropy` for logits that may be a DTensor sharded over the vocabulary (Shard(-1)).

    Returns (summed loss, target count) as plain tensors, identical on every tp rank. Must be called inside
    `loss_parallel_context()`, and the backward must run there too.
    """
    if not isinstance(logits, DTensor):
        return token_cross_entropy(logits, labels)
    loss_sum, count = token_cross_entropy(logits, labels)
    # reduction="sum" under loss_parallel is a scalar already all-reduced over tp (Replicate); taking the
    # local value keeps the rest of the step (global-count normalisation, logging) free of DTensors.
    return loss_sum.to_local() if isinstance(loss_sum, DTensor) else loss_sum, count
