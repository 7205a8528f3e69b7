"""Token-level cross entropy returning (sum, count) so callers normalise by global target tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from keye_train.data.batch import IGNORE_INDEX


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed fp32 cross entropy over target tokens and their count.

    Labels are already shifted inside each sample (data/batch.py), so no shift happens here and packed
    samples never predict across their boundaries. Returning the sum (not the mean) lets gradient
    accumulation divide by the number of target tokens of the whole global batch.
    """
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()
