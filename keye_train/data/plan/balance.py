"""Cost-balanced planning of a global batch: samples to DP ranks and packed microbatches.

Greedy longest-processing-time-first (LPT) is the default: sort by cost, give each sample to the least
loaded rank that still has a microbatch with room for its tokens. Karmarkar-Karp (largest differencing)
is an option for few ranks, where it partitions more evenly. Hand-written because no library plans
under both a cost objective and a per-microbatch token capacity. The batch's visual items are spread
over all ranks by the ViT router (distributed/vision_plan.py, `greedy_longest_first`).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METHODS = ("lpt", "kk", "random")
# Items placed one by one before the vectorised rounds take over: at least this many, and 8 per rank.
_EXACT_MIN, _EXACT_ROUNDS = 20_000, 8
_ROUNDS_MIN_RANKS, _ROUND_SHARE = 64, 4  # rounds from 64 ranks up, each round to the lightest 1/4


@dataclass(frozen=True)
class PlanItem:
    index: int  # position of the sample in the global batch
    cost: float
    tokens: int  # LLM tokens, for the max_seq_len packing constraint


class PlanItems(Sequence):
    """Items as columns (item n has index n): what the step planner passes, so a batch of 300K samples
    is planned without 300K PlanItem objects (items[n] makes one on demand)."""

    def __init__(self, costs: np.ndarray, tokens: np.ndarray) -> None:
        self.costs = np.asarray(costs, dtype=np.float64)
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.costs)

    def __getitem__(self, n):  # type: ignore[override]
        if isinstance(n, slice):
            return [self[i] for i in range(*n.indices(len(self)))]
        return PlanItem(index=int(n), cost=float(self.costs[n]), tokens=int(self.tokens[n]))


def _columns(items: Sequence[PlanItem]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(items, PlanItems):
        return items.costs, items.tokens, np.arange(len(items), dtype=np.int64)
    n = len(items)
    return (
        np.fromiter((it.cost for it in items), dtype=np.float64, count=n),
        np.fromiter((it.tokens for it in items), dtype=np.int64, count=n),
        np.fromiter((it.index for it in items), dtype=np.int64, count=n),
    )


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
        placed = np.fromiter((i for r in self.ranks for i in r.items), dtype=np.int64)
        return {
            "max_over_mean": self.max_over_mean,
            "lower_bound": _lower_bound(_columns(items)[0][placed], len(self.ranks)),
            "deferred": len(self.deferred),
            "oversized": len(self.oversized),
        }


def lower_bound(items: Sequence[PlanItem], num_ranks: int) -> float:
    """No assignment beats max(mean share, largest item) / mean share."""
    return _lower_bound(_columns(items)[0], num_ranks)


def _lower_bound(costs: np.ndarray, num_ranks: int) -> float:
    total = float(costs.sum())
    if total == 0:
        return 1.0
    mean = total / num_ranks
    return max(mean, float(costs.max())) / mean


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


class _LptState:
    """Per-rank loads and microbatch fills, as Python lists (the exact, item-by-item placement) or
    numpy arrays (the batched rounds); `to_arrays` / `to_lists` hand over between the two."""

    def __init__(self, ranks: list[RankPlan], capacity: int) -> None:
        self.capacity = capacity
        self.cost = [r.cost for r in ranks]
        self.fills = [list(r.microbatch_tokens) for r in ranks]
        self.members = [r.microbatches for r in ranks]

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.cost, dtype=np.float64), np.asarray(self.fills, dtype=np.int64)

    def to_lists(self, cost: np.ndarray, fills: np.ndarray) -> None:
        self.cost, self.fills = cost.tolist(), fills.tolist()

    def place(self, rank: int, index: int, tokens: int, cost: float) -> None:
        mb, capacity = self.fills[rank], self.capacity
        best, best_fill = 0, -1  # best fit: the fullest microbatch that still fits
        for j, fill in enumerate(mb):
            if fill + tokens <= capacity and fill > best_fill:
                best, best_fill = j, fill
        self.members[rank][best].append(index)
        mb[best] += tokens
        self.cost[rank] += cost


def _lpt_exact(order: Sequence[int], state: _LptState, columns: tuple[list, list, list]) -> list[int]:
    """Each item of `order` (heaviest first) to the least loaded rank with a microbatch that fits it.

    A heap of (cost, rank) answers "least loaded". A rank popped because it cannot fit the item is
    parked in a second heap keyed by its free room instead of going back: it cannot fit anything
    larger, so it is not popped again until an item small enough comes, when every parked rank with
    room for it returns first. Then the first rank popped that fits is the least loaded of those that
    fit (ties: lowest rank), the plain rule exactly, and full ranks cost nothing per item.
    """
    capacity, cost = state.capacity, state.cost
    free = [capacity - min(f) for f in state.fills]  # the largest room of any microbatch of the rank
    heap = [(c, r) for r, c in enumerate(cost)]
    heapq.heapify(heap)
    parked: list[tuple[int, float, int]] = []  # (-free room, cost, rank)
    deferred = []
    single = all(len(f) == 1 for f in state.fills)
    all_costs, all_tokens, all_index = columns  # Python lists: no object per item
    for n in order:
        tokens, item_cost, item_index, target = all_tokens[n], all_costs[n], all_index[n], -1
        while parked and -parked[0][0] >= tokens:
            _, c, r = heapq.heappop(parked)
            heapq.heappush(heap, (c, r))
        while heap:
            c, r = heapq.heappop(heap)
            if free[r] >= tokens:
                target = r
                break
            heapq.heappush(parked, (-free[r], c, r))
        if target < 0:
            deferred.append(item_index)
            continue
        if single:  # one microbatch per rank (the step planner's rows): no best fit to choose
            state.members[target][0].append(item_index)
            state.fills[target][0] += tokens
            cost[target] += item_cost
            free[target] -= tokens
        else:
            state.place(target, item_index, tokens, item_cost)
            free[target] = capacity - min(state.fills[target])
        heapq.heappush(heap, (cost[target], target))
    return deferred


def _lpt_rounds(
    order: np.ndarray, state: _LptState, tokens: np.ndarray, costs: np.ndarray, index: np.ndarray
) -> list[int]:
    """The light tail of a large batch in rounds of k/4 items: the round's heaviest item to the least
    loaded rank, the next to the next (ranks sorted by load once per round; only the lightest quarter
    takes items), best fit inside the rank. Items of one round are about equally heavy, so this is what
    item-by-item LPT would do up to the order within a round, at numpy speed. Items that do not fit
    their rank are returned."""
    cost, fills = state.to_arrays()
    capacity, size = state.capacity, max(1, len(cost) // _ROUND_SHARE)
    left: list[int] = []
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        ranks = np.argsort(cost, kind="stable")[: len(chunk)]
        t = tokens[chunk]
        room = fills[ranks] + t[:, None] <= capacity
        fits = room.any(axis=1)
        mb = np.where(room, fills[ranks], -1).argmax(axis=1)
        r, m, placed = ranks[fits], mb[fits], chunk[fits]
        np.add.at(fills, (r, m), t[fits])
        np.add.at(cost, r, costs[placed])
        for rank, j, n in zip(r.tolist(), m.tolist(), index[placed].tolist()):
            state.members[rank][j].append(n)
        left += chunk[~fits].tolist()
    state.to_lists(cost, fills)
    return left


def _plan_lpt(items: Sequence[PlanItem], ranks: list[RankPlan], capacity: int) -> list[int]:
    """LPT with best fit under the token capacity, O(n log k): the heavy head item by item (where the
    choices decide the balance), the light tail of a large batch in vectorised rounds, then whatever
    the rounds could not fit item by item again."""
    state = _LptState(ranks, capacity)
    costs, tokens, index = _columns(items)
    order = np.lexsort((index, -costs))  # heaviest first, ties by index
    # Few ranks: rounds would be tiny, item by item is as fast and exact.
    head = len(order) if len(ranks) < _ROUNDS_MIN_RANKS else max(_EXACT_ROUNDS * len(ranks), _EXACT_MIN)
    columns = (costs.tolist(), tokens.tolist(), index.tolist())
    deferred = _lpt_exact(order[:head].tolist(), state, columns)
    if len(order) > head:
        left = _lpt_rounds(order[head:], state, tokens, costs, index)
        deferred += _lpt_exact(left, state, columns)
    for r, rank in enumerate(ranks):
        rank.cost, rank.microbatch_tokens = state.cost[r], state.fills[r]
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
    costs, tokens, index = _columns(items)
    too_long = index[tokens > max_seq_len].tolist()
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
    share = float(costs.sum()) / num_ranks
    oversized = index[costs > share].tolist()
    return BatchPlan(ranks=ranks, deferred=deferred, oversized=oversized)
