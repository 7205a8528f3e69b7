"""Global sample order: a pure function of (seed, epoch, manifest) over shard indexes, cursor per source."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from keye_train.data.plan.cost import CostModel
from keye_train.data.plan.mixture import Mixture
from keye_train.data.shards.manifest import DataConfig, SourceConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class SampleRef:
    """One sample of the order: where it lives (shard and index entry) and its predicted size and cost."""

    source: str
    shard: int  # position in the source's expanded shard list
    entry: int  # position in that shard's index
    key: str
    tokens: int  # predicted LLM tokens (from the index, no decoding)
    cost: float  # predicted cost (CostModel units)
    epoch: int = 0
    error: str | None = None  # the index says the encoder would refuse it: the planner skips it, counted

    @property
    def num_tokens(self) -> int:  # what Mixture counts
        return self.tokens

    def as_state(self) -> list:
        return [self.source, self.shard, self.entry, self.key]


@dataclass
class _SourceTable:
    """A source's index entries flattened shard-major, with predicted tokens and costs per entry."""

    config: SourceConfig
    shard_start: np.ndarray  # (shards + 1,) flat position of each shard's first entry
    entries: list[Any]  # IndexEntry per flat position
    tokens: np.ndarray  # (n,) int64
    costs: np.ndarray  # (n,) float64

    def __len__(self) -> int:
        return len(self.entries)

    def flat(self, shard: int, entry: int) -> int:
        if not 0 <= shard < len(self.shard_start) - 1:
            raise ValueError(f"source {self.config.name!r}: shard {shard} out of range")
        flat = int(self.shard_start[shard]) + entry
        if not entry >= 0 or flat >= self.shard_start[shard + 1]:
            raise ValueError(f"source {self.config.name!r}: entry {entry} out of range in shard {shard}")
        return flat

    def shard_of(self, flat: int) -> int:
        return int(np.searchsorted(self.shard_start, flat, side="right")) - 1


def _default_index() -> tuple[Callable, Callable]:
    # Imported lazily: the index module pulls in PIL/PyAV header readers that planning-free ranks skip.
    from keye_train.data.shards.index import load_index, predict_tokens

    return load_index, predict_tokens


def build_tables(
    data_cfg: DataConfig,
    *,
    image_cfg: Any,
    video_cfg: Any,
    cost_model: CostModel,
    load_index: Callable | None = None,
    predict_tokens: Callable | None = None,
) -> dict[str, _SourceTable]:
    """Read every shard's index (never the shard) and predict each sample's tokens and cost."""
    default_load, default_predict = _default_index()
    load_index = load_index or default_load
    predict_tokens = predict_tokens or default_predict
    tables = {}
    for source in data_cfg.sources:
        starts, entries, tokens, costs = [0], [], [], []
        for shard in source.shards:
            shard_entries = load_index(shard)
            for e in shard_entries:
                if getattr(e, "error", None):  # nothing to predict; the planner skips it with the reason
                    tokens.append(0)
                    costs.append(0.0)
                    continue
                try:
                    llm_tokens, frame_patches = predict_tokens(e, image_cfg=image_cfg, video_cfg=video_cfg)
                except ValueError as exc:  # e.g. an aspect ratio over 200: the encoder would refuse it too
                    e.error = f"{type(exc).__name__}: {exc}"
                    tokens.append(0)
                    costs.append(0.0)
                    continue
                tokens.append(int(llm_tokens))
                costs.append(cost_model.sample_cost(tokens=int(llm_tokens), frame_patches=frame_patches))
            entries += shard_entries
            starts.append(len(entries))
        if not entries:
            raise ValueError(f"source {source.name!r}: its shards' indexes list no sample ({source.shards})")
        tables[source.name] = _SourceTable(
            config=source,
            shard_start=np.asarray(starts, dtype=np.int64),
            entries=entries,
            tokens=np.asarray(tokens, dtype=np.int64),
            costs=np.asarray(costs, dtype=np.float64),
        )
    return tables


