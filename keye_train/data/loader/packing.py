"""Pack EncodedSamples into fixed-length PackedBatches without splitting a sample across sequences."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from keye_train.data.batch import IGNORE_INDEX, EncodedSample, PackedBatch

log = logging.getLogger(__name__)

OVERLONG_POLICIES = ("skip", "truncate_text")


@dataclass
class PackingConfig:
    max_seq_len: int = 8192
    overlong: str = "skip"  # skip | truncate_text (cuts trailing text only, never a visual block)
    open_bins: int = 4  # sequences being filled at once; more bins pack tighter, first-fit
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"packing.max_seq_len={self.max_seq_len} must be >= 2")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"packing.overlong={self.overlong!r} must be one of {OVERLONG_POLICIES}")
        if self.open_bins < 1:
            raise ValueError(f"packing.open_bins={self.open_bins} must be >= 1")


@dataclass
class PackingStats:
    samples: int = 0
    sequences: int = 0
    tokens: int = 0
    pad_tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_keys: list[str] = field(default_factory=list)

    @property
    def fill(self) -> float:
        total = self.tokens + self.pad_tokens
        return self.tokens / total if total else 0.0


def visual_spans(input_ids: torch.Tensor, *, vision_start: int, vision_end: int) -> list[tuple[int, int]]:
    """[start, end) of every `<|vision_start|> ... <|vision_end|>` block."""
    starts = (input_ids == vision_start).nonzero().flatten().tolist()
    ends = (input_ids == vision_end).nonzero().flatten().tolist()
    if len(starts) != len(ends):
        raise ValueError(f"{len(starts)} vision_start but {len(ends)} vision_end tokens in the sample")
    return [(s, e + 1) for s, e in zip(starts, ends)]


def truncate_text(
    sample: EncodedSample, *, max_len: int, vision_start: int, vision_end: int
) -> EncodedSample:
    """Keep the first max_len tokens when everything cut is text; raise ValueError otherwise."""
    spans = visual_spans(sample.input_ids, vision_start=vision_start, vision_end=vision_end)
    last_visual_end = max((e for _, e in spans), default=0)
    if last_visual_end > max_len:
        raise ValueError(f"cutting at {max_len} tokens would cut a visual block ending at {last_visual_end}")
    labels = sample.labels[:max_len].clone()
    labels[-1] = IGNORE_INDEX  # its target was cut away; the last position never carries loss
    return EncodedSample(
        key=sample.key,
        source=sample.source,
        kind=sample.kind,
        input_ids=sample.input_ids[:max_len].clone(),
        labels=labels,
        position_ids=sample.position_ids[:, :max_len].clone(),
        pixel_values=sample.pixel_values,
        grid_thw=sample.grid_thw,
    )


def build_batch(samples: list[EncodedSample], *, max_seq_len: int, pad_token_id: int) -> PackedBatch:
    """Concatenate samples and pad to max_seq_len; the padding is a segment of its own."""
    used = sum(s.num_tokens for s in samples)
    if used > max_seq_len:
        raise ValueError(f"{used} tokens do not fit max_seq_len={max_seq_len}")
    pad = max_seq_len - used
    ids = [s.input_ids for s in samples]
    labels = [s.labels for s in samples]
    positions = [s.position_ids for s in samples]
    lengths = [s.num_tokens for s in samples]
    if pad:
        ids.append(torch.full((pad,), pad_token_id, dtype=torch.long))
        labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
        positions.append(torch.arange(pad, dtype=torch.long).expand(3, pad))
        lengths.append(pad)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    pixel = [s.pixel_values for s in samples if s.pixel_values.numel()]
    grids = [s.grid_thw for s in samples if s.grid_thw.numel()]
    return PackedBatch(
        input_ids=torch.cat(ids)[None],
        labels=torch.cat(labels)[None],
        position_ids=torch.cat(positions, dim=1)[:, None, :],
        cu_seqlens=cu,
        pixel_values=torch.cat(pixel) if pixel else torch.empty(0, 3, 14, 14),
        grid_thw=torch.cat(grids) if grids else torch.empty(0, 3, dtype=torch.long),
        sample_keys=[s.key for s in samples],
    )


class Packer:
    """First-fit packing over a few open sequences; the fullest is emitted when a new one is needed."""

    def __init__(self, cfg: PackingConfig, *, vision_start: int, vision_end: int) -> None:
        self.cfg = cfg
        self.vision_start, self.vision_end = vision_start, vision_end
        self.stats = PackingStats()
        self._bins: list[list[EncodedSample]] = []
        self._fill: list[int] = []

    def _fit(self, sample: EncodedSample) -> EncodedSample | None:
        limit = self.cfg.max_seq_len
        if sample.num_tokens <= limit:
            return sample
        if self.cfg.overlong == "truncate_text":
            try:
                sample = truncate_text(
                    sample, max_len=limit, vision_start=self.vision_start, vision_end=self.vision_end
                )
                self.stats.truncated += 1
                return sample
            except ValueError as exc:
                reason = f"overlong, not truncatable: {exc}"
        else:
            reason = "overlong"
        self.stats.skipped[reason.split(":")[0]] += 1
        self.stats.skipped_keys.append(sample.key)
        log.warning(
            "packing: skipped %s (%d tokens > max_seq_len %d): %s",
            sample.key,
            sample.num_tokens,
            limit,
            reason,
        )
        return None

    def _emit(self, index: int) -> PackedBatch:
        samples = self._bins.pop(index)
        used = self._fill.pop(index)
        self.stats.sequences += 1
        self.stats.pad_tokens += self.cfg.max_seq_len - used
        return build_batch(samples, max_seq_len=self.cfg.max_seq_len, pad_token_id=self.cfg.pad_token_id)

    def add(self, sample: EncodedSample) -> Iterator[PackedBatch]:
        """Place one sample; yields the sequences that became complete."""
        fitted = self._fit(sample)
        if fitted is None:
            return
        n = fitted.num_tokens
        self.stats.samples += 1
        self.stats.tokens += n
        for i, used in enumerate(self._fill):
            if used + n <= self.cfg.max_seq_len:
                self._bins[i].append(fitted)
                self._fill[i] += n
                if self._fill[i] == self.cfg.max_seq_len:
                    yield self._emit(i)
                return
        if len(self._bins) >= self.cfg.open_bins:
            yield self._emit(max(range(len(self._fill)), key=self._fill.__getitem__))
        self._bins.append([fitted])
        self._fill.append(n)
        if n == self.cfg.max_seq_len:
            yield self._emit(len(self._bins) - 1)

    def flush(self) -> Iterator[PackedBatch]:
        while self._bins:
            yield self._emit(0)


def pack(
    samples: Iterable[EncodedSample], *, cfg: PackingConfig, vision_start: int, vision_end: int
) -> Iterator[PackedBatch]:
    """Pack a stream of samples; see Packer."""
    packer = Packer(cfg, vision_start=vision_start, vision_end=vision_end)
    for sample in samples:
        yield from packer.add(sample)
    yield from packer.flush()
