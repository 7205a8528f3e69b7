"""Stage 0's image-caption pairs through the planned loader: each step's pairs balanced over the ranks."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from keye_train.data.loader.decode import ShardFiles
from keye_train.data.loader.encode import decode_image
from keye_train.data.loader.planned import StepData
from keye_train.data.loader.skips import WorldSkips
from keye_train.data.media.image import ImageConfig, preprocess_image
from keye_train.data.media.video import VideoConfig
from keye_train.data.plan.cost import CostModel
from keye_train.data.plan.order import GlobalOrder, SampleRef, build_tables
from keye_train.data.plan.steps import StepPlanner
from keye_train.data.shards.index import image_patches, read_record
from keye_train.data.shards.manifest import DataConfig
from keye_train.data.text.tokenizer import LoadedTokenizer


@dataclass
class PairBatch:
    pixel_values: Tensor  # (N patches, 3, 14, 14), images in order
    grid_thw: Tensor  # (n_pairs, 3)
    text_ids: Tensor  # (n_pairs, text_len), padded as SigLIP's text tower was trained
    keys: list[str]


def pair_patches(entry: Any, *, image_cfg: ImageConfig, video_cfg: Any) -> tuple[int, list[int]]:
    """(ViT patches, [patches]) of a caption pair from its index entry: the planner's size and cost."""
    if entry.error is not None:
        raise ValueError(f"sample {entry.key!r} is unusable: {entry.error}")
    if len(entry.images) < 1:
        raise ValueError("a caption pair needs an image")
    patches = image_patches(*entry.images[0], image_cfg)
    return patches, [patches]


class PairLoader:
    """The manifest's caption sources as (image, caption) pairs, planned like every other step.

    The order is the planned loader's (GlobalOrder: a seeded permutation of each source's samples per
    epoch, mixed to the shares); every step takes about world x max_patches ViT patches and plan_batch
    balances them over the ranks by cost, each rank's share within max_patches. Stage 0 is data parallel
    over every rank, so every rank plans (the same plan: a pure function of the state) and reads only
    its own pairs. The state is the planner's plus the world's skip counts.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        *,
        tokenizer: LoadedTokenizer,
        image_cfg: ImageConfig,
        max_patches: int,
        text_len: int,
        world_size: int = 1,
        rank: int = 0,
        cost_model: CostModel | None = None,
        plan_method: str = "lpt",
        fill: float = 0.95,
        shares: dict[str, float] | None = None,
    ) -> None:
        captions = [s for s in data_cfg.sources if s.kind == "caption"]
        if not captions:
            raise ValueError(
                "stage 0 needs image-caption pairs: the manifest lists no source of kind 'caption'"
            )
        data_cfg = replace(data_cfg, sources=captions)
        names = {s.name for s in captions}
        shares = {k: v for k, v in (shares or {}).items() if k in names} or None
        self.tokenizer, self.image_cfg, self.text_len = tokenizer, image_cfg, text_len
        self.world_size, self.rank = world_size, rank
        self.skips = WorldSkips(
            names, max_skip_rate=data_cfg.max_skip_rate, min_samples=data_cfg.min_samples_for_skip_rate
        )
        model = cost_model or CostModel()
        # A pair's cost is its image's ViT cost only (the text tower is small and the same per pair).
        vit_only = replace(model, llm_linear=0.0, llm_quadratic=0.0)
        tables = build_tables(
            data_cfg,
            image_cfg=image_cfg,
            video_cfg=VideoConfig(),
            cost_model=vit_only,
            predict_tokens=pair_patches,
        )
        self.planner = StepPlanner(
            GlobalOrder(data_cfg, tables=tables, shares=shares),
            dp=world_size,
            microbatches=1,
            max_seq_len=max_patches,
            fill=fill,
            method=plan_method,
        )
        self.files = ShardFiles()
        self._state = self.planner.state_dict()

    @property
    def counter(self):
        return self.skips.total

    def _pair(self, ref: SampleRef) -> tuple[str, Tensor, tuple[int, int], Tensor] | None:
        shard, entry, source = self.planner.order.entry(ref)
        try:
            rec = read_record(shard, entry, source=source, fileobj=self.files.get(shard))
            if not rec.media or not isinstance(rec.text, str) or not rec.text:
                raise ValueError("a caption pair needs one image and a caption")
            image = decode_image(rec.media[0][2], member=rec.media[0][0])
            pixels, grid_hw = preprocess_image(image, self.image_cfg)
        except Exception as exc:  # a bad pair is a counted skip, never a crash
            self.skips.local.skip(ref.source, ref.key, f"{type(exc).__name__}: {exc}", enforce=False)
            return None
        self.skips.local.ok(ref.source)
        ids = self.tokenizer.encode(rec.text)[: self.text_len]
        text = torch.tensor(ids + [self.tokenizer.ids.endoftext] * (self.text_len - len(ids)))
        return ref.key, pixels, grid_hw, text

    def next_step(self) -> StepData:
        """This rank's pairs of the next global step (microbatches holds one PairBatch). Collective."""
        planned = self.planner.next_step()
        if self.rank == 0:  # every rank plans the same skips; one counts them for the world
            for ref, reason in planned.skipped:
                self.skips.local.skip(ref.source, ref.key, reason, enforce=False)
        pairs = [p for p in map(self._pair, planned.rank_items(self.rank)[0]) if p is not None]
        self.skips.merge(self.skips.delta(), distributed=self.world_size > 1)
        self._state = planned.state_after
        return StepData(
            step=planned.step,
            global_keys=planned.global_keys,
            microbatches=[collate(pairs, text_len=self.text_len)],
            report=planned.report(),
            planned=planned,
        )

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy({**self._state, "skips": self.skips.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = copy.deepcopy(dict(state))
        self.skips.load_state_dict(state.pop("skips", {}))
        self._state = state
        self.planner.load_state_dict(state)

    def close(self) -> None:
        self.files.close()


def collate(pairs: list[tuple[str, Tensor, tuple[int, int], Tensor]], *, text_len: int) -> PairBatch:
    if not pairs:  # every pair of this rank was skipped: an empty share of the global batch
        return PairBatch(
            pixel_values=torch.empty(0, 3, 14, 14),
            grid_thw=torch.empty(0, 3, dtype=torch.long),
            text_ids=torch.empty(0, text_len, dtype=torch.long),
            keys=[],
        )
    return PairBatch(
        pixel_values=torch.cat([p[1] for p in pairs]),
        grid_thw=torch.tensor([[1, *p[2]] for p in pairs]),
        text_ids=torch.stack([p[3] for p in pairs]),
        keys=[p[0] for p in pairs],
    )
