"""Image-caption pairs for stage-0 SigLIP training, batched by a ViT patch budget, resumable."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from keye_train.data.loader.encode import SkipCounter, decode_image
from keye_train.data.loader.stream import EpochStream, StreamState
from keye_train.data.media.image import ImageConfig, preprocess_image
from keye_train.data.shards.manifest import DataConfig
from keye_train.data.shards.sources import iter_records
from keye_train.data.text.tokenizer import LoadedTokenizer


@dataclass
class PairBatch:
    pixel_values: Tensor  # (N patches, 3, 14, 14), images in order
    grid_thw: Tensor  # (n_pairs, 3)
    text_ids: Tensor  # (n_pairs, text_len), padded as SigLIP's text tower was trained
    keys: list[str]


class PairStream(EpochStream):
    """The manifest's caption sources as (image, caption) pairs, in shard order, batched so each batch
    holds at most `max_patches` ViT patches (and at least one pair)."""

    def __init__(
        self,
        data_cfg: DataConfig,
        *,
        tokenizer: LoadedTokenizer,
        image_cfg: ImageConfig,
        max_patches: int,
        text_len: int,
    ) -> None:
        self.sources = [s for s in data_cfg.sources if s.kind == "caption"]
        if not self.sources:
            raise ValueError(
                "stage 0 needs image-caption pairs: the manifest lists no source of kind 'caption'"
            )
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.max_patches = max_patches
        self.text_len = text_len
        self.counter = SkipCounter(
            max_skip_rate=data_cfg.max_skip_rate, min_samples=data_cfg.min_samples_for_skip_rate
        )
        self.state = StreamState()
        self._iterator: Iterator[PairBatch] | None = None

    def _pairs(self) -> Iterator[tuple[str, Tensor, tuple[int, int], Tensor]]:
        for source in self.sources:
            on_error = lambda key, reason, name=source.name: self.counter.skip(name, key, reason)
            for rec in iter_records(source, on_error=on_error):
                try:
                    if not rec.media or not rec.text:
                        raise ValueError("a caption pair needs one image and a caption")
                    image = decode_image(rec.media[0][2], member=rec.media[0][0])
                    pixels, grid_hw = preprocess_image(image, self.image_cfg)
                except Exception as exc:  # a bad pair is a counted skip, never a crash
                    self.counter.skip(source.name, rec.key, f"{type(exc).__name__}: {exc}")
                    continue
                self.counter.ok(source.name)
                yield rec.key, pixels, grid_hw, self._text_ids(rec.text)

    def _text_ids(self, text: str) -> Tensor:
        ids = self.tokenizer.encode(text)[: self.text_len]
        return torch.tensor(ids + [self.tokenizer.ids.endoftext] * (self.text_len - len(ids)))

    def _epoch(self, epoch: int) -> Iterator[PairBatch]:
        batch: list[tuple[str, Tensor, tuple[int, int], Tensor]] = []
        patches = 0
        for pair in self._pairs():
            if batch and patches + pair[1].shape[0] > self.max_patches:
                yield self._collate(batch)
                batch, patches = [], 0
            batch.append(pair)
            patches += pair[1].shape[0]
        if batch:
            yield self._collate(batch)

    @staticmethod
    def _collate(pairs: list[tuple[str, Tensor, tuple[int, int], Tensor]]) -> PairBatch:
        return PairBatch(
            pixel_values=torch.cat([p[1] for p in pairs]),
            grid_thw=torch.tensor([[1, *p[2]] for p in pairs]),
            text_ids=torch.stack([p[3] for p in pairs]),
            keys=[p[0] for p in pairs],
        )
