"""The fixed-shape layout of packed rows that the pipeline schedule splits into microbatches.

Single-row packed batches stacked into one (B, S) global batch; cu_seqlens (variable length, so not
chunkable) converted to and from per-token document ids; the visual embeddings written densely at their
placeholder slots. `pipeline.py` feeds its stages with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def document_ids_from_cu_seqlens(cu_seqlens: Tensor, *, batch: int, seq_len: int) -> Tensor:
    """(B, S) int32 index of each token's document within its row, from cu_seqlens over B*S tokens.

    A fixed-shape stand-in for cu_seqlens that the schedule can split into microbatches.
    """
    bounds = cu_seqlens.to(torch.long)
    if int(bounds[-1]) != batch * seq_len:
        raise ValueError(f"cu_seqlens ends at {int(bounds[-1])}, not at batch*seq_len={batch * seq_len}")
    row_starts = torch.arange(0, batch * seq_len, seq_len)
    if not torch.isin(row_starts, bounds).all():
        raise ValueError("cu_seqlens has a document crossing a row boundary; rows must be packed separately")
    token = torch.arange(batch * seq_len)
    document = torch.searchsorted(bounds, token, right=True) - 1
    first_of_row = document.view(batch, seq_len)[:, :1]
    return (document.view(batch, seq_len) - first_of_row).to(torch.int32)


def cu_seqlens_from_document_ids(document_ids: Tensor) -> Tensor:
    """cu_seqlens over the flattened (B, S) tokens: a boundary at every row start and document change."""
    batch, seq_len = document_ids.shape
    # Offsetting each row by more than any document index makes row starts boundaries too.
    flat = (document_ids.long() + seq_len * torch.arange(batch, device=document_ids.device)[:, None]).view(-1)
    starts = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    edges = torch.tensor([batch * seq_len], device=document_ids.device)
    return F.pad(torch.cat([starts, edges]), (1, 0)).to(torch.int32)


def visual_slots(
    input_ids: Tensor, visual_embeds: Tensor | None, *, token_ids: Sequence[int], hidden_size: int
) -> Tensor:
    """(B, S, D) tensor holding visual_embeds (in order) at the image/video pad positions, zeros elsewhere."""
    is_visual = torch.isin(input_ids, torch.tensor(list(token_ids), device=input_ids.device))
    num_slots = int(is_visual.sum())
    num_embeds = 0 if visual_embeds is None else visual_embeds.shape[0]
    if num_slots != num_embeds:
        raise ValueError(
            f"the batch has {num_slots} image/video pad tokens but {num_embeds} visual embeddings"
        )
    if visual_embeds is None:
        return torch.zeros(*input_ids.shape, hidden_size, device=input_ids.device)
    dense = visual_embeds.new_zeros(*input_ids.shape, hidden_size)
    return dense.masked_scatter(is_visual[..., None], visual_embeds)


def stack_packed_rows(rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack single-row packed batches of equal length into one (B, S) global batch.

    cu_seqlens are shifted to the flattened B*S token index; visual inputs are concatenated in row order.
    """
    lengths = {r["input_ids"].shape for r in rows}
    if len(lengths) != 1 or next(iter(lengths))[0] != 1:
        raise ValueError(f"rows must each be (1, S) with one common S, got shapes {sorted(lengths)}")
    seq_len = rows[0]["input_ids"].shape[1]
    cu = [rows[0]["cu_seqlens"][:1]] + [r["cu_seqlens"][1:] + i * seq_len for i, r in enumerate(rows)]
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows]),
        "labels": torch.cat([r["labels"] for r in rows]),
        "position_ids": torch.cat([r["position_ids"] for r in rows], dim=1),
        "cu_seqlens": torch.cat(cu).to(torch.int32),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "grid_thw": torch.cat([r["grid_thw"] for r in rows]),
    }
