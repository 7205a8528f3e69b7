"""Raw records to EncodedSamples: decode media, render, tokenise, 3D positions; bad input is skipped."""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from keye_train.data.batch import EncodedSample
from keye_train.data.media.image import open_image
from keye_train.data.shards import megatron
from keye_train.data.shards.manifest import SourceConfig
from keye_train.data.shards.sources import RawRecord, iter_records
from keye_train.data.text import chat
from keye_train.data.text.tokenizer import LoadedTokenizer
from keye_train.models.rope import mrope_position_ids

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts processed and skipped samples per source; too high a skip rate stops the run.

    A skip rate above max_skip_rate once a source has seen min_samples raises RuntimeError: silently
    dropping a large part of a source would change the data mixture without anyone noticing.
    """

    def __init__(self, *, max_skip_rate: float = 0.05, min_samples: int = 200, log_every: int = 1) -> None:
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.log_every = log_every
        self.seen: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.reasons: dict[str, Counter[str]] = {}
        self.examples: dict[str, list[tuple[str, str]]] = {}

    def ok(self, source: str) -> None:
        self.seen[source] += 1

    def skip(self, source: str, key: str, reason: str, *, enforce: bool = True) -> None:
        self.seen[source] += 1
        self.skipped[source] += 1
        category = reason.split(":", 1)[0][:80]
        self.reasons.setdefault(source, Counter())[category] += 1
        examples = self.examples.setdefault(source, [])
        if len(examples) < 20:
            examples.append((key, reason))
        if self.skipped[source] % self.log_every == 0:
            log.warning("source %s: skipped sample %s: %s", source, key, reason)
        if enforce:
            self.check(source)

    def rate(self, source: str) -> float:
        return self.skipped[source] / self.seen[source] if self.seen[source] else 0.0

    def check(self, source: str) -> None:
        if self.seen[source] >= self.min_samples and self.rate(source) > self.max_skip_rate:
            raise RuntimeError(
                f"source {source!r}: {self.skipped[source]} of {self.seen[source]} samples skipped "
                f"({self.rate(source):.1%} > max_skip_rate {self.max_skip_rate:.1%}); reasons "
                f"{dict(self.reasons[source])}, e.g. {self.examples[source][:3]}. Fix the data or raise "
                f"data.max_skip_rate"
            )

    def summary(self) -> dict[str, Any]:
        return {
            s: {
                "seen": self.seen[s],
                "skipped": self.skipped[s],
                "rate": self.rate(s),
                "reasons": dict(self.reasons.get(s, {})),
            }
            for s in sorted(self.seen)
        }


def decode_image(data: bytes, *, member: str) -> Image.Image:
    """Fully decode an image to RGB (truncated files fail here, not later in a worker)."""
    try:
        # verify() catches damage load() tolerates, e.g. a PNG cut after its pixel data (no IEND chunk).
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        rgb = open_image(data).convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError ...
        raise ValueError(f"image {member!r} cannot be decoded: {type(exc).__name__}: {exc}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ValueError(f"image {member!r} has zero size {rgb.size}")
    return rgb


class SampleEncoder:
    """Turns RawRecords into EncodedSamples with the image/video preprocessing configs given."""

    def __init__(
        self,
        tokenizer: LoadedTokenizer,
        *,
        image_cfg: Any = None,
        video_cfg: Any = None,
        options: chat.ChatOptions | None = None,
    ) -> None:
        # Imported here so that this module loads (and its text paths work) wherever image/video do not.
        from keye_train.data.media.image import ImageConfig
        from keye_train.data.media.video import VideoConfig

        self.tok = tokenizer
        self.image_cfg = image_cfg if image_cfg is not None else ImageConfig()
        self.video_cfg = video_cfg if video_cfg is not None else VideoConfig()
        self.options = options if options is not None else chat.ChatOptions()

    def _media(self, rec: RawRecord):
        from keye_train.data.media.image import preprocess_image
        from keye_train.data.media.video import preprocess_video

        images, videos, pixels, grids = [], [], [], []
        for member, kind, data in rec.media:
            if kind == "image":
                img = decode_image(data, member=member)
                pixel_values, grid_hw = preprocess_image(img, self.image_cfg)
                images.append(chat.ImageInfo(grid_hw=tuple(grid_hw), size=img.size))
                pixels.append(pixel_values)
                grids.append((1, *grid_hw))
            else:
                result = preprocess_video(data, self.video_cfg)
                if not result.frames:
                    raise ValueError(f"video {member!r} produced no frames")
                videos.append(chat.VideoInfo(frames=tuple(result.frames)))
                pixels.append(result.pixel_values)
                grids += [tuple(int(v) for v in row) for row in result.grid_thw.tolist()]
        return images, videos, pixels, grids

    def render(self, rec: RawRecord, images: list, videos: list) -> list[chat.Segment]:
        match rec.kind:
            case "text":
                return chat.render_text(rec.text)
            case "interleaved":
                return chat.render_interleaved(rec.content, images=images)
            case "conversation":
                return chat.render_conversation(
                    rec.messages, images=images, videos=videos, options=self.options
                )
            case "caption" | "video" if rec.messages is None:
                return chat.render_caption(
                    rec.text,
                    image=images[0] if images else None,
                    video=videos[0] if videos else None,
                    question=rec.question,
                    answer=rec.answer,
                    order=self.options.caption_order,
                )
            case "video":
                return chat.render_conversation(
                    rec.messages, images=images, videos=videos, options=self.options
                )
        raise ValueError(f"unknown sample kind {rec.kind!r}")

    def encode(self, rec: RawRecord) -> EncodedSample:
        if rec.kind == megatron.KIND:  # token ids already: nothing to render or tokenise
            return megatron.encode(rec, self.tok)
        images, videos, pixels, grids = self._media(rec)
        segments = self.render(rec, images, videos)
        input_ids, labels = chat.encode_segments(segments, encode_batch=self.tok.encode_batch)
        position_ids = mrope_position_ids(
            input_ids, grids_hw=[(h, w) for _, h, w in grids], visual_token_ids=self.tok.ids.visual_pad_ids
        )
        return EncodedSample(
            key=rec.key,
            source=rec.source,
            kind=rec.kind,
            input_ids=input_ids,
            labels=labels,
            position_ids=position_ids,
            pixel_values=torch.cat(pixels) if pixels else torch.empty(0, 3, 14, 14),
            grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        )


@dataclass(frozen=True)
class LengthLimit:
    """Samples longer than max_seq_len: skipped (counted) or, with "truncate_text", cut if only text is
    cut. Applied where samples are encoded, so an overlong sample is a counted skip like any other."""

    max_seq_len: int
    overlong: str = "skip"

    def fit(self, sample: EncodedSample, *, vision_start: int, vision_end: int) -> EncodedSample:
        from keye_train.data.loader.packing import truncate_text

        if sample.num_tokens <= self.max_seq_len:
            return sample
        reason = f"overlong: {sample.num_tokens} tokens > max_seq_len {self.max_seq_len}"
        if self.overlong == "truncate_text":
            try:
                return truncate_text(
                    sample, max_len=self.max_seq_len, vision_start=vision_start, vision_end=vision_end
                )
            except ValueError as exc:
                reason += f", not truncatable: {exc}"
        raise ValueError(reason)


def encode_records(
    records: Iterable[RawRecord],
    *,
    encoder: SampleEncoder,
    counter: SkipCounter,
    limit: LengthLimit | None = None,
) -> Iterator[EncodedSample]:
    """Encode each record; a failing one is skipped, logged with its key and reason, and counted."""
    for rec in records:
        try:
            sample = encoder.encode(rec)
            if limit is not None:
                ids = encoder.tok.ids
                sample = limit.fit(sample, vision_start=ids.vision_start, vision_end=ids.vision_end)
        except Exception as exc:  # any bad input is a skip; only the skip-rate ceiling stops the run
            counter.skip(
                rec.source, rec.key, str(exc) if _is_overlong(exc) else f"{type(exc).__name__}: {exc}"
            )
            continue
        counter.ok(rec.source)
        yield sample


def _is_overlong(exc: Exception) -> bool:
    return isinstance(exc, ValueError) and str(exc).startswith("overlong")


def iter_source_samples(
    source: SourceConfig,
    *,
    encoder: SampleEncoder,
    counter: SkipCounter,
    limit: LengthLimit | None = None,
) -> Iterator[EncodedSample]:
    """All EncodedSamples of one source; unreadable shards, malformed and (with a limit) overlong samples
    are counted skips."""
    on_error = lambda key, reason: counter.skip(source.name, key, reason)
    records = iter_records(source, on_error=on_error)
    yield from encode_records(records, encoder=encoder, counter=counter, limit=limit)
