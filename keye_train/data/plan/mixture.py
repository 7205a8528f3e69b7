"""Mix several sample streams to target token (or sample) shares, deterministically for a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class _HasTokens(Protocol):
    @property
    def num_tokens(self) -> int: ...


@dataclass
class SourceTally:
    target: float
    tokens: int = 0
    samples: int = 0
    exhausted: bool = False


@dataclass
class Mixture:
    """Draws the next sample from a source chosen at random in proportion to how far it lags its target.

    A source's lag is target_share * (tokens so far + expected next length) - its tokens; sampling by lag
    keeps realised shares within a fraction of a percent of the targets after a few thousand samples
    whatever the sample lengths, while the order still varies with the seed. With by_tokens=False the same
    rule counts samples instead of tokens. An exhausted source drops out (on_exhausted="drop", the other
    shares renormalise) or ends the mixture (on_exhausted="stop").
    """

    streams: Mapping[str, Iterator[Any]]
    shares: Mapping[str, float]
    seed: int = 0
    by_tokens: bool = True
    on_exhausted: str = "stop"
    tally: dict[str, SourceTally] = field(init=False)

    def __post_init__(self) -> None:
        if set(self.streams) != set(self.shares):
            raise ValueError(
                f"mixture streams {sorted(self.streams)} and shares {sorted(self.shares)} differ"
            )
        if any(v <= 0 for v in self.shares.values()):
            raise ValueError(f"mixture shares must be positive, got {dict(self.shares)}")
        if self.on_exhausted not in ("stop", "drop"):
            raise ValueError(f"mixture on_exhausted={self.on_exhausted!r} must be 'stop' or 'drop'")
        total = sum(self.shares.values())
        # Sorted names make the draw order independent of the caller's dict order.
        self.names = sorted(self.shares)
        self.tally = {n: SourceTally(target=self.shares[n] / total) for n in self.names}
        self.rng = random.Random(self.seed)

    def _have(self, name: str) -> int:
        t = self.tally[name]
        return t.tokens if self.by_tokens else t.samples

    def _choose(self) -> str:
        live = [n for n in self.names if not self.tally[n].exhausted]
        total_target = sum(self.tally[n].target for n in live)
        done = sum(self._have(n) for n in live)
        count = sum(self.tally[n].samples for n in live)
        expected = done / count if count and self.by_tokens else 1.0
        lags = [
            max(self.tally[n].target / total_target * (done + expected) - self._have(n), 0.0) for n in live
        ]
        if sum(lags) <= 0:
            lags = [self.tally[n].target for n in live]
        return self.rng.choices(live, weights=lags, k=1)[0]

    def __iter__(self) -> Iterator[Any]:
        while any(not t.exhausted for t in self.tally.values()):
            name = self._choose()
            try:
                sample = next(self.streams[name])
            except StopIteration:
                self.tally[name].exhausted = True
                if self.on_exhausted == "stop":
                    return
                continue
            t = self.tally[name]
            t.samples += 1
            t.tokens += int(getattr(sample, "num_tokens", 0))
            yield sample

    def report(self) -> dict[str, dict[str, float]]:
        """Target and realised shares per source (of tokens when by_tokens, else of samples)."""
        key = "tokens" if self.by_tokens else "samples"
        total = sum(getattr(t, key) for t in self.tally.values()) or 1
        return {
            n: {
                "target": t.target,
                "realised": getattr(t, key) / total,
                "tokens": t.tokens,
                "samples": t.samples,
                "exhausted": t.exhausted,
            }
            for n, t in self.tally.items()
        }
