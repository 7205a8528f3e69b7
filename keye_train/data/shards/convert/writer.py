"""The shared part of `keye-data convert`: records -> deterministic, indexed, resumable shards + manifest.

Shard i holds input records [i*K, (i+1)*K) in input order (K = samples_per_shard), minus the bad ones,
under keys `<name><record number>`; tar members carry fixed metadata (mtime 0, uid 0), so the same inputs
give byte-identical shards however many workers run and however often a conversion is interrupted. A
shard is finished when its `.report.json` exists (written last, atomically, with a fingerprint of the
records it covers); a rerun skips finished shards and redoes the rest.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import multiprocessing as mp
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import yaml

from keye_train.data.shards.convert.common import BAD_RECORD, REASONS, BadRecord, Item, Sample
from keye_train.data.shards.manifest import SourceConfig

log = logging.getLogger(__name__)

FORMATS = {
    "llava": "llava",
    "sharegpt-video": "sharegpt_video",
    "caption": "caption",
    "interleaved": "interleaved",
    "text": "text",
    "grounding": "grounding",
}
EXAMPLES_PER_REASON = 5


def format_module(name: str) -> Any:
    if name not in FORMATS:
        raise ValueError(f"--format {name!r} is not one of {sorted(FORMATS)}")
    return importlib.import_module(f"keye_train.data.shards.convert.{FORMATS[name]}")


@dataclass
class ConvertConfig:
    format: str
    inputs: list[Path]
    out: Path
    media_root: Path = Path(".")
    workers: int = 1
    samples_per_shard: int = 1000
    tokenizer: Path | None = None  # written to the manifest and used for exact index token counts
    name: str | None = None  # source name and shard prefix (default: the format)
    options: dict = field(default_factory=dict)  # per-format field names (see each module's OPTIONS)

    def __post_init__(self) -> None:
        self.inputs = [Path(p) for p in self.inputs]
        self.out, self.media_root = Path(self.out), Path(self.media_root)
        module = format_module(self.format)
        if not self.inputs:
            raise ValueError("convert needs at least one INPUT file or folder")
        missing = [str(p) for p in self.inputs if not p.exists()]
        if missing:
            raise ValueError(f"convert inputs do not exist: {missing}")
        if self.workers < 1:
            raise ValueError(f"--workers={self.workers} must be >= 1")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard={self.samples_per_shard} must be >= 1")
        unknown = sorted(set(self.options) - set(module.OPTIONS))
        if unknown:
            raise ValueError(f"format {self.format!r} has no options {unknown}; it has {module.OPTIONS}")
        self.name = self.name or self.format.replace("-", "_")
        if not self.name.isidentifier():
            raise ValueError(f"--name {self.name!r} must be letters, digits and underscores")


@dataclass(frozen=True)
class ShardJob:
    format: str
    kind: str
    name: str
    shard: int
    first: int  # record number of items[0]
    items: list[Item]
    media_root: Path
    out: Path
    tokenizer: Path | None
    options: dict

    @property
    def tar(self) -> Path:
        return self.out / f"{self.name}-{self.shard:06d}.tar"

    @property
    def report(self) -> Path:
        return self.out / f"{self.name}-{self.shard:06d}.report.json"

    def fingerprint(self) -> str:
        text = json.dumps([self.format, self.first, [i.where for i in self.items], self.options])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    """`path` appears complete or not at all: a failed or interrupted write removes its temp file."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno and err.filename is None:  # a failed write() names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _tar_bytes(samples: list[tuple[str, Sample]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            for suffix, data in sample.members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _check(key: str, sample: Sample) -> None:
    """The sample as the loader will read and render it; a failure is a BAD_RECORD with the reason."""
    from keye_train.data.batch import FrameSpec
    from keye_train.data.loader.encode import SampleEncoder
    from keye_train.data.shards.sources import parse_raw
    from keye_train.data.text import chat

    source = SourceConfig(name="convert", kind=sample.kind, shards=["-"], weight=1)
    try:
        rec = parse_raw({"__key__": key, **sample.members}, source=source)
        images = [chat.ImageInfo(grid_hw=(2, 2), size=(1000, 1000)) for _, t, _ in rec.media if t == "image"]
        frame = FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(2, 2))
        videos = [chat.VideoInfo(frames=(frame,)) for _, t, _ in rec.media if t == "video"]
        SampleEncoder(None, options=chat.ChatOptions()).render(rec, images, videos)  # type: ignore[arg-type]
    except ValueError as exc:
        raise BadRecord(BAD_RECORD, str(exc)) from None


