"""Synthetic images and videos with known content: drawn shapes, rendered text, scene cuts and still shots."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
    "teal": (40, 130, 130),
    "navy": (20, 30, 80),
}
SHAPES = ("square", "circle", "triangle")
WORDS = (
    "hello",
    "world",
    "keye",
    "video",
    "model",
    "token",
    "image",
    "slow",
    "fast",
    "frame",
    "data",
    "text",
)
# Width/height ratios, from tall to wide, so that many patch grids occur.
ASPECTS = (1 / 6, 1 / 3, 9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9, 3.0, 6.0)


@dataclass
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels (inclusive of the drawn area)
    polygon: list[tuple[int, int]] | None = None  # vertices of a triangle, clockwise on screen

    @property
    def center(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class SynthImage:
    image: Image.Image
    background: str
    shapes: list[Shape] = field(default_factory=list)
    text: str | None = None
    text_box: tuple[int, int, int, int] | None = None


def image_size(rng: random.Random, *, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) with a random aspect ratio; the long side in [min_side, max_side]."""
    aspect = rng.choice(ASPECTS)
    long_side = rng.randint(min_side, max_side)
    short = max(8, round(long_side / max(aspect, 1 / aspect)))
    return (long_side, short) if aspect >= 1 else (short, long_side)


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    fill = COLORS[shape.color]
    if shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    elif shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    else:
        draw.polygon(shape.polygon, fill=fill)


def make_shape(rng: random.Random, *, region: tuple[int, int, int, int], color: str) -> Shape:
    """A shape filling a random square inside region (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = region
    side = max(4, int(min(x2 - x1, y2 - y1) * rng.uniform(0.5, 0.9)))
    left = rng.randint(x1, max(x1, x2 - side))
    top = rng.randint(y1, max(y1, y2 - side))
    box = (left, top, left + side - 1, top + side - 1)
    kind = rng.choice(SHAPES)
    polygon = None
    if kind == "triangle":  # apex, bottom-right, bottom-left: clockwise with y pointing down
        polygon = [((box[0] + box[2]) // 2, box[1]), (box[2], box[3]), (box[0], box[3])]
    return Shape(kind=kind, color=color, box=box, polygon=polygon)


def synth_image(rng: random.Random, *, min_side: int, max_side: int, with_text: bool) -> SynthImage:
    """Up to three non-overlapping shapes side by side along the long axis, optionally a word of text."""
    width, height = image_size(rng, min_side=min_side, max_side=max_side)
    background = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    out = SynthImage(image=img, background=background)
    n = rng.randint(1, 3)
    colors = rng.sample([c for c in COLORS if c not in ("white", "black")], n)
    horizontal = width >= height
    text_band = 0
    if with_text:
        text_band = max(12, min(width, height) // 3)
    for i, color in enumerate(colors):
        if horizontal:
            span = width // n
            region = (i * span + 1, 1, (i + 1) * span - 2, height - 2 - text_band)
        else:
            span = (height - text_band) // n
            region = (1, i * span + 1, width - 2, (i + 1) * span - 2)
        if region[2] - region[0] < 6 or region[3] - region[1] < 6:
            continue
        shape = make_shape(rng, region=region, color=color)
        draw_shape(draw, shape)
        out.shapes.append(shape)
    if with_text:
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=max(8, text_band - 4))
        origin = (2, height - text_band)
        draw.text(origin, word, fill=COLORS["white"] if background == "navy" else COLORS["black"], font=font)
        out.text, out.text_box = word, tuple(int(v) for v in draw.textbbox(origin, word, font=font))
    return out


def encode_image(img: Image.Image, *, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@dataclass
class Scene:
    start: float  # seconds
    end: float
    background: str
    shape: Shape
    moving: bool

    @property
    def description(self) -> str:
        motion = "moving" if self.moving else "still"
        return f"a {motion} {self.shape.name} on {self.background}"


@dataclass
class SynthVideo:
    data: bytes
    fps: int
    num_frames: int
    scenes: list[Scene]


def synth_video(rng: random.Random, *, size: tuple[int, int], fps: int, seconds: float) -> SynthVideo:
    """An H.264 MP4 of 2-3 scenes with hard cuts; each scene is either still or has a moving shape, so
    SlowFast sees both near-identical stretches (fast frames) and cuts (new slow frames)."""
    width, height = size
    num_frames = max(2, round(seconds * fps))
    n_scenes = rng.randint(2, 3)
    cuts = sorted(rng.sample(range(2, num_frames - 1), n_scenes - 1)) if num_frames > n_scenes + 2 else []
    bounds = [0, *cuts, num_frames]
    backgrounds = rng.sample(list(BACKGROUNDS), len(bounds) - 1)
    scenes = []
    for (a, b), bg in zip(zip(bounds, bounds[1:]), backgrounds):
        color = rng.choice([c for c in COLORS if c not in ("white", "black")])
        shape = make_shape(rng, region=(2, 2, width // 2, height - 3), color=color)
        scenes.append(
            Scene(start=a / fps, end=b / fps, background=bg, shape=shape, moving=rng.random() < 0.5)
        )
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for scene, (a, b) in zip(scenes, zip(bounds, bounds[1:])):
            for i in range(a, b):
                img = Image.new("RGB", (width, height), BACKGROUNDS[scene.background])
                shift = (i - a) * max(1, width // (2 * fps)) if scene.moving else 0
                box = scene.shape.box
                moved = Shape(
                    scene.shape.kind,
                    scene.shape.color,
                    (box[0] + shift, box[1], box[2] + shift, box[3]),
                    [(x + shift, y) for x, y in scene.shape.polygon] if scene.shape.polygon else None,
                )
                draw_shape(ImageDraw.Draw(img), moved)
                frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return SynthVideo(data=buf.getvalue(), fps=fps, num_frames=num_frames, scenes=scenes)
