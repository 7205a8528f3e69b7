"""SigLIP's sigmoid loss over the global batch: every rank's image-text pairs are negatives for all others.

Each rank encodes its own pairs; the normalised text embeddings of every rank are all-gathered
(differentiably: the backward sends each rank the gradient of its own texts, summed over the ranks that
scored them) and this rank's images are scored against all of them. The loss returned is this rank's
share of the global loss (its pairs' rows summed, divided by the global number of texts), so the sum over
ranks is the single-process loss of the concatenated batch and summing the gradients over ranks gives its
gradient. This is the all-gather form of SigLIP's cross-device loss; its chunked ring form saves the
(N_global x B) logits, which are small at the batch sizes a stage-0 run uses per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss_global_negatives(
    image_embeds: Tensor,
    text_embeds: Tensor,
    *,
    logit_scale: Tensor,
    logit_bias: Tensor,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """This rank's share of the sigmoid loss of the global batch (rank r holds pairs r*.. in order).

    Ranks may hold different numbers of pairs (stage 0 batches by a patch budget): texts are padded to
    the largest count for the gather and the padding is dropped before scoring.
    """
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} images but {text_embeds.shape[0]} texts: pairs must match")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    count = text_embeds.shape[0]
    counts_t = torch.zeros(world, dtype=torch.long, device=text_embeds.device)
    counts_t[rank] = count
    dist.all_reduce(counts_t, group=group)
    counts = counts_t.tolist()
    texts = F.normalize(text_embeds, dim=-1)
    padded = F.pad(texts, (0, 0, 0, max(counts) - count))
    gathered = dist_nn.all_gather(padded, group=group)
    all_texts = torch.cat([g[:c] for g, c in zip(gathered, counts)])
    images = F.normalize(image_embeds, dim=-1)
    logits = all_texts @ images.t() * logit_scale.exp() + logit_bias  # (global texts, local images)
    signs = -torch.ones_like(logits)
    mine = torch.arange(count, device=logits.device)
    signs[sum(counts[:rank]) + mine, mine] = 1.0
    return -F.logsigmoid(signs * logits).sum() / sum(counts)