@dataclass
class _PositionalMixture(Mixture):
    """Mixture whose draw is seeded by the current position (the cursors), not by a running generator.

    Mixture's lag rule is kept as is; only the random number behind each draw becomes a function of
    (seed, epoch, bases, cursors), so the order can be resumed from the cursors alone instead of a
    generator's 2.5 KB state. A source counts as exhausted as soon as its cursor reaches its end, so
    the draws after a resume see the same live sources as the uninterrupted run did.
    """

    position: Callable[[], str] | None = None
    is_live: Callable[[str], bool] | None = None

    def _choose(self) -> str:
        for name in self.names:
            if not self.is_live(name):
                self.tally[name].exhausted = True
        if all(self.tally[n].exhausted for n in self.names):
            return self.names[0]  # its stream is empty: Mixture's loop ends on the StopIteration
        self.rng.seed(self.position())
        return super()._choose()


class GlobalOrder:
    """Per source a seeded permutation of its (shard, entry) pairs each epoch, mixed to the target shares.

    The mixture uses predicted tokens (or sample counts when the manifest gives weights) and the lag rule
    of data/plan/mixture.py. The position is an epoch plus one cursor per source; `bases` are the cursors at
    which the current shares took effect (the lag counts from there), so a new stage with new shares
    continues every source at its own cursor. The state never depends on workers or DP size.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        *,
        tables: Mapping[str, _SourceTable],
        shares: Mapping[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        self.data_cfg = data_cfg
        self.tables = dict(tables)
        self.seed = data_cfg.seed if seed is None else int(seed)
        self.shares = dict(shares) if shares else data_cfg.target_shares()
        names = sorted(self.tables)
        if sorted(self.shares) != names:
            raise ValueError(f"data shares {self.shares} must name every source of the manifest: {names}")
        bad = {k: v for k, v in self.shares.items() if not v > 0}
        if bad:
            raise ValueError(f"data shares must be > 0, got {bad}")
        self.names = names
        self.epoch = 0
        self.cursors = dict.fromkeys(names, 0)
        self.bases = dict.fromkeys(names, 0)
        self._perm: dict[str, np.ndarray] = {}
        self._prefix: dict[str, np.ndarray] = {}
        self._iter: Iterator[SampleRef] | None = None

    # -- the order ----------------------------------------------------------------------------------
    def permutation(self, name: str, epoch: int) -> np.ndarray:
        """Flat entry positions of source `name` in the order of `epoch` (seeded by seed, epoch, name)."""
        source_id = zlib.crc32(name.encode())  # stable across processes, unlike hash()
        rng = np.random.default_rng([self.seed, epoch, source_id])
        return rng.permutation(len(self.tables[name]))

    def _start_epoch(self) -> None:
        for name in self.names:
            perm = self.permutation(name, self.epoch)
            self._perm[name] = perm
            self._prefix[name] = np.concatenate([[0], np.cumsum(self.tables[name].tokens[perm])])
        self._iter = None

    def _stream(self, name: str) -> Iterator[SampleRef]:
        perm, n = self._perm[name], len(self.tables[name])
        while self.cursors[name] < n:
            flat = int(perm[self.cursors[name]])
            self.cursors[name] += 1
            yield self.ref_at(name, flat)

    def _position(self) -> str:
        bases = ",".join(str(self.bases[n]) for n in self.names)
        cursors = ",".join(str(self.cursors[n]) for n in self.names)
        return f"{self.seed}/{self.epoch}/{bases}/{cursors}"

    def _mixture(self) -> Iterator[SampleRef]:
        mixture = _PositionalMixture(
            {n: self._stream(n) for n in self.names},
            self.shares,
            seed=self.seed,
            by_tokens=self.data_cfg.by_tokens,
            on_exhausted="drop",
            position=self._position,
            is_live=lambda n: self.cursors[n] < len(self.tables[n]),
        )
        for name in self.names:  # the lag counts what was drawn since the shares took effect
            tally = mixture.tally[name]
            tally.samples = self.cursors[name] - self.bases[name]
            tally.tokens = int(self._prefix[name][self.cursors[name]] - self._prefix[name][self.bases[name]])
        return iter(mixture)

    def __iter__(self) -> Iterator[SampleRef]:
        return self

    def __next__(self) -> SampleRef:
        for _ in range(2):  # at most one epoch boundary per draw
            if not self._perm:
                self._start_epoch()
            if self._iter is None:
                self._iter = self._mixture()
            ref = next(self._iter, None)
            if ref is not None:
                return ref
            log.info("data order: epoch %d finished", self.epoch)
            self.epoch += 1
            self.cursors = dict.fromkeys(self.names, 0)
            self.bases = dict.fromkeys(self.names, 0)
            self._perm = {}
        raise RuntimeError("data order produced no sample in a fresh epoch; every source is empty")

    def ref_at(self, name: str, flat: int) -> SampleRef:
        table = self.tables[name]
        shard = table.shard_of(flat)
        error = getattr(table.entries[flat], "error", None)
        return SampleRef(
            source=name,
            shard=shard,
            entry=flat - int(table.shard_start[shard]),
            key=str(table.entries[flat].key),
            tokens=int(table.tokens[flat]),
            cost=float(table.costs[flat]),
            epoch=self.epoch,
            error=str(error) if error else None,
        )

    def ref(self, state: list, *, epoch: int) -> SampleRef:
        """The SampleRef of a saved [source, shard, entry, key]; the key guards against changed shards."""
        name, shard, entry, key = state
        if name not in self.tables:
            raise ValueError(
                f"saved sample {key!r} is from source {name!r}, not in the manifest {self.names}"
            )
        ref = self.ref_at(name, self.tables[name].flat(int(shard), int(entry)))
        if ref.key != key:
            raise ValueError(
                f"saved sample {key!r} (source {name!r}, shard {shard}, entry {entry}) is now {ref.key!r}: "
                f"the shards changed since the checkpoint; rebuild the index or drop the data state"
            )
        return SampleRef(**{**ref.__dict__, "epoch": epoch})

    def entry(self, ref: SampleRef) -> tuple[str, Any, SourceConfig]:
        """(shard path, IndexEntry, SourceConfig) of a ref: what read_record needs."""
        table = self.tables[ref.source]
        flat = table.flat(ref.shard, ref.entry)
        return table.config.shards[ref.shard], table.entries[flat], table.config

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursors": dict(self.cursors),
            "bases": dict(self.bases),
            "shares": dict(self.shares),
            "sizes": {n: len(t) for n, t in self.tables.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position. Missing sources start at 0; changed shares restart the lag."""
        if int(state.get("version", STATE_VERSION)) != STATE_VERSION:
            raise ValueError(f"data order state version {state.get('version')} is not {STATE_VERSION}")
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data order state has seed {state['seed']} but data.seed is {self.seed}; the order would "
                f"differ, so the saved cursors do not apply"
            )
        for name, size in state.get("sizes", {}).items():
            if name in self.tables and int(size) != len(self.tables[name]):
                raise ValueError(
                    f"source {name!r} had {size} samples at the checkpoint and has {len(self.tables[name])} "
                    f"now; its permutation and cursor no longer apply"
                )
        dropped = sorted(set(state.get("cursors", {})) - set(self.names))
        if dropped:
            log.warning("data order: saved sources %s are no longer in the manifest; ignored", dropped)
        self.epoch = int(state.get("epoch", 0))
        cursors, bases = state.get("cursors", {}), state.get("bases", {})
        for name in self.names:
            self.cursors[name] = int(cursors.get(name, 0))
            self.bases[name] = int(bases.get(name, 0))
            if not 0 <= self.bases[name] <= self.cursors[name] <= len(self.tables[name]):
                raise ValueError(
                    f"source {name!r}: saved base {self.bases[name]} / cursor {self.cursors[name]} outside "
                    f"0..{len(self.tables[name])}"
                )
        saved_shares = state.get("shares")
        if saved_shares is not None and _normalised(saved_shares) != _normalised(self.shares):
            log.info(
                "data order: shares changed %s -> %s; each source continues at its cursor",
                dict(saved_shares),
                self.shares,
            )
            self.bases = dict(self.cursors)
        self._perm = {}
        self._iter = None


def _normalised(shares: Mapping[str, float]) -> dict[str, float]:
    total = sum(shares.values())
    return {k: round(v / total, 12) for k, v in sorted(shares.items())}
