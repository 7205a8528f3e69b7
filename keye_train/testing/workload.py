"""Synthetic heavy-tailed multimodal workloads (text, images of 4..20,480 tokens, videos) for the planner."""

from __future__ import annotations

import math
import random

from keye_train.data.plan.balance import PlanItem
from keye_train.data.plan.cost import CostModel

PATCHES_PER_TOKEN = 4  # one LLM token = a 2x2 merge of 14x14 patches


def heavy_tailed_batch(
    *,
    num_ranks: int,
    microbatches: int,
    max_seq_len: int,
    fill: float = 0.85,
    seed: int = 0,
    cost_model: CostModel | None = None,
) -> list[PlanItem]:
    """Draw samples until they hold `fill` of the batch's token capacity.

    Text lengths are log-normal, image token counts log-uniform over 4..20,480 (the resize rule's range),
    videos 4..256 frames of 48..768 tokens capped at the 65,536-token budget.
    """
    rng = random.Random(seed)
    cost_model = cost_model or CostModel()
    budget = fill * num_ranks * microbatches * max_seq_len
    items: list[PlanItem] = []
    total = 0
    while total < budget:
        kind = rng.random()
        if kind < 0.4:
            tokens, frames = int(min(max_seq_len, max(16, rng.lognormvariate(math.log(600), 1.0)))), []
        elif kind < 0.85:
            image_tokens = int(math.exp(rng.uniform(math.log(4), math.log(20480))))
            tokens, frames = image_tokens + rng.randint(16, 256), [image_tokens * PATCHES_PER_TOKEN]
        else:
            per_frame = rng.randint(48, 768)
            n_frames = min(rng.randint(4, 256), 65536 // per_frame)
            tokens = n_frames * (per_frame + 6) + rng.randint(16, 256)
            frames = [per_frame * PATCHES_PER_TOKEN] * n_frames
        tokens = min(tokens, max_seq_len)
        cost = cost_model.sample_cost(tokens=tokens, frame_patches=frames)
        items.append(PlanItem(index=len(items), cost=cost, tokens=tokens))
        total += tokens
    return items
