"""Per-source tables of the shard indexes for planning: predicted tokens, cost and usability per sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from keye_train.data.plan.cost import CostModel
from keye_train.data.shards.manifest import DataConfig, SourceConfig


@dataclass
class _SourceTable:
    """A source's index entries flattened shard-major, with predicted tokens and costs per entry."""

    config: SourceConfig
    shard_start: np.ndarray  # (shards + 1,) flat position of each shard's first entry
    entries: list[Any]  # IndexEntry per flat position
    tokens: np.ndarray  # (n,) int64
    costs: np.ndarray  # (n,) float64
    errors: np.ndarray | None = None  # (n,) bool: the index or the prediction refuses the sample
    why: Callable[[Any], str | None] | None = None  # the reason of an unusable entry

    def __post_init__(self) -> None:
        if self.errors is None:
            self.errors = np.fromiter(
                (getattr(e, "error", None) is not None for e in self.entries),
                dtype=bool,
                count=len(self.entries),
            )

    def __len__(self) -> int:
        return len(self.entries)

    def flat(self, shard: int, entry: int) -> int:
        if not 0 <= shard < len(self.shard_start) - 1:
            raise ValueError(f"source {self.config.name!r}: shard {shard} out of range")
        flat = int(self.shard_start[shard]) + entry
        if not entry >= 0 or flat >= self.shard_start[shard + 1]:
            raise ValueError(f"source {self.config.name!r}: entry {entry} out of range in shard {shard}")
        return flat

    def key(self, flat: int) -> str:
        key = getattr(self.entries, "key", None)
        return key(flat) if key is not None else str(self.entries[flat].key)

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
    """Every shard's index (never the shard) with each sample's predicted tokens and cost, as columns
    memory-mapped from the index's sidecar (data/shards/columns.py); with `load_index` given, from the
    entries it returns (tests)."""
    default_load, default_predict = _default_index()
    predict_tokens = predict_tokens or default_predict

    def predict(e: Any) -> tuple[int, float, bool]:
        if getattr(e, "error", None):  # nothing to predict; the planner skips it with the reason
            return 0, 0.0, True
        try:
            llm_tokens, frame_patches = predict_tokens(e, image_cfg=image_cfg, video_cfg=video_cfg)
        except ValueError:  # e.g. an aspect ratio over 200: the encoder would refuse it too
            return 0, 0.0, True
        return (
            int(llm_tokens),
            cost_model.sample_cost(tokens=int(llm_tokens), frame_patches=frame_patches),
            False,
        )

    def why(e: Any) -> str | None:
        """The reason a sample is unusable: the index's, or the prediction's error."""
        if getattr(e, "error", None):
            return str(e.error)
        try:
            predict_tokens(e, image_cfg=image_cfg, video_cfg=video_cfg)
        except ValueError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    if load_index is None:
        return _column_tables(
            data_cfg, predict=predict, why=why, parts=[image_cfg, video_cfg, cost_model, predict_tokens]
        )
    tables = {}
    for source in data_cfg.sources:
        starts, entries, rows = [0], [], []
        for shard in source.shards:
            shard_entries = load_index(shard)
            rows += [predict(e) for e in shard_entries]
            entries += shard_entries
            starts.append(len(entries))
        if not entries:
            raise ValueError(f"source {source.name!r}: its shards' indexes list no sample ({source.shards})")
        tokens, costs, errors = (np.asarray(c) for c in zip(*rows))
        tables[source.name] = _SourceTable(
            config=source,
            shard_start=np.asarray(starts, dtype=np.int64),
            entries=entries,
            tokens=tokens.astype(np.int64),
            costs=costs.astype(np.float64),
            errors=errors.astype(bool),
            why=why,
        )
    return tables


def _column_tables(
    data_cfg: DataConfig, *, predict: Callable, why: Callable, parts: list
) -> dict[str, _SourceTable]:
    import json

    from keye_train.data.shards.columns import LazyEntries, load_columns
    from keye_train.data.shards.index import index_path, stale_reason

    tables = {}
    for source in data_cfg.sources:
        columns = []
        for shard in source.shards:
            path = index_path(shard)
            if path.is_file():
                with open(path) as f:
                    line = f.readline()
                try:
                    reason = stale_reason(shard, json.loads(line) if line else {})
                except json.JSONDecodeError:
                    reason = "its header is not JSON"
            else:
                reason = "it does not exist"
            if reason is not None:
                raise ValueError(
                    f"index of {shard!r} is not usable: {reason}; run `keye-data index {shard}` (or let "
                    "keye-train build it: data.build_index=true)"
                )
            columns.append(load_columns(shard, parts=parts, predict=predict))
        starts = np.concatenate([[0], np.cumsum([len(c) for c in columns])]).astype(np.int64)
        if starts[-1] == 0:
            raise ValueError(f"source {source.name!r}: its shards' indexes list no sample ({source.shards})")
        tables[source.name] = _SourceTable(
            config=source,
            shard_start=starts,
            entries=LazyEntries(list(source.shards), columns, starts),
            # in memory: 4 + 4 bytes per sample (int32 tokens, float32 cost); the rest stays mapped
            tokens=np.concatenate([c["tokens"] for c in columns]),
            costs=np.concatenate([c["cost"] for c in columns]),
            errors=np.concatenate([c["error"] for c in columns]),
            why=why,
        )
    return tables
