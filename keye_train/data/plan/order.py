"""Global sample order: a pure function of (seed, epoch, manifest) over shard indexes, cursor per source."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# The tables were planned here first; importable from here as the loaders and tests use them.
from keye_train.data.plan.tables import _SourceTable, build_tables  # noqa: F401
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


@dataclass(frozen=True)
class Drawn:
    """Samples drawn from the order, as arrays: source index (in sorted names), flat position, epoch."""

    source: np.ndarray
    flat: np.ndarray
    epoch: np.ndarray

    def __len__(self) -> int:
        return len(self.source)


class GlobalOrder:
    """Per source a seeded permutation of its (shard, entry) pairs each epoch, mixed to the target shares.

    The mixture uses predicted tokens (or sample counts when the manifest gives weights) and draws the
    source whose next sample is due first (`_due`). The position is an epoch plus one cursor per source;
    `bases` are the cursors at which the current shares took effect (the due-time clock counts from
    there), so a new stage with new shares continues every source at its own cursor. The state never
    depends on workers or DP size.
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
        self._drawn: dict[str, float] = {}
        self._by_tokens = data_cfg.by_tokens
        total = sum(self.shares.values())
        self._share = {n: self.shares[n] / total for n in names}

    # -- the order ----------------------------------------------------------------------------------
    def permutation(self, name: str, epoch: int) -> np.ndarray:
        """Flat entry positions of source `name` in the order of `epoch` (seeded by seed, epoch, name)."""
        source_id = zlib.crc32(name.encode())  # stable across processes, unlike hash()
        rng = np.random.default_rng([self.seed, epoch, source_id])
        perm = rng.permutation(len(self.tables[name]))
        return perm.astype(np.int32) if len(perm) < 2**31 else perm  # half the memory at 100M samples

    def _start_epoch(self) -> None:
        for name in self.names:
            self._perm[name] = self.permutation(name, self.epoch)
        self._drawn = {}  # tokens (or samples) drawn since each source's base: the due-time clock
        for name in self.names:
            taken = self._perm[name][self.bases[name] : self.cursors[name]]
            self._drawn[name] = float(
                self.tables[name].tokens[taken].sum() if self._by_tokens else len(taken)
            )

    def _size(self, name: str, flat: int) -> float:
        return float(self.tables[name].tokens[flat]) if self._by_tokens else 1.0

    def _due(self, name: str) -> float:
        """When the next sample of `name` is due in the mixed stream: the midpoint of its tokens on the
        source's own clock, scaled by 1/share. Drawing the smallest due time keeps every source within
        one sample of its share of everything drawn so far, and is a pure function of the cursors."""
        flat = int(self._perm[name][self.cursors[name]])
        return (self._drawn[name] + 0.5 * self._size(name, flat)) / self._share[name]

    def __iter__(self) -> Iterator[SampleRef]:
        return self

    def __next__(self) -> SampleRef:
        """The next sample: the live source with the smallest due time (ties: first name)."""
        for _ in range(2):  # at most one epoch boundary per draw
            if not self._perm:
                self._start_epoch()
            live = [n for n in self.names if self.cursors[n] < len(self.tables[n])]
            if live:
                name = min(live, key=lambda n: (self._due(n), self.names.index(n)))
                flat = int(self._perm[name][self.cursors[name]])
                self.cursors[name] += 1
                self._drawn[name] += self._size(name, flat)
                return self.ref_at(name, flat)
            self._next_epoch()
        raise RuntimeError("data order produced no sample in a fresh epoch; every source is empty")

    def _next_epoch(self) -> None:
        log.info("data order: epoch %d finished", self.epoch)
        self.epoch += 1
        self.cursors = dict.fromkeys(self.names, 0)
        self.bases = dict.fromkeys(self.names, 0)
        self._perm = {}

    def take(self, need: float, *, usable: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Drawn:
        """The next samples in the order __next__ draws them, up to the first at which the tokens of
        the `usable` ones (a mask from (source index, flat position) arrays) reach `need`. Vectorised:
        each round merges a window of every live source's next due times."""
        parts: list[tuple[np.ndarray, ...]] = []
        window = 64
        while need > 0:
            if not self._perm:
                self._start_epoch()
            live = [i for i, n in enumerate(self.names) if self.cursors[n] < len(self.tables[n])]
            if not live:
                self._next_epoch()
                if not parts and all(len(t) == 0 for t in self.tables.values()):
                    raise RuntimeError(
                        "data order produced no sample in a fresh epoch; every source is empty"
                    )
                continue
            srcs, flats, dues, poss, limit = [], [], [], [], np.inf
            for i in live:
                name = self.names[i]
                table, start = self.tables[name], self.cursors[name]
                flat = self._perm[name][start : start + window + 1]
                size = table.tokens[flat].astype(np.float64) if self._by_tokens else np.ones(len(flat))
                due = (self._drawn[name] + np.cumsum(size) - 0.5 * size) / self._share[name]
                if len(flat) > window:  # the first due time beyond the window bounds what is certain
                    limit = min(limit, float(due[window]))
                    flat, due = flat[:window], due[:window]
                srcs.append(np.full(len(flat), i))
                flats.append(flat)
                dues.append(due)
                poss.append(np.arange(len(flat)))
            src, flat, due, pos = (np.concatenate(x) for x in (srcs, flats, dues, poss))
            order = np.lexsort((pos, src, due))
            src, flat, due = src[order], flat[order], due[order]
            certain = int(np.searchsorted(due, limit, side="left"))  # strictly before the limit
            src, flat = src[:certain], flat[:certain]
            tokens = self._tokens_of(src, flat)
            gained = np.cumsum(np.where(usable(src, flat), tokens, 0))
            cut = int(np.searchsorted(gained, need, side="left")) + 1 if len(gained) else 0
            cut = min(cut, len(src))
            if cut == 0:
                window *= 4
                continue
            src, flat = src[:cut], flat[:cut]
            need -= float(gained[cut - 1])
            parts.append((src, flat, np.full(cut, self.epoch)))
            counts = np.bincount(src, minlength=len(self.names))
            for i in live:
                name = self.names[i]
                if counts[i]:
                    mine = flat[src == i]
                    self.cursors[name] += int(counts[i])
                    table = self.tables[name]
                    self._drawn[name] += (
                        float(table.tokens[mine].sum()) if self._by_tokens else float(len(mine))
                    )
            window = min(window * 4, 1 << 22) if cut == certain else window
        if not parts:
            return Drawn(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return Drawn(*(np.concatenate([p[j] for p in parts]) for j in range(3)))

    def _tokens_of(self, src: np.ndarray, flat: np.ndarray) -> np.ndarray:
        return self.column(src, flat, "tokens")

    def column(self, src: np.ndarray, flat: np.ndarray, name: str) -> np.ndarray:
        """A per-sample column (tokens, costs, errors) of the tables at (source index, flat) pairs."""
        first = getattr(self.tables[self.names[0]], name)
        out = np.empty(len(src), dtype=first.dtype)
        for i, source in enumerate(self.names):
            mask = src == i
            if mask.any():
                out[mask] = getattr(self.tables[source], name)[flat[mask]]
        return out

    def refs(self, drawn: Drawn) -> list[SampleRef]:
        """SampleRefs of drawn samples (what plans, states and metrics name)."""
        return [
            self.ref_at(self.names[i], f, epoch=e)
            for i, f, e in zip(*(a.tolist() for a in (drawn.source, drawn.flat, drawn.epoch)))
        ]

    def ref_at(self, name: str, flat: int, *, epoch: int | None = None) -> SampleRef:
        table = self.tables[name]
        shard = table.shard_of(flat)
        error = None
        if table.errors[flat]:
            entry = table.entries[flat]
            error = table.why(entry) if table.why is not None else getattr(entry, "error", None)
            error = error or "unusable"
        return SampleRef(
            source=name,
            shard=shard,
            entry=flat - int(table.shard_start[shard]),
            key=table.key(flat),
            tokens=int(table.tokens[flat]),
            cost=float(table.costs[flat]),
            epoch=self.epoch if epoch is None else epoch,
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


def _normalised(shares: Mapping[str, float]) -> dict[str, float]:
    total = sum(shares.values())
    return {k: round(v / total, 12) for k, v in sorted(shares.items())}
