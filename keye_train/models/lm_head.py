"""The LM head, and the memory-lean cross entropy it computes when given labels.

The plain loss materialises [tokens x vocab] fp32 logits, keeps their log-softmax for backward and
allocates a gradient of the same size: 3 x 16K x 151,936 x 4 bytes ~ 30 GB for one 16K-token row of
Qwen3's vocabulary. `chunked_linear_cross_entropy` runs head + fp32 cross entropy on `chunk_tokens`
tokens at a time under non-reentrant activation checkpointing: the forward keeps only the (small)
hidden states, and the backward recomputes one chunk's logits at a time, so at most one chunk's
[chunk x vocab] logits, log-softmax and gradient exist at once. Written here because torch has no fused
linear + cross entropy; checkpointing per chunk is the simplest exact form (same math as the plain loss,
only the summation order over chunks differs).

The chunked loss runs inside the head's forward (not around its __call__), so module hooks -- FSDP2's
unshard/reduce-scatter, the tensor-parallel plan's input/output layouts -- fire once per step as for the
plain head, and the recomputation in backward uses the weight tensor captured in forward. The pipeline's
last stage calls the head the same way inside its own forward (distributed/pipeline.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # equals data.batch.IGNORE_INDEX (models import nothing from data)
DEFAULT_CHUNK_TOKENS = 1024


def _chunk_loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    logits = F.linear(hidden, weight).float()
    if isinstance(logits, DTensor) and not isinstance(labels, DTensor):
        # Tensor-parallel head: every tp rank holds the same labels. Inside loss_parallel the cross
        # entropy runs on the vocab shards; outside it DTensor gathers the chunk's logits first.
        labels = DTensor.from_local(labels, logits.device_mesh, [Replicate()] * logits.device_mesh.ndim)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_tokens: int
) -> tuple[Tensor, Tensor]:
    """(summed fp32 cross entropy of `hidden @ weight.T` over target tokens, their count).

    hidden (..., D) and labels (...) of the same leading shape; weight (V, D). Works on DTensors (the
    tensor-parallel head: hidden Replicate, weight Shard(0) -> vocab-sharded chunk logits, whose cross
    entropy is the vocab-parallel one inside `loss_parallel`). chunk_tokens <= 0 computes in one piece
    without recomputation (the plain loss).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    count = (flat_labels != IGNORE_INDEX).sum()
    total = flat_hidden.shape[0]
    if chunk_tokens <= 0 or chunk_tokens >= total:
        return _chunk_loss(flat_hidden, weight, flat_labels), count
    loss_sum = None
    for start in range(0, total, chunk_tokens):
        end = min(start + chunk_tokens, total)
        part = checkpoint(
            _chunk_loss, flat_hidden[start:end], weight, flat_labels[start:end], use_reentrant=False
        )
        loss_sum = part if loss_sum is None else loss_sum + part
    return loss_sum, count


class LMHead(nn.Linear):
    """`lm_head` (an nn.Linear, so state-dict keys, FSDP units and TP plans are unchanged).

    forward(hidden) -> logits; forward(hidden, labels=...) -> (loss sum, target count) without ever
    holding the whole [tokens x vocab] logits (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.chunk_tokens = DEFAULT_CHUNK_TOKENS  # set from the run's `loss.chunk_tokens`

    def forward(self, hidden: Tensor, labels: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if labels is None:
            return super().forward(hidden)
        return chunked_linear_cross_entropy(hidden, self.weight, labels, chunk_tokens=self.chunk_tokens)
