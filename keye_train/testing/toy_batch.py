"""A fixed packed multimodal batch built in memory (no files) for the demo, engine tests and benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

from keye_train.data.batch import IGNORE_INDEX
from keye_train.models.configs import KeyeConfig
from keye_train.models.keye import position_ids_for


def toy_packed_batch(cfg: KeyeConfig, *, seed: int = 0, seq_len: int | None = None) -> dict[str, Tensor]:
    """Three samples in one sequence (an image caption, a slow+fast 2-frame video, pure text).

    With seq_len, the sequence is padded to that fixed length (a segment of its own, no loss), which is
    what pipeline and context parallelism need. Labels are shifted inside each sample (data/batch.py).
    """
    generator = torch.Generator().manual_seed(seed)
    img, vid = cfg.image_token_id, cfg.video_token_id
    start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    text_vocab = min(cfg.language.vocab_size, cfg.vision_start_token_id)

    def text(n: int) -> list[int]:
        return torch.randint(1, text_vocab, (n,), generator=generator).tolist()

    samples = [
        ([start, *[img] * 6, end, *text(12)], [(4, 6)]),  # 56x84 px image -> 4x6 patches -> 6 tokens
        ([start, *text(3), *[vid] * 4, *text(3), *[vid] * 1, end, *text(8)], [(4, 4), (2, 2)]),
        (text(20), []),
    ]
    ids, labels, positions, grids = [], [], [], []
    for tokens, sample_grids in samples:
        t = torch.tensor(tokens)
        ids.append(t)
        target = torch.cat([t[1:], torch.tensor([IGNORE_INDEX])])
        target[torch.isin(target, torch.tensor([img, vid, start, end]))] = IGNORE_INDEX
        labels.append(target)
        positions.append(position_ids_for(t, grids_hw=sample_grids, cfg=cfg))
        grids += [(1, h, w) for h, w in sample_grids]
    lengths = [len(t) for t in ids]
    total = sum(lengths)
    if seq_len is not None:
        if seq_len < total:
            raise ValueError(f"seq_len={seq_len} is shorter than the toy batch's {total} tokens")
        if seq_len > total:
            pad = seq_len - total
            ids.append(torch.full((pad,), cfg.pad_token_id))
            labels.append(torch.full((pad,), IGNORE_INDEX))
            positions.append(torch.arange(pad).expand(3, -1))
            lengths.append(pad)
    grid_thw = torch.tensor(grids)
    num_patches = int((grid_thw[:, 1] * grid_thw[:, 2]).sum())
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions, dim=1)[:, None],
        "cu_seqlens": torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32),
        "pixel_values": torch.randn(num_patches, 3, 14, 14, generator=generator),
        "grid_thw": grid_thw,
    }
