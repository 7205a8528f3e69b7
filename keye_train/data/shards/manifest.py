"""Dataset manifest: typed, validated source configs read from YAML, with shard URL expansion."""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import yaml

# megatron: Megatron-LM .bin/.idx token datasets (data/shards/megatron.py); the others: tar shards
SOURCE_KINDS = ("caption", "conversation", "interleaved", "video", "text", "megatron")


@dataclass
class SourceConfig:
    """One webdataset source. Exactly one of weight (share of samples) or token_share (share of tokens)."""

    name: str
    kind: str
    shards: list[str]
    weight: float | None = None
    token_share: float | None = None

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"{where}: kind={self.kind!r} is not one of {SOURCE_KINDS}")
        if not self.shards:
            raise ValueError(f"{where}: shards is empty; list shard URLs, globs or brace patterns")
        if (self.weight is None) == (self.token_share is None):
            raise ValueError(f"{where}: give exactly one of weight (sample share) or token_share")
        share = self.weight if self.weight is not None else self.token_share
        if not share > 0:
            raise ValueError(
                f"{where}: {'weight' if self.weight is not None else 'token_share'}={share} must be positive"
            )

    @property
    def share(self) -> float:
        return float(self.weight if self.weight is not None else self.token_share)


@dataclass
class DataConfig:
    """All sources of a run. Shares are normalised over the sources; all must use the same share type."""

    sources: list[SourceConfig]
    tokenizer: str | None = None
    seed: int = 0
    max_skip_rate: float = 0.05  # per source; exceeding it after min_samples_for_skip_rate stops the run
    min_samples_for_skip_rate: int = 200
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("data.sources is empty; the manifest must list at least one source")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"data.sources: duplicate source names {dupes}")
        by_tokens = {s.token_share is not None for s in self.sources}
        if len(by_tokens) > 1:
            raise ValueError("data.sources mix weight and token_share; use one share type for all sources")
        if not 0.0 <= self.max_skip_rate <= 1.0:
            raise ValueError(f"manifest max_skip_rate={self.max_skip_rate} must be in [0, 1]")

    @property
    def by_tokens(self) -> bool:
        return self.sources[0].token_share is not None

    def target_shares(self) -> dict[str, float]:
        total = sum(s.share for s in self.sources)
        return {s.name: s.share / total for s in self.sources}


def expand_shards(patterns: str | list[str], *, base_dir: Path | None = None) -> list[str]:
    """Brace-expand every pattern; local paths are also globbed (relative to base_dir) and must exist.

    URLs with a scheme (`pipe:`, `http://`, `s3://` ...) are passed to webdataset unchanged after brace
    expansion, since only the reader can tell whether they exist.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(str(pattern)):
            if url.startswith("pipe:") or "://" in url:
                urls.append(url)
                continue
            path = Path(url)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
            existing = [m for m in matches if Path(m).is_file()]
            if not existing:
                raise ValueError(f"shard pattern {pattern!r} matched no file (looked for {str(path)!r})")
            urls += existing
    return urls


def _source_from_mapping(entry: Mapping, index: int, base_dir: Path | None) -> SourceConfig:
    where = f"sources[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping with name/kind/shards, got {entry!r}")
    known = {"name", "kind", "shards", "weight", "token_share"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    for key in ("kind", "shards"):
        if key not in entry:
            raise ValueError(f"{where}.{key} is missing")
    name = str(entry.get("name", f"{entry['kind']}_{index}"))
    try:
        shards = expand_shards(entry["shards"], base_dir=base_dir)
    except ValueError as exc:
        raise ValueError(f"{where}.shards ({name}): {exc}") from None
    for key in ("weight", "token_share"):
        if entry.get(key) is not None and not isinstance(entry[key], int | float):
            raise ValueError(f"{where}.{key}={entry[key]!r} must be a number")
    try:
        return SourceConfig(
            name=name,
            kind=str(entry["kind"]),
            shards=shards,
            weight=entry.get("weight"),
            token_share=entry.get("token_share"),
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_manifest(data: Mapping, *, base_dir: Path | None = None) -> DataConfig:
    """Build a DataConfig from a parsed manifest mapping; relative paths resolve against base_dir."""
    if not isinstance(data, Mapping) or "sources" not in data:
        raise ValueError("a data manifest must be a mapping with a `sources` list")
    if not isinstance(data["sources"], list):
        raise ValueError(f"sources must be a list, got {type(data['sources']).__name__}")
    sources = [_source_from_mapping(e, i, base_dir) for i, e in enumerate(data["sources"])]
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and base_dir is not None and not Path(tokenizer).is_absolute():
        tokenizer = str(base_dir / tokenizer)
    known = {"sources", "tokenizer", "seed", "max_skip_rate", "min_samples_for_skip_rate"}
    extra = {k: v for k, v in data.items() if k not in known}
    return DataConfig(
        sources=sources,
        tokenizer=tokenizer,
        seed=int(data.get("seed", 0)),
        max_skip_rate=float(data.get("max_skip_rate", 0.05)),
        min_samples_for_skip_rate=int(data.get("min_samples_for_skip_rate", 200)),
        extra=extra,
    )


def load_manifest(path: str | Path) -> DataConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.yaml"
    if not path.is_file():
        raise ValueError(f"manifest {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"manifest {str(path)!r} is not valid YAML: {exc}") from None
    return parse_manifest(data, base_dir=path.parent)
