"""Synthetic webdataset shards of every source kind, a manifest and a tiny tokenizer, for tests and demos."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
import yaml
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from keye_train.data import batch as layout
from keye_train.data.synth.media import WORDS, SynthImage, encode_image, synth_image, synth_video
from keye_train.data.text.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)

KIND_ORDER = ("caption", "conversation", "interleaved", "video", "text")
# Token shares of the manifest: the stage-3 mix (video 24 / images 50 / text 26).
TOKEN_SHARES = {"caption": 0.25, "conversation": 0.15, "interleaved": 0.10, "video": 0.24, "text": 0.26}


@dataclass
class SynthConfig:
    out: Path
    samples: int = 64
    seed: int = 0
    shards_per_kind: int = 1
    image_min_side: int = 28
    image_max_side: int = 224
    video_size: tuple[int, int] = (112, 84)  # width, height (even, for yuv420p)
    video_fps: int = 8
    video_seconds: float = 3.0
    vocab_size: int = 512

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.samples < 1:
            raise ValueError(f"synth samples={self.samples} must be >= 1")
        if not 8 <= self.image_min_side <= self.image_max_side:
            raise ValueError(
                f"synth image sides {self.image_min_side}..{self.image_max_side} need 8 <= min <= max"
            )
        if any(v % 2 or v < 16 for v in self.video_size):
            raise ValueError(f"synth video_size={self.video_size} must be even and >= 16 per side")
        if self.vocab_size < 300 + len(SPECIAL_TOKENS):
            raise ValueError(f"synth vocab_size={self.vocab_size} must hold 256 bytes, merges and specials")


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(s: SynthImage) -> str:
    names = [f"a {shape.name}" for shape in s.shapes] or ["nothing"]
    text = f" with the word {s.text}" if s.text else ""
    return f"{_listing(names)} on a {s.background} background{text}."


def _image(rng: random.Random, cfg: SynthConfig, *, with_text: bool = False) -> tuple[SynthImage, bytes, str]:
    s = synth_image(rng, min_side=cfg.image_min_side, max_side=cfg.image_max_side, with_text=with_text)
    fmt = rng.choice(("JPEG", "PNG"))
    return s, encode_image(s.image, fmt=fmt), "jpg" if fmt == "JPEG" else "png"


def _msg(role: str, *parts) -> dict:
    return {
        "role": role,
        "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts],
    }


def caption_sample(rng: random.Random, cfg: SynthConfig, key: str) -> dict:
    s, data, ext = _image(rng, cfg)
    meta = {"width": s.image.width, "height": s.image.height, "url": f"synth://{key}"}
    if s.shapes and rng.random() < 0.5:
        meta |= {"question": f"What color is the {s.shapes[0].kind}?", "answer": f"{s.shapes[0].color}."}
    return {ext: data, "txt": describe(s).encode(), "json": json.dumps(meta).encode()}


def conversation_sample(rng: random.Random, cfg: SynthConfig, key: str, index: int) -> dict:
    """VQA, grounding (box, point, polygon) and OCR in turn; coordinates in pixels of the drawn shapes."""
    task = ("vqa", "box", "point", "polygon", "ocr", "multi")[index % 6]
    s, data, ext = _image(rng, cfg, with_text=task == "ocr")
    while task in ("box", "point", "polygon") and not s.shapes:
        s, data, ext = _image(rng, cfg)
    img = {"type": "image", "image": f"img0.{ext}"}
    out = {f"img0.{ext}": data}
    if task == "vqa":
        n = len(s.shapes)
        msgs = [_msg("user", img, "How many shapes are there?"), _msg("assistant", f"There are {n} shapes.")]
    elif task == "ocr":
        msgs = [
            _msg("user", img, "Read the text in the image."),
            _msg("assistant", {"type": "ocr", "text": s.text}, {"type": "box", "box": list(s.text_box)}),
        ]
    elif task == "multi":
        s2, data2, ext2 = _image(rng, cfg)
        out[f"img1.{ext2}"] = data2
        msgs = [
            _msg("user", img, {"type": "image", "image": f"img1.{ext2}"}, "Describe both images."),
            _msg("assistant", f"First: {describe(s)} Second: {describe(s2)}"),
        ]
    else:
        shape = rng.choice(s.shapes if task != "polygon" else [x for x in s.shapes if x.polygon] or s.shapes)
        ref = {"type": "ref", "text": shape.name}
        if task == "box" or (task == "polygon" and shape.polygon is None):
            where = {"type": "box", "box": list(shape.box)}
        elif task == "point":
            where = {"type": "point", "point": list(shape.center)}
        else:
            where = {"type": "polygon", "polygon": [list(p) for p in shape.polygon]}
        msgs = [_msg("user", img, f"Where is the {shape.name}?"), _msg("assistant", ref, where)]
    out["json"] = json.dumps({"messages": msgs, "task": task}).encode()
    return out


def interleaved_sample(rng: random.Random, cfg: SynthConfig, key: str) -> dict:
    out, content = {}, [{"type": "text", "text": f"Document {key} about shapes. "}]
    for i in range(rng.randint(1, 3)):
        s, data, ext = _image(rng, cfg)
        out[f"img{i}.{ext}"] = data
        content += [
            {"type": "image", "image": f"img{i}.{ext}"},
            {"type": "text", "text": f"Figure {i}: {describe(s)} "},
        ]
    out["json"] = json.dumps({"content": content}).encode()
    return out


def video_sample(rng: random.Random, cfg: SynthConfig, key: str, index: int) -> dict:
    v = synth_video(rng, size=cfg.video_size, fps=cfg.video_fps, seconds=cfg.video_seconds)
    story = "Then ".join(f"{sc.description[0].upper()}{sc.description[1:]}. " for sc in v.scenes).strip()
    if index % 2 == 0:
        return {"mp4": v.data, "txt": story.encode()}
    scene = v.scenes[1]
    msgs = [
        _msg("user", {"type": "video", "video": "mp4"}, f"When is the {scene.shape.name} shown?"),
        _msg("assistant", {"type": "clip_time", "clip_time": [scene.start, scene.end]}),
    ]
    return {"mp4": v.data, "json": json.dumps({"messages": msgs}).encode()}


def text_sample(rng: random.Random, cfg: SynthConfig, key: str) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
    return {"txt": f"Text {key}: {words}.".encode()}


def kind_counts(samples: int) -> dict[str, int]:
    base, extra = divmod(samples, len(KIND_ORDER))
    return {k: base + (1 if i < extra else 0) for i, k in enumerate(KIND_ORDER)}


def build_tokenizer(corpus: list[str], *, vocab_size: int, out_dir: Path) -> Tokenizer:
    """Byte-level BPE trained on the corpus with every special token; `<|endoftext|>` is id 0 (the pad id
    of the tiny model config) and the other specials take the top ids in SPECIAL_TOKENS order, ending with
    vision start/end and image/video pad at vocab_size-4 .. vocab_size-1, as `configs.tiny()` expects."""
    rest = [t for t in SPECIAL_TOKENS if t != layout.ENDOFTEXT]
    model_size = vocab_size - len(rest)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=model_size,
        special_tokens=[layout.ENDOFTEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # A small corpus may run out of merges; reserved fillers keep the special ids at the top.
    short = model_size - tok.get_vocab_size(with_added_tokens=True)
    if short > 0:
        tok.add_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(short)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in rest])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size, tok.get_vocab_size(
        with_added_tokens=True
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "eos_token": layout.IM_END,
        "pad_token": layout.ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": rest,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": layout.IM_END, "pad_token": layout.ENDOFTEXT}, indent=1)
    )
    return tok


def _texts_of(sample: dict) -> list[str]:
    texts = []
    for name, value in sample.items():
        if name == "txt":
            texts.append(value.decode())
        elif name == "json":
            texts.append(json.dumps(json.loads(value)))
    return texts


def synth_dataset(cfg: SynthConfig, *, progress: Callable[[str], None] | None = None) -> dict:
    """Write shards, manifest.yaml and tokenizer/ under cfg.out; returns a summary with sample counts."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    makers = {
        "caption": lambda key, i: caption_sample(rng, cfg, key),
        "conversation": lambda key, i: conversation_sample(rng, cfg, key, i),
        "interleaved": lambda key, i: interleaved_sample(rng, cfg, key),
        "video": lambda key, i: video_sample(rng, cfg, key, i),
        "text": lambda key, i: text_sample(rng, cfg, key),
    }
    corpus: list[str] = [" ".join(WORDS)]
    counts = kind_counts(cfg.samples)
    sources = []
    for kind, count in counts.items():
        if count == 0:
            continue
        shards = min(cfg.shards_per_kind, count)
        for shard in range(shards):
            with wds.TarWriter(str(cfg.out / f"{kind}-{shard:06d}.tar"), encoder=False) as writer:
                for i in range(shard, count, shards):
                    key = f"{kind}{i:06d}"
                    sample = makers[kind](key, i)
                    corpus += _texts_of(sample)
                    writer.write({"__key__": key, **sample})
        if progress:
            progress(f"{kind}: {count} samples in {shards} shard(s)")
        pattern = f"{kind}-{{000000..{shards - 1:06d}}}.tar"
        sources.append({"name": kind, "kind": kind, "shards": pattern, "token_share": TOKEN_SHARES[kind]})
    build_tokenizer(corpus, vocab_size=cfg.vocab_size, out_dir=cfg.out / "tokenizer")
    manifest = {"tokenizer": "tokenizer", "seed": cfg.seed, "sources": sources}
    (cfg.out / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    if progress:
        progress(f"tokenizer ({cfg.vocab_size} tokens) and manifest.yaml written to {cfg.out}")
    return {
        "out": str(cfg.out),
        "counts": counts,
        "manifest": str(cfg.out / "manifest.yaml"),
        "tokenizer": str(cfg.out / "tokenizer"),
    }
