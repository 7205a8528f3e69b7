"""A manifest as an endless, deterministic stream of packed batches, with a small resumable state."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from keye_train.data.batch import PackedBatch
from keye_train.data.loader.encode import LengthLimit, SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.loader.packing import PackingConfig, pack
from keye_train.data.plan.mixture import Mixture
from keye_train.data.shards.manifest import DataConfig
from keye_train.data.text.tokenizer import LoadedTokenizer

log = logging.getLogger(__name__)


@dataclass
class StreamState:
    epoch: int = 0
    batches_in_epoch: int = 0  # packed batches already consumed in this epoch


class EpochStream:
    """Batches of epoch e are a pure function of (manifest, seed, e); epochs repeat forever.

    So the state is two integers: resuming rebuilds the epoch and skips what was consumed, and yields
    exactly the batches an uninterrupted run would have. (Skipping re-decodes the skipped samples; the
    index-based loader seeks instead.) Subclasses say what one epoch yields.
    """

    counter: SkipCounter

    def _epoch(self, epoch: int) -> Iterator[Any]:
        raise NotImplementedError

    def _batches(self) -> Iterator[Any]:
        skip = self.state.batches_in_epoch
        while True:
            produced = 0
            for n, batch in enumerate(self._epoch(self.state.epoch)):
                produced += 1
                if n < skip:
                    continue
                self.state.batches_in_epoch = n + 1
                yield batch
            if produced == 0:
                raise RuntimeError(
                    "the manifest produced no batch in a whole epoch; were all samples skipped? "
                    f"skips: {self.counter.summary()}"
                )
            log.info("data epoch %d finished after %d batches", self.state.epoch, produced)
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
            skip = 0

    def next_batch(self) -> Any:
        if self._iterator is None:
            self._iterator = self._batches()
        return next(self._iterator)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "batches_in_epoch": self.state.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(epoch=int(state["epoch"]), batches_in_epoch=int(state["batches_in_epoch"]))
        self._iterator = None


class PackedStream(EpochStream):
    """Epoch e mixes the manifest's sources to their token shares with seed (seed + e) and packs them."""

    def __init__(
        self,
        data_cfg: DataConfig,
        *,
        tokenizer: LoadedTokenizer,
        packing: PackingConfig,
        image_cfg: Any = None,
        video_cfg: Any = None,
        counter: SkipCounter | None = None,
        shares: dict[str, float] | None = None,
    ) -> None:
        self.data_cfg = data_cfg
        self.tokenizer = tokenizer
        self.packing = packing
        self.encoder = SampleEncoder(tokenizer, image_cfg=image_cfg, video_cfg=video_cfg)
        self.counter = counter or SkipCounter(
            max_skip_rate=data_cfg.max_skip_rate, min_samples=data_cfg.min_samples_for_skip_rate
        )
        self.shares = dict(shares) if shares else data_cfg.target_shares()
        unknown = sorted(set(self.shares) - {s.name for s in data_cfg.sources})
        if unknown or len(self.shares) != len(data_cfg.sources):
            raise ValueError(
                f"data shares {self.shares} must name every source of the manifest exactly: "
                f"{sorted(s.name for s in data_cfg.sources)}"
            )
        self.state = StreamState()
        self._iterator: Iterator[PackedBatch] | None = None

    def _epoch(self, epoch: int) -> Iterator[PackedBatch]:
        # Overlong samples are fitted (or skipped and counted) here, so the packer never drops one.
        limit = LengthLimit(max_seq_len=self.packing.max_seq_len, overlong=self.packing.overlong)
        streams = {
            s.name: iter_source_samples(s, encoder=self.encoder, counter=self.counter, limit=limit)
            for s in self.data_cfg.sources
        }
        mixture = Mixture(
            streams,
            self.shares,
            seed=self.data_cfg.seed + epoch,
            by_tokens=self.data_cfg.by_tokens,
            on_exhausted="drop",
        )
        ids = self.tokenizer.ids
        return pack(mixture, cfg=self.packing, vision_start=ids.vision_start, vision_end=ids.vision_end)
