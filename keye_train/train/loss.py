"""Token-level cross entropy returning (sum, count) so callers normalise by global target tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from keye_train.data.batch import IGNORE_INDEX
from keye_train.models import lm_head


@dataclass
class LossConfig:
    """`loss:` of a recipe. chunk_tokens: tokens per cross-entropy chunk of the LM head (the full
    [tokens x vocab] fp32 logits never exist; models/lm_head.py); 0 computes the plain loss in one piece."""

    chunk_tokens: int = lm_head.DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 0:
            raise ValueError(f"loss.chunk_tokens={self.chunk_tokens!r} must be an int >= 0 (0: no chunking)")


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed fp32 cross entropy over target tokens and their count, from materialised logits.

    Labels are already shifted inside each sample (data/batch.py), so no shift happens here and packed
    samples never predict across their boundaries. Returning the sum (not the mean) lets gradient
    accumulation divide by the number of target tokens of the whole global batch. Training computes the
    same value through `model(..., labels=labels)` without materialising the logits (models/lm_head.py).
    """
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()
