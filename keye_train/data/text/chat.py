"""Prompt layout: ChatML conversations, captions, interleaved documents and text, with loss masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from keye_train.data import batch as layout
from keye_train.data.batch import IGNORE_INDEX, FrameSpec
from keye_train.data.text import grounding

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
THINK_MODES = (None, "think", "no_think")
# Caption augmentation (Keye pre-training): the image always comes first; either the caption or the
# question/answer pair follows it, each closed by end-of-text.
CAPTION_ORDERS = ("caption_first", "qa_first")


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered sample; `train` marks its tokens as targets of the loss."""

    text: str
    train: bool


@dataclass(frozen=True)
class ImageInfo:
    """What rendering needs of an image: its patch grid and original size (width, height) for grounding."""

    grid_hw: tuple[int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class VideoInfo:
    frames: tuple[FrameSpec, ...]


@dataclass(frozen=True)
class ChatOptions:
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: no system turn
    think_mode: str | None = None  # "think" / "no_think" append "/think" / "/no_think" to each user turn
    caption_order: str = "caption_first"

    def __post_init__(self) -> None:
        if self.think_mode not in THINK_MODES:
            raise ValueError(f"chat.think_mode={self.think_mode!r} must be one of {THINK_MODES}")
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"chat.caption_order={self.caption_order!r} must be one of {CAPTION_ORDERS}")


