"""Balanced planning: near the lower bound on heavy-tailed mixes, capacity respected, nothing lost."""

import pytest

from keye_train.data.plan.balance import PlanItem, lower_bound, plan_batch
from keye_train.distributed.vision_plan import greedy_longest_first
from keye_train.testing.workload import heavy_tailed_batch

SEQ = 131072


def check_complete(items, plan, microbatches):
    placed = [i for r in plan.ranks for i in r.items]
    assert sorted(placed + plan.deferred) == [it.index for it in items]  # each exactly once
    for rank in plan.ranks:
        assert len(rank.microbatches) == microbatches
        for mb, tokens in zip(rank.microbatches, rank.microbatch_tokens):
            assert tokens == sum(items[i].tokens for i in mb) <= SEQ
        assert rank.cost == pytest.approx(sum(items[i].cost for i in rank.items))


@pytest.mark.parametrize("num_ranks", [8, 64, 512])
def test_lpt_within_two_percent_of_the_lower_bound(num_ranks):
    items = heavy_tailed_batch(num_ranks=num_ranks, microbatches=2, max_seq_len=SEQ, seed=num_ranks)
    lpt = plan_batch(items, num_ranks=num_ranks, microbatches=2, max_seq_len=SEQ)
    baseline = plan_batch(items, num_ranks=num_ranks, microbatches=2, max_seq_len=SEQ, method="random")
    check_complete(items, lpt, 2)
    check_complete(items, baseline, 2)
    report = lpt.report(items)
    assert report["max_over_mean"] <= 1.02 * report["lower_bound"]
    # The equal-count baseline is what the planner exists to beat; on a heavy tail it is far worse.
    assert baseline.max_over_mean > 1.2 * lpt.max_over_mean


def test_karmarkar_karp_option_is_complete_and_balanced():
    items = heavy_tailed_batch(num_ranks=8, microbatches=4, max_seq_len=SEQ, seed=3)
    plan = plan_batch(items, num_ranks=8, microbatches=4, max_seq_len=SEQ, method="kk")
    check_complete(items, plan, 4)
    assert plan.max_over_mean <= 1.1


def test_an_item_heavier_than_a_fair_share_is_reported_not_hidden():
    items = [PlanItem(0, 100.0, 10)] + [PlanItem(i, 1.0, 10) for i in range(1, 9)]
    plan = plan_batch(items, num_ranks=4, microbatches=1, max_seq_len=SEQ)
    assert plan.oversized == [0]
    assert lower_bound(items, 4) == pytest.approx(100 / (108 / 4))
    assert plan.max_over_mean == pytest.approx(lower_bound(items, 4))


def test_items_that_fit_nowhere_are_deferred_not_dropped():
    items = [PlanItem(i, 1.0, 600) for i in range(5)]  # 2 ranks x 1 microbatch of 1000 tokens
    plan = plan_batch(items, num_ranks=2, microbatches=1, max_seq_len=1000)
    assert len(plan.deferred) == 3 and sorted(plan.ranks[0].items + plan.ranks[1].items + plan.deferred) == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_plans_are_deterministic():
    items = heavy_tailed_batch(num_ranks=16, microbatches=2, max_seq_len=SEQ, seed=5)
    a = plan_batch(items, num_ranks=16, microbatches=2, max_seq_len=SEQ)
    b = plan_batch(list(items), num_ranks=16, microbatches=2, max_seq_len=SEQ)
    assert [r.microbatches for r in a.ranks] == [r.microbatches for r in b.ranks]


def test_visual_items_spread_over_all_ranks():
    costs = [float(c) for c in [50, 40, 30, 20, 10, 10, 10, 10, 5, 5]]
    owner = greedy_longest_first(costs, 4)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(4)]
    assert sorted(owner) != [0] * 10 and set(owner) == {0, 1, 2, 3}
    assert max(loads) == 50  # the lower bound: the largest item alone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "greedy"}, "unknown"), ({"max_seq_len": 5}, "more tokens than max_seq_len")],
)
def test_bad_arguments(kwargs, message):
    args = {"num_ranks": 2, "microbatches": 1, "max_seq_len": 100} | kwargs
    with pytest.raises(ValueError, match=message):
        plan_batch([PlanItem(0, 1.0, 10)], **args)


def _reference_lpt(items, num_ranks, microbatches, capacity):
    """The plain rule, written out: heaviest first, pop ranks least loaded first (ties: lowest rank)
    until one has a microbatch with room, best fit inside it. O(k) pops per item once ranks are full."""
    import heapq

    cost = [0.0] * num_ranks
    fills = [[0] * microbatches for _ in range(num_ranks)]
    assign, deferred = {}, []
    heap = [(0.0, r) for r in range(num_ranks)]
    for item in sorted(items, key=lambda it: (-it.cost, it.index)):
        popped, target = [], None
        while heap:
            c, r = heapq.heappop(heap)
            room = [j for j in range(microbatches) if fills[r][j] + item.tokens <= capacity]
            if room:
                target = (r, max(room, key=lambda j: (fills[r][j], -j)))
                break
            popped.append((c, r))
        for entry in popped:
            heapq.heappush(heap, entry)
        if target is None:
            deferred.append(item.index)
            continue
        r, j = target
        fills[r][j] += item.tokens
        cost[r] += item.cost
        assign[item.index] = (r, j)
        heapq.heappush(heap, (cost[r], r))
    return assign, sorted(deferred)


@pytest.mark.parametrize(("num_ranks", "microbatches", "fill"), [(16, 1, 0.97), (64, 2, 0.95), (8, 3, 1.1)])
def test_fast_lpt_is_the_plain_rule_also_when_capacity_binds(num_ranks, microbatches, fill):
    items = heavy_tailed_batch(
        num_ranks=num_ranks, microbatches=microbatches, max_seq_len=SEQ, fill=fill, seed=num_ranks
    )
    plan = plan_batch(items, num_ranks=num_ranks, microbatches=microbatches, max_seq_len=SEQ)
    check_complete(items, plan, microbatches)
    assign, deferred = _reference_lpt(items, num_ranks, microbatches, SEQ)
    got = {
        i: (r, j) for r, rank in enumerate(plan.ranks) for j, mb in enumerate(rank.microbatches) for i in mb
    }
    assert sorted(plan.deferred) == deferred
    assert got == assign
