"""Make every shard of a manifest plannable before training: build missing or stale indexes (rank 0)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from keye_train.data.shards.index import build_index, index_path, stale_reason
from keye_train.data.shards.manifest import DataConfig
from keye_train.data.text.tokenizer import LoadedTokenizer

log = logging.getLogger(__name__)


def _header(shard: str) -> dict:
    path = index_path(shard)
    if not path.is_file():
        return {}
    with open(path) as f:
        line = f.readline()
    try:
        return json.loads(line) if line else {}
    except json.JSONDecodeError:
        return {}


def stale_shards(data_cfgs: Sequence[DataConfig], *, tokenizer: LoadedTokenizer | None) -> list[tuple]:
    """(shard, kind, why) of every shard whose index is missing, from another format, built for another
    tokenizer, or older than the shard. Reads index headers only."""
    out, seen = [], set()
    for data_cfg in data_cfgs:
        for source in data_cfg.sources:
            for shard in source.shards:
                if shard in seen:
                    continue
                seen.add(shard)
                if not index_path(shard).is_file():
                    out.append((shard, source.kind, "no index"))
                    continue
                why = stale_reason(shard, _header(shard), tokenizer=tokenizer)
                if why is not None:
                    out.append((shard, source.kind, why))
    return out


def ensure_indexes(
    data_cfgs: Sequence[DataConfig],
    *,
    tokenizer: LoadedTokenizer | None,
    builds: bool,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> int:
    """Build the missing or stale indexes of the manifests' shards on the rank that `builds` (rank 0),
    with a progress bar; every rank then waits at `barrier`, so no rank plans from a half-written index
    (index files are replaced atomically). Returns how many indexes this rank built."""
    built = 0
    if builds:
        todo = stale_shards(data_cfgs, tokenizer=tokenizer)
        if todo:
            from tqdm import tqdm

            log.info("building %d shard indexes (missing or stale), e.g. %s: %s", len(todo), *todo[0][::2])
            for shard, kind, _ in tqdm(todo, desc="indexing shards", unit="shard", disable=not progress):
                build_index(shard, tokenizer=tokenizer, kind=kind)
                built += 1
    if barrier is not None:
        barrier()
    return built
