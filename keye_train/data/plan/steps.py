"""Step planning over the global order: take a step's samples, balance them over DP ranks, carry the rest."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keye_train.data.plan.balance import METHODS, BatchPlan, PlanItem, PlanItems, RankPlan, plan_batch
from keye_train.data.plan.order import Drawn, GlobalOrder, SampleRef


class StepItems(Sequence):
    """A step's planner input: the carried SampleRefs, then the newly drawn samples as columns; a
    SampleRef of a drawn sample is made only when asked for (this replica's, the state's, the keys')."""

    def __init__(self, order: GlobalOrder, carried: list[SampleRef], drawn: Drawn) -> None:
        self.order, self.carried, self.drawn = order, carried, drawn
        self._refs: dict[int, SampleRef] = {}

    def __len__(self) -> int:
        return len(self.carried) + len(self.drawn)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < len(self.carried):
            return self.carried[i]
        ref = self._refs.get(i)
        if ref is None:
            j = i - len(self.carried)
            d = self.drawn
            name = self.order.names[int(d.source[j])]
            ref = self._refs[i] = self.order.ref_at(name, int(d.flat[j]), epoch=int(d.epoch[j]))
        return ref

    def columns(self) -> PlanItems:
        d, order = self.drawn, self.order
        costs = [r.cost for r in self.carried] + order.column(d.source, d.flat, "costs").tolist()
        tokens = np.concatenate(
            [
                np.asarray([r.tokens for r in self.carried], dtype=np.int64),
                order.column(d.source, d.flat, "tokens"),
            ]
        )
        return PlanItems(np.asarray(costs, dtype=np.float64), tokens)

    def keys(self, positions: Sequence[int]) -> list[str]:
        out, n, d, order = [], len(self.carried), self.drawn, self.order
        tables = [order.tables[name] for name in order.names]
        for i in positions:
            if i < n:
                out.append(self.carried[i].key)
            else:
                out.append(tables[int(d.source[i - n])].key(int(d.flat[i - n])))
        return out


log = logging.getLogger(__name__)


@dataclass
class PlannedStep:
    """One optimizer step's global batch: the samples, their assignment, and the data state after it."""

    step: int
    items: Sequence[SampleRef]  # planner input: carried items first, then new ones, in global order
    plan: BatchPlan
    skipped: list[tuple[SampleRef, str]] = field(default_factory=list)  # taken but unplannable, with why
    state_after: dict[str, Any] = field(default_factory=dict)

    @property
    def placed(self) -> list[int]:
        """Item indices consumed this step, in global order (deferred ones wait for the next step)."""
        deferred = set(self.plan.deferred)
        return [i for i in range(len(self.items)) if i not in deferred]

    @property
    def global_refs(self) -> list[SampleRef]:
        return [self.items[i] for i in self.placed]

    @property
    def global_keys(self) -> list[str]:
        if isinstance(self.items, StepItems):
            return self.items.keys(self.placed)
        return [r.key for r in self.global_refs]

    def rank_items(self, dp_rank: int) -> list[list[SampleRef]]:
        """This DP replica's microbatches as planned, each a list of refs in planned order."""
        return [[self.items[i] for i in mb] for mb in self.plan.ranks[dp_rank].microbatches]

    def report(self) -> dict[str, Any]:
        items = (
            self.items.columns()
            if isinstance(self.items, StepItems)
            else [PlanItem(index=i, cost=r.cost, tokens=r.tokens) for i, r in enumerate(self.items)]
        )
        report = dict(self.plan.report(items))  # lower_bound over the placed items
        costs = self.plan.costs
        mean = sum(costs) / len(costs)
        report.update(
            step=self.step,
            planned_max=max(costs),
            planned_mean=mean,
            planned_costs=list(costs),
            planned_tokens=[sum(r.microbatch_tokens) for r in self.plan.ranks],
            samples=len(self.placed),
            skipped=len(self.skipped),
            skipped_keys=[ref.key for ref, _ in self.skipped],
        )
        return report


class StepPlanner:
    """Takes the next samples of the order up to a step's token capacity and plans them with plan_batch.

    Capacity is dp x microbatches x max_seq_len x fill (fill < 1 leaves the bin packer slack so few
    samples are deferred). Deferred samples lead the next step; they are part of the state, together
    with the order's position, so a resume (under any DP size) consumes exactly the samples an
    uninterrupted run would, in the same global order.
    """

    def __init__(
        self,
        order: GlobalOrder,
        *,
        dp: int,
        microbatches: int,
        max_seq_len: int,
        fill: float = 0.95,
        method: str = "lpt",
    ) -> None:
        if dp < 1:
            raise ValueError(f"dp={dp} must be >= 1")
        if microbatches < 1:
            raise ValueError(f"data.microbatches={microbatches} must be >= 1")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2")
        if not 0.0 < fill <= 1.0:
            raise ValueError(f"loader.fill={fill} must be in (0, 1]")
        if method not in METHODS:
            raise ValueError(f"loader.plan_method={method!r} must be one of {METHODS}")
        self.order = order
        self.dp, self.microbatches, self.max_seq_len = dp, microbatches, max_seq_len
        self.fill, self.method = fill, method
        self.step = 0
        self.deferred: list[SampleRef] = []

    @property
    def capacity(self) -> int:
        return self.dp * self.microbatches * self.max_seq_len

    def _unplannable(self, ref: SampleRef) -> str | None:
        if ref.error:
            return f"index: {ref.error}"
        if ref.tokens > self.max_seq_len:
            return f"overlong (predicted): {ref.tokens} tokens > max_seq_len {self.max_seq_len}"
        return None

    def _usable(self, src, flat):
        """The mask of drawn samples the planner can place (the vectorised _unplannable)."""
        order = self.order
        return ~order.column(src, flat, "errors") & (order.column(src, flat, "tokens") <= self.max_seq_len)

    def next_step(self) -> PlannedStep:
        carried = list(self.deferred)
        total, target = sum(r.tokens for r in carried), self.fill * self.capacity
        drawn = self.order.take(target - total, usable=self._usable)
        usable = self._usable(drawn.source, drawn.flat)
        bad = np.flatnonzero(~usable)
        skipped: list[tuple[SampleRef, str]] = []
        for j in bad.tolist():  # rare: only these become SampleRefs here, to say why
            ref = self.order.ref_at(
                self.order.names[int(drawn.source[j])], int(drawn.flat[j]), epoch=int(drawn.epoch[j])
            )
            skipped.append((ref, self._unplannable(ref) or "unusable"))
        if len(bad):
            drawn = Drawn(drawn.source[usable], drawn.flat[usable], drawn.epoch[usable])
        items = StepItems(self.order, carried, drawn)
        # Planned as dp x microbatches rows, each balanced by cost, then dealt to the ranks in runs of
        # `microbatches`: which samples a step takes, defers and packs together depends only on the
        # number of rows, so a resume under another layout with as many rows (DP2 x 1 <-> TP2 x 2 <->
        # PP2 x 2) consumes exactly the samples, and builds exactly the rows, of the uninterrupted run.
        rows = plan_batch(
            items.columns(),
            num_ranks=self.dp * self.microbatches,
            microbatches=1,
            max_seq_len=self.max_seq_len,
            method=self.method,
            seed=self.order.seed + self.step,
        )
        plan = _deal(rows, dp=self.dp, microbatches=self.microbatches)
        if len(plan.deferred) == len(items):
            raise RuntimeError(f"step {self.step}: the planner placed none of {len(items)} samples")
        # Deferred items keep their global order so the consumed sequence stays a function of the order.
        self.deferred = [items[i] for i in sorted(plan.deferred)]
        planned = PlannedStep(step=self.step, items=items, plan=plan, skipped=skipped)
        self.step += 1
        planned.state_after = self.state_dict()
        return planned

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "order": self.order.state_dict(),
            "deferred": [[*ref.as_state(), ref.epoch] for ref in self.deferred],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order.load_state_dict(state.get("order", {}))
        self.step = int(state.get("step", 0))
        deferred = []
        for saved in state.get("deferred", []):
            ref = self.order.ref(list(saved[:4]), epoch=int(saved[4]))
            reason = self._unplannable(ref)
            if reason is not None:  # e.g. a new stage with a shorter max_seq_len
                log.warning(
                    "data: carried sample %s cannot be planned any more: %s; skipped", ref.key, reason
                )
                continue
            deferred.append(ref)
        self.deferred = deferred


def _deal(rows: BatchPlan, *, dp: int, microbatches: int) -> BatchPlan:
    """Rank r of `dp` gets rows r*microbatches .. (r+1)*microbatches - 1 of a one-microbatch plan."""
    ranks = []
    for r in range(dp):
        mine = rows.ranks[r * microbatches : (r + 1) * microbatches]
        ranks.append(
            RankPlan(
                microbatches=[row.microbatches[0] for row in mine],
                microbatch_tokens=[row.microbatch_tokens[0] for row in mine],
                cost=sum(row.cost for row in mine),
            )
        )
    return BatchPlan(ranks=ranks, deferred=rows.deferred, oversized=rows.oversized)
