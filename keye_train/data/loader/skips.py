"""Skip counters of the whole world, kept in the loader state so the skip-rate ceiling survives resumes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from keye_train.data.loader.encode import SkipCounter


class WorldSkips:
    """`local` counts (and logs, with key and reason) what this rank skipped while planning or decoding;
    it never stops the run by itself. Each step the loaders sum every rank's new counts over the world
    (`merge`), so `total` is the same on every rank, is what a checkpoint saves, and is what the
    ceiling (max_skip_rate once a source has seen min_samples) is checked against: a resume continues
    the count instead of starting again at zero."""

    def __init__(self, sources: Iterable[str], *, max_skip_rate: float, min_samples: int) -> None:
        self.names = sorted(sources)
        self.total = SkipCounter(max_skip_rate=max_skip_rate, min_samples=min_samples)
        self.local = SkipCounter(max_skip_rate=1.0, min_samples=min_samples)  # checked via total only
        self._reported = dict.fromkeys(self.names, (0, 0))

    def delta(self) -> list[int]:
        """(seen, skipped) per source counted locally since the last call, flat in name order."""
        out: list[int] = []
        for name in self.names:
            seen, skipped = self.local.seen[name], self.local.skipped[name]
            before = self._reported[name]
            out += [seen - before[0], skipped - before[1]]
            self._reported[name] = (seen, skipped)
        return out

    def merge(self, delta: list[int] | None, *, distributed: bool) -> None:
        """Add every rank's delta (None: this rank counted nothing) to the totals, then check the ceiling.
        Collective over the world when distributed."""
        counts = torch.tensor(delta or [0] * (2 * len(self.names)), dtype=torch.int64)
        if distributed:
            dist.all_reduce(counts)
        for i, name in enumerate(self.names):
            self.total.seen[name] += int(counts[2 * i])
            self.total.skipped[name] += int(counts[2 * i + 1])
        for name in self.names:
            self.check(name)

    def check(self, name: str) -> None:
        t = self.total
        if t.seen[name] >= t.min_samples and t.rate(name) > t.max_skip_rate:
            # One line: the count, the rate, the ceiling and what to do (reasons are in the log above).
            raise RuntimeError(
                f"data source {name!r}: {t.skipped[name]} of {t.seen[name]} samples skipped "
                f"({t.rate(name):.1%} > data.max_skip_rate {t.max_skip_rate:.1%}, counted across resumes); "
                f"local reasons {dict(self.local.reasons.get(name, {}))}; fix the data or raise the "
                "manifest's max_skip_rate"
            )

    def state_dict(self) -> dict[str, Any]:
        return {n: [self.total.seen[n], self.total.skipped[n]] for n in self.names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self.names:
            seen, skipped = state.get(name, (0, 0))
            self.total.seen[name], self.total.skipped[name] = int(seen), int(skipped)