def convert_shard(job: ShardJob) -> dict:
    """Convert, write and index one shard; returns (and writes) its report."""
    from keye_train.data.shards.index import build_index

    module = format_module(job.format)
    samples: list[tuple[str, Sample]] = []
    bad: list[dict] = []
    for n, item in enumerate(job.items):
        key = f"{job.name}{job.first + n:09d}"
        try:
            if item.error is not None:
                raise BadRecord(item.reason, item.error)
            sample = module.convert(item.record, media_root=job.media_root, options=job.options)
            _check(key, sample)
        except BadRecord as exc:
            bad.append({"where": item.where, "reason": exc.reason, "detail": exc.detail})
            continue
        samples.append((key, sample))
    _write_atomic(job.tar, _tar_bytes(samples))
    build_index(job.tar, tokenizer=job.tokenizer, kind=job.kind)
    report = {
        "shard": job.tar.name,
        "fingerprint": job.fingerprint(),
        "records": len(job.items),
        "samples": len(samples),
        "keys": [k for k, _ in samples],
        "sources": [job.items[int(k[len(job.name) :]) - job.first].where for k, _ in samples],
        "bad": bad,
    }
    _write_atomic(job.report, json.dumps(report).encode())
    return report


def _finished(job: ShardJob) -> dict | None:
    try:
        report = json.loads(job.report.read_text())
    except (OSError, ValueError):
        return None
    ok = report.get("fingerprint") == job.fingerprint() and job.tar.is_file()
    return report if ok else None


def _jobs(cfg: ConvertConfig, module: Any) -> Iterator[ShardJob]:
    items = module.read(cfg.inputs, options=cfg.options)
    shard = 0
    while chunk := list(islice(items, cfg.samples_per_shard)):
        yield ShardJob(
            format=cfg.format,
            kind=module.KIND,
            name=cfg.name,
            shard=shard,
            first=shard * cfg.samples_per_shard,
            items=chunk,
            media_root=cfg.media_root,
            out=cfg.out,
            tokenizer=cfg.tokenizer,
            options=cfg.options,
        )
        shard += 1


def _run(cfg: ConvertConfig, jobs: Iterator[ShardJob], progress: bool) -> tuple[list[dict], int]:
    from tqdm import tqdm

    reports: dict[int, dict] = {}
    resumed = 0
    bar = tqdm(desc=f"convert {cfg.format}", unit="shard", file=sys.stderr, disable=not progress)
    pool = None
    if cfg.workers > 1:
        # forkserver: workers start from a clean process (no inherited threads) that imported the
        # converter once, instead of every spawned worker importing torch on its own.
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(
            ["keye_train.data.shards.index", f"{__package__}.{FORMATS[cfg.format]}"]
        )
        pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context)
    pending: dict[int, Future] = {}
    try:
        for job in jobs:
            if (done := _finished(job)) is not None:
                reports[job.shard] = done
                resumed += 1
                bar.update()
                continue
            if pool is None:
                reports[job.shard] = convert_shard(job)
                bar.update()
                continue
            pending[job.shard] = pool.submit(convert_shard, job)
            while len(pending) >= 2 * cfg.workers:  # bound the records held in memory
                first = min(pending)
                reports[first] = pending.pop(first).result()
                bar.update()
        for shard in sorted(pending):
            reports[shard] = pending.pop(shard).result()
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return [reports[s] for s in sorted(reports)], resumed


def convert(cfg: ConvertConfig, *, progress: bool = True) -> dict:
    """Run a conversion (see the module docstring); returns the summary also written to report.json."""
    module = format_module(cfg.format)
    cfg.out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(cfg.out.glob("*.tmp.*")):  # half-written files of an interrupted conversion
        log.warning("removing %s, left by an interrupted conversion", stale)
        stale.unlink()
    reports, resumed = _run(cfg, _jobs(cfg, module), progress)
    bad = [b for r in reports for b in r["bad"]]
    by_reason = Counter(b["reason"] for b in bad)
    examples: dict[str, list] = {}
    for b in bad:
        if len(examples.setdefault(b["reason"], [])) < EXAMPLES_PER_REASON:
            examples[b["reason"]].append(f"{b['where']}: {b['detail']}")
    shards = [r["shard"] for r in reports]
    manifest: dict[str, Any] = {}
    if cfg.tokenizer is not None:
        manifest["tokenizer"] = os.path.relpath(Path(cfg.tokenizer).resolve(), cfg.out.resolve())
    manifest["sources"] = [{"name": cfg.name, "kind": module.KIND, "shards": shards, "weight": 1.0}]
    _write_atomic(cfg.out / "manifest.yaml", yaml.safe_dump(manifest, sort_keys=False).encode())
    with open(cfg.out / "bad_records.jsonl", "w") as f:
        for b in bad:
            f.write(json.dumps(b) + "\n")
    summary = {
        "format": cfg.format,
        "kind": module.KIND,
        "records": sum(r["records"] for r in reports),
        "samples": sum(r["samples"] for r in reports),
        "bad": {reason: by_reason.get(reason, 0) for reason in REASONS},
        "examples": examples,
        "shards": len(shards),
        "resumed_shards": resumed,
        "manifest": str(cfg.out / "manifest.yaml"),
    }
    _write_atomic(cfg.out / "report.json", json.dumps(summary, indent=1).encode())
    return summary
