"""Cost-balanced planning of a global batch: samples to DP ranks and packed microbatches.

Greedy longest-processing-time-first (LPT) is the default: sort by cost, give each sample to the least
loaded rank that still has a microbatch with room for its tokens. Karmarkar-Karp (largest differencing)
is an option for few ranks, where it partitions more evenly. Hand-written because no library plans
under both a cost objective and a per-microbatch token capacity. The batch's visual items are spread
over all ranks by the ViT router (distributed/vision.py, `greedy_longest_first`).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

METHODS = ("lpt", "kk", "random")


@dataclass(frozen=True)
class PlanItem:
    index: int  # position of the sample in the global batch
    cost: float
    tokens: int  # LLM tokens, for the max_seq_len packing constraint


@dataclass
class RankPlan:
    microbatches: list[list[int]]  # item indices per packed microbatch
    microbatch_tokens: list[int]
    cost: float = 0.0

    @property
    def items(self) -> list[int]:
        return [i for mb in self.microbatches for i in mb]


@dataclass
class BatchPlan:
    ranks: list[RankPlan]
    deferred: list[int] = field(default_factory=list)  # fitted nowhere: carried to the next batch
    oversized: list[int] = field(default_factory=list)  # cost alone exceeds a rank's fair share

    @property
    def costs(self) -> list[float]:
        return [r.cost for r in self.ranks]

    @property
    def max_over_mean(self) -> float:
        mean = sum(self.costs) / len(self.ranks)
        return max(self.costs) / mean if mean > 0 else 1.0

    def report(self, items: Sequence[PlanItem]) -> dict[str, float | int]:
        placed = [items[i] for r in self.ranks for i in r.items]
        return {
            "max_over_mean": self.max_over_mean,
            "lower_bound": lower_bound(placed, len(self.ranks)),
            "deferred": len(self.deferred),
            "oversized": len(self.oversized),
        }


def lower_bound(items: Sequence[PlanItem], num_ranks: int) -> float:
    """No assignment beats max(mean share, largest item) / mean share."""
    total = sum(it.cost for it in items)
    if total == 0:
        return 1.0
    mean = total / num_ranks
    return max(mean, max(it.cost for it in items)) / mean


def _empty_ranks(num_ranks: int, microbatches: int) -> list[RankPlan]:
    return [
        RankPlan(microbatches=[[] for _ in range(microbatches)], microbatch_tokens=[0] * microbatches)
        for _ in range(num_ranks)
    ]


def _best_fit(rank: RankPlan, tokens: int, capacity: int) -> int | None:
    """The fullest microbatch that still fits (keeps big holes for big samples)."""
    best, best_fill = None, -1
    for m, fill in enumerate(rank.microbatch_tokens):
        if fill + tokens <= capacity and fill > best_fill:
            best, best_fill = m, fill
    return best


def _place(rank: RankPlan, item: PlanItem, microbatch: int) -> None:
    rank.microbatches[microbatch].append(item.index)
    rank.microbatch_tokens[microbatch] += item.tokens
    rank.cost += item.cost


def _plan_lpt(items: Sequence[PlanItem], ranks: list[RankPlan], capacity: int) -> list[int]:
    heap = [(r.cost, i) for i, r in enumerate(ranks)]
    heapq.heapify(heap)
    deferred = []
    for item in sorted(items, key=lambda it: (-it.cost, it.index)):
        skipped = []
        while heap:
            cost, r = heapq.heappop(heap)
            m = _best_fit(ranks[r], item.tokens, capacity)
            if m is not None:
                _place(ranks[r], item, m)
                heapq.heappush(heap, (ranks[r].cost, r))
                break
            skipped.append((cost, r))
        else:
            deferred.append(item.index)
        for entry in skipped:
            heapq.heappush(heap, entry)
    return deferred


def _plan_kk(items: Sequence[PlanItem], ranks: list[RankPlan], capacity: int) -> list[int]:
    """Largest differencing: merge the two partial k-partitions with the largest spread, pairing the
    heaviest subsets of one with the lightest of the other. Then pack each rank; overflow goes LPT."""
    k = len(ranks)
    # Each entry: (-spread, tiebreak, subsets sorted by descending sum as (sum, [item indices])).
    heap = []
    for n, item in enumerate(items):
        subsets = [(item.cost, [n])] + [(0.0, []) for _ in range(k - 1)]
        heap.append((-item.cost, n, subsets))
    heapq.heapify(heap)
    while len(heap) > 1:
        _, tie, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
    subsets = heap[0][2] if heap else [(0.0, []) for _ in range(k)]
    overflow = []
    for rank, (_, members) in zip(ranks, subsets):
        for n in sorted(members, key=lambda n: -items[n].tokens):
            m = _best_fit(rank, items[n].tokens, capacity)
            if m is None:
                overflow.append(items[n])
            else:
                _place(rank, items[n], m)
    return _plan_lpt(overflow, ranks, capacity)


def _plan_random(items: Sequence[PlanItem], ranks: list[RankPlan], capacity: int, seed: int) -> list[int]:
    """Baseline: shuffle, then deal equal counts round-robin (what a plain distributed sampler does)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    deferred = []
    for n, item in enumerate(order):
        rank = ranks[n % len(ranks)]
        m = _best_fit(rank, item.tokens, capacity)
        if m is None:
            deferred.append(item.index)
        else:
            _place(rank, item, m)
    return deferred


def plan_batch(
    items: Sequence[PlanItem],
    *,
    num_ranks: int,
    microbatches: int,
    max_seq_len: int,
    method: str = "lpt",
    seed: int = 0,
) -> BatchPlan:
    """Assign a global batch's samples to num_ranks x microbatches packed sequences of max_seq_len tokens.

    Deterministic for its inputs. Samples that fit nowhere are deferred (the caller carries them into
    the next batch, so nothing is lost); samples whose cost alone exceeds the fair share are reported
    because no split over ranks can balance them (they need context parallelism or a bigger budget).
    """
    if method not in METHODS:
        raise ValueError(f"balance.method={method!r} is unknown; use one of {METHODS}")
    if num_ranks < 1 or microbatches < 1:
        raise ValueError(f"num_ranks={num_ranks} and microbatches={microbatches} must be >= 1")
    too_long = [it.index for it in items if it.tokens > max_seq_len]
    if too_long:
        raise ValueError(
            f"samples {too_long[:5]} have more tokens than max_seq_len={max_seq_len}; the packing policy "
            f"must skip or truncate them before planning"
        )
    ranks = _empty_ranks(num_ranks, microbatches)
    if method == "lpt":
        deferred = _plan_lpt(items, ranks, max_seq_len)
    elif method == "kk":
        deferred = _plan_kk(items, ranks, max_seq_len)
    else:
        deferred = _plan_random(items, ranks, max_seq_len, seed)
    share = sum(it.cost for it in items) / num_ranks
    oversized = [it.index for it in items if it.cost > share]
    return BatchPlan(ranks=ranks, deferred=deferred, oversized=oversized)
