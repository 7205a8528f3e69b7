"""Growing a loaded model's vocabulary (embedding and lm_head rows) for tokens a tokenizer added."""

from __future__ import annotations

import torch
from torch import nn

from keye_train.models.configs import KeyeConfig


@torch.no_grad()
def grow_vocabulary(model: nn.Module, cfg: KeyeConfig) -> None:
    """Resize `model.model.embed_tokens` and `model.lm_head` to cfg.language.vocab_size rows in place.

    New rows are the mean of the existing rows, in both matrices: a new token then starts as an "average"
    token whose logit is close to the mean logit, instead of a random direction that could dominate the
    softmax (the usual choice when adding special tokens, e.g. transformers' mean resizing). The model's
    config becomes `cfg`, so checkpoints record the new size.
    """
    new_vocab = cfg.language.vocab_size
    embed, head = model.model.embed_tokens, model.lm_head
    old_vocab = embed.weight.shape[0]
    if new_vocab < old_vocab:
        raise ValueError(f"cannot shrink the vocabulary from {old_vocab} to {new_vocab} rows")
    if new_vocab == old_vocab:
        return
    for module in (embed, head):
        weight = module.weight
        extra = weight.mean(dim=0, keepdim=True).expand(new_vocab - old_vocab, -1)
        module.weight = nn.Parameter(torch.cat([weight, extra]), requires_grad=weight.requires_grad)
    embed.num_embeddings = new_vocab
    head.out_features = new_vocab
    model.cfg = cfg
    model.model.cfg = cfg.language
