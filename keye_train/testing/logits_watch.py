"""A dispatch mode that records the largest logits-shaped tensor an operation creates (memory tests).

The chunked LM-head loss (models/lm_head.py) promises that no [tokens x vocab] tensor ever exists: only
[chunk x vocab] logits, their log-softmax and gradient. Watching every operator's outputs (forward and
backward, plain tensors and DTensors alike, whatever code path produced them) checks that promise
without knowing how the loss is implemented: a path that materialises a microbatch's whole logits shows
up as a tensor with more than `chunk_tokens` rows of vocabulary width.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LogitsWatch(TorchDispatchMode):
    """While active, `max_rows` is the most rows (numel / last dim) of any floating-point tensor an
    operator allocates whose last dimension is one of `widths` (the vocabulary, its tensor-parallel shard)."""

    def __init__(self, widths: Iterable[int]) -> None:
        super().__init__()
        self.widths = set(widths)
        self.max_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view allocates nothing (e.g. the head weight's transpose, (D, vocab))
            return out
        for t in tree_leaves(out):
            wide = isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.widths
            if wide and t.is_floating_point():
                self.max_rows = max(self.max_rows, t.numel() // t.shape[-1])
        return out