def image_placeholder(grid_hw: tuple[int, int]) -> str:
    h, w = grid_hw
    return layout.VISION_START + layout.IMAGE_PAD * (h * w // 4) + layout.VISION_END


def video_placeholder(frames: Sequence[FrameSpec]) -> str:
    if not frames:
        raise ValueError("a video placeholder needs at least one frame")
    parts = [layout.VISION_START]
    for frame in frames:
        pads = layout.VIDEO_PAD * frame.num_tokens
        if frame.is_fast:
            pads = layout.FAST_START + pads + layout.FAST_END
        parts.append(f"{layout.FRAME}{frame.timestamp:.1f}{pads}")
    parts.append(layout.VISION_END)
    return "".join(parts)


class _Visuals:
    """Hands out the sample's images and videos in order of appearance."""

    def __init__(self, images: Sequence[ImageInfo], videos: Sequence[VideoInfo]) -> None:
        self.images, self.videos = list(images), list(videos)
        self.next_image = self.next_video = 0

    def image(self) -> str:
        if self.next_image >= len(self.images):
            raise ValueError(
                f"content references image #{self.next_image + 1} but the sample has {len(self.images)}"
            )
        self.next_image += 1
        return image_placeholder(self.images[self.next_image - 1].grid_hw)

    def video(self) -> str:
        if self.next_video >= len(self.videos):
            raise ValueError(
                f"content references video #{self.next_video + 1} but the sample has {len(self.videos)}"
            )
        self.next_video += 1
        return video_placeholder(self.videos[self.next_video - 1].frames)

    def size_of(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self.images):
            raise ValueError(f"grounding refers to image_index={index}; the sample has {len(self.images)}")
        return self.images[index].size

    def check_all_used(self) -> None:
        if self.next_image != len(self.images) or self.next_video != len(self.videos):
            raise ValueError(
                f"content placed {self.next_image}/{len(self.images)} images and "
                f"{self.next_video}/{len(self.videos)} videos; every visual member must be referenced once"
            )


def render_part(part: Mapping | str, visuals: _Visuals) -> str:
    """One content part (a dict with a `type`) as text; grounding coordinates are pixels of image
    `image_index` (default 0) unless `normalized` is true."""
    if isinstance(part, str):
        return part
    kind = part.get("type")
    size = None
    if kind in ("point", "box", "polygon"):
        size = None if part.get("normalized") else visuals.size_of(int(part.get("image_index", 0)))
    match kind:
        case "text":
            return str(part["text"])
        case "image":
            return visuals.image()
        case "video":
            return visuals.video()
        case "ref":
            return grounding.format_object_ref(str(part["text"]))
        case "ocr":
            return grounding.format_ocr(str(part["text"]))
        case "point":
            return grounding.format_points(part["point"], size=size)
        case "box":
            return grounding.format_boxes(part["box"], size=size)
        case "polygon":
            return grounding.format_polygons(part["polygon"], size=size)
        case "clip_time":
            start, end = part["clip_time"]
            return grounding.format_clip_time(float(start), float(end))
    raise ValueError(f"unknown content part type {kind!r} in {dict(part)!r}")


def render_content(content: Sequence | str, visuals: _Visuals) -> str:
    return content if isinstance(content, str) else "".join(render_part(p, visuals) for p in content)


def render_conversation(
    messages: Sequence[Mapping],
    *,
    images: Sequence[ImageInfo] = (),
    videos: Sequence[VideoInfo] = (),
    options: ChatOptions = ChatOptions(),
) -> list[Segment]:
    """ChatML turns; assistant content and its `<|im_end|>` are the targets."""
    visuals = _Visuals(images, videos)
    segments: list[Segment] = []
    has_system = bool(messages) and messages[0].get("role") == "system"
    if not has_system and options.system_prompt is not None:
        segments.append(Segment(f"{layout.IM_START}system\n{options.system_prompt}{layout.IM_END}\n", False))
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn, so nothing to learn; drop the sample")
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role {role!r} must be system, user or assistant")
        text = render_content(message.get("content", ""), visuals)
        if role == "user" and options.think_mode is not None:
            text += f"/{options.think_mode}"
        header = f"{layout.IM_START}{role}\n"
        if role == "assistant":
            segments += [Segment(header, False), Segment(text + layout.IM_END, True), Segment("\n", False)]
        else:
            segments.append(Segment(f"{header}{text}{layout.IM_END}\n", False))
    visuals.check_all_used()
    return segments


def render_caption(
    caption: str,
    *,
    image: ImageInfo | None = None,
    video: VideoInfo | None = None,
    question: str | None = None,
    answer: str | None = None,
    order: str = "caption_first",
) -> list[Segment]:
    """<visual, caption, eos[, question, answer, eos]> or, with order "qa_first", <visual, question,
    answer, eos, caption, eos>. Caption and answer (with their eos) are the targets."""
    if (image is None) == (video is None):
        raise ValueError("a caption sample needs exactly one image or one video")
    if order not in CAPTION_ORDERS:
        raise ValueError(f"caption order {order!r} must be one of {CAPTION_ORDERS}")
    visual = image_placeholder(image.grid_hw) if image is not None else video_placeholder(video.frames)
    eos = layout.ENDOFTEXT
    cap = [Segment(caption + eos, True)]
    qa: list[Segment] = []
    if question is not None and answer is not None:
        qa = [Segment(question, False), Segment(answer + eos, True)]
    body = cap + qa if order == "caption_first" or not qa else qa + cap
    return [Segment(visual, False), *body]


def render_interleaved(content: Sequence, *, images: Sequence[ImageInfo] = ()) -> list[Segment]:
    """An interleaved document: all text is target, images are context; closed by end-of-text."""
    visuals = _Visuals(images, ())
    segments = []
    for part in content:
        is_image = not isinstance(part, str) and part.get("type") == "image"
        segments.append(Segment(render_part(part, visuals), not is_image))
    visuals.check_all_used()
    segments.append(Segment(layout.ENDOFTEXT, True))
    return segments


def render_text(text: str) -> list[Segment]:
    if not text.strip():
        raise ValueError("empty text sample")
    return [Segment(text + layout.ENDOFTEXT, True)]


def segments_to_text(segments: Sequence[Segment]) -> str:
    return "".join(s.text for s in segments)


def encode_segments(segments: Sequence[Segment], *, encode_batch) -> tuple[Tensor, Tensor]:
    """Token ids and shifted labels: labels[i] = ids[i+1] where token i+1 is a target, else IGNORE_INDEX.

    `encode_batch(list[str]) -> list[list[int]]` tokenises each segment on its own so the target mask
    follows segment boundaries exactly.
    """
    pieces = encode_batch([s.text for s in segments])
    ids: list[int] = []
    target: list[bool] = []
    for seg, piece in zip(segments, pieces):
        ids += piece
        target += [seg.train] * len(piece)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if len(ids) > 1:
        mask = torch.tensor(target[1:], dtype=torch.bool)
        labels[:-1] = torch.where(mask, input_ids[1:], torch.full_like(input_ids[1:], IGNORE_INDEX))
    return input_ids, labels
