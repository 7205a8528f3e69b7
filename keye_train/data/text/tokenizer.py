"""Load a Hugging Face tokenizer from a local directory and read the Keye special-token ids from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from keye_train.data import batch as layout

log = logging.getLogger(__name__)

# Every special token of KEYE_SPEC (Qwen vocabulary plus the 1.5 additions and the grounding polygon pair).
SPECIAL_TOKENS: tuple[str, ...] = (
    layout.ENDOFTEXT,
    layout.IM_START,
    layout.IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_pad|>",
    "<think>",
    "</think>",
    "<|point_start|>",
    "<|point_end|>",
    "<|ocr_text_start|>",
    "<|ocr_text_end|>",
    "<|clip_time_start|>",
    "<|clip_time_end|>",
    "<|polygon_start|>",
    "<|polygon_end|>",
    layout.FRAME,
    layout.FAST_START,
    layout.FAST_END,
    layout.VISION_START,
    layout.VISION_END,
    layout.IMAGE_PAD,
    layout.VIDEO_PAD,
)


@dataclass(frozen=True)
class TokenIds:
    """Ids of the special tokens the data pipeline emits, as the loaded tokenizer assigns them."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    frame: int
    fast_start: int
    fast_end: int

    @property
    def visual_pad_ids(self) -> tuple[int, int]:
        return (self.image_pad, self.video_pad)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> TokenIds:
        names = {
            "endoftext": layout.ENDOFTEXT,
            "im_start": layout.IM_START,
            "im_end": layout.IM_END,
            "vision_start": layout.VISION_START,
            "vision_end": layout.VISION_END,
            "image_pad": layout.IMAGE_PAD,
            "video_pad": layout.VIDEO_PAD,
            "frame": layout.FRAME,
            "fast_start": layout.FAST_START,
            "fast_end": layout.FAST_END,
        }
        ids = {}
        for field_name, token in names.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"tokenizer has no id for {token!r}; load it with load_tokenizer() to add it"
                )
            ids[field_name] = token_id
        return cls(**ids)


@dataclass
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` with the Keye token ids and the special tokens that had to be added."""

    tokenizer: Tokenizer
    ids: TokenIds
    added_tokens: list[str]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _read_backend(directory: Path) -> Tokenizer:
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        return Tokenizer.from_file(str(tokenizer_json))
    # Slow-format directories (vocab.json + merges.txt ...) are converted by transformers, offline only.
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    except Exception as exc:  # transformers raises many types for unreadable directories
        raise ValueError(
            f"cannot load a tokenizer from {str(directory)!r}: no tokenizer.json and transformers failed "
            f"({exc}); point data.tokenizer at a Hugging Face tokenizer directory"
        ) from exc
    return hf.backend_tokenizer


def load_tokenizer(path: str | Path, *, add_missing: bool = True) -> LoadedTokenizer:
    """Load the tokenizer in directory `path`; KEYE_SPEC special tokens it lacks are added and reported.

    With add_missing=False a missing special token is an error instead. Added tokens are logged at WARNING
    level and listed in `LoadedTokenizer.added_tokens` so that a resized embedding never goes unnoticed.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"tokenizer path {str(directory)!r} is not a directory; give a local tokenizer dir")
    tokenizer = _read_backend(directory)
    missing = [tok for tok in SPECIAL_TOKENS if tokenizer.token_to_id(tok) is None]
    if missing and not add_missing:
        raise ValueError(f"tokenizer {str(directory)!r} lacks special tokens {missing}; use add_missing=True")
    if missing:
        tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in missing])
        log.warning(
            "tokenizer %s lacked %d KEYE_SPEC special tokens, added at ids %s: %s (resize the embedding "
            "to %d)",
            directory,
            len(missing),
            [tokenizer.token_to_id(t) for t in missing],
            missing,
            tokenizer.get_vocab_size(with_added_tokens=True),
        )
    return LoadedTokenizer(tokenizer=tokenizer, ids=TokenIds.from_tokenizer(tokenizer), added_tokens=missing)
