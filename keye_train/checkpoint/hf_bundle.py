"""Everything of an exported Hugging Face folder besides the weights: remote code, tokenizer, chat template,
preprocessor and generation configs, so that transformers (`trust_remote_code=True`) and vLLM load it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from keye_train.models.configs import KeyeConfig

REMOTE_PACKAGE = "keye_train.checkpoint.remote"
REMOTE_FILES = (
    "configuration_keye_vl1_5.py",
    "modeling_keye_vl1_5.py",
    "processing_keye_vl1_5.py",
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CLASS = "KeyeVL1_5Processor"
IMAGE_PROCESSOR_CLASS = "KeyeVL1_5ImageProcessor"
# Source tokenizer files copied verbatim; tokenizer.json and tokenizer_config.json are rewritten.
_COPIED_TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
# KeyeConfig field -> the token whose id the tokenizer must give it.
_ID_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def chat_template() -> str:
    """Our ChatML template (default system prompt, /think and /no_think), shipped as package data."""
    return resources.files(REMOTE_PACKAGE).joinpath(CHAT_TEMPLATE_FILE).read_text()


def write_remote_code(out_dir: Path) -> None:
    for name in REMOTE_FILES:
        (out_dir / name).write_text(resources.files(REMOTE_PACKAGE).joinpath(name).read_text())


def generation_config(cfg: KeyeConfig) -> dict[str, Any]:
    # Generation stops at <|im_end|> (ChatML turns) and at <|endoftext|> (plain text).
    eos = [i for i in dict.fromkeys([cfg.eos_token_id, cfg.pad_token_id]) if i is not None]
    return {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "do_sample": False,
        "use_cache": True,
    }


def preprocessor_config(
    cfg: KeyeConfig, *, min_pixels: int = 4 * 28 * 28, max_pixels: int = 20480 * 28 * 28
) -> dict[str, Any]:
    """The fields vLLM's Keye processor reads (merge_size, min/max_pixels) plus our image processor's."""
    return {
        "image_processor_type": IMAGE_PROCESSOR_CLASS,
        "processor_class": PROCESSOR_CLASS,
        "auto_map": {
            "AutoImageProcessor": f"processing_keye_vl1_5.{IMAGE_PROCESSOR_CLASS}",
            "AutoProcessor": f"processing_keye_vl1_5.{PROCESSOR_CLASS}",
        },
        "patch_size": cfg.vision.patch_size,
        "merge_size": cfg.projector.merge_size,
        "temporal_patch_size": 1,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def _check_token_ids(
    cfg: KeyeConfig, token_to_id: Callable[[str], int | None], vocab: int, where: Path
) -> None:
    """The exported tokenizer must give the model's special tokens the ids the model was trained with."""
    if vocab > cfg.language.vocab_size:
        raise ValueError(
            f"tokenizer {where} has {vocab} tokens but the model's embedding has "
            f"{cfg.language.vocab_size} rows; export with the tokenizer the run trained with"
        )
    for name, token in _ID_TOKENS.items():
        got = token_to_id(token)
        if got != getattr(cfg, name):
            raise ValueError(
                f"tokenizer {where} gives {token} id {got} but the model has {name}={getattr(cfg, name)}; "
                "export with the tokenizer the run trained with"
            )


def write_tokenizer(out_dir: Path, tokenizer_dir: Path, *, cfg: KeyeConfig) -> list[str]:
    """tokenizer.json (with any Keye-1.5 tokens the source lacked), tokenizer_config.json with our chat
    template, chat_template.jinja, and the other source files. Returns the tokens that were added."""
    from keye_train.data.text.tokenizer import load_tokenizer

    loaded = load_tokenizer(tokenizer_dir)
    backend = loaded.tokenizer
    _check_token_ids(cfg, backend.token_to_id, loaded.vocab_size, tokenizer_dir)
    backend.save(str(out_dir / "tokenizer.json"))
    for name in _COPIED_TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    source = tokenizer_dir / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(source.read_text()) if source.is_file() else {}
    decoder = dict(config.get("added_tokens_decoder") or {})
    for token in loaded.added_tokens:
        decoder[str(backend.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }  # fmt: skip
    id_to_token = backend.id_to_token
    config.update(
        added_tokens_decoder=decoder,
        chat_template=chat_template(),
        processor_class=PROCESSOR_CLASS,
        eos_token=id_to_token(cfg.eos_token_id) if cfg.eos_token_id is not None else config.get("eos_token"),
        pad_token=id_to_token(cfg.pad_token_id),
        model_max_length=cfg.language.max_position_embeddings,
    )
    config.setdefault("tokenizer_class", "Qwen2Tokenizer")
    config.setdefault("add_bos_token", False)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(chat_template())
    return loaded.added_tokens


def write_bundle(
    out_dir: str | Path,
    *,
    cfg: KeyeConfig,
    tokenizer_dir: str | Path | None,
    log: Callable[[str], None] = print,
) -> None:
    """Remote code, configs and (when a tokenizer dir is known) the tokenizer, beside the weights."""
    out_dir = Path(out_dir)
    write_remote_code(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    processor = preprocessor_config(cfg)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (out_dir / "processor_config.json").write_text(
        json.dumps({"processor_class": PROCESSOR_CLASS, "auto_map": processor["auto_map"]}, indent=2) + "\n"
    )
    if tokenizer_dir is None:
        log("export: no tokenizer given (--tokenizer DIR): the folder has no tokenizer files")
        return
    added = write_tokenizer(out_dir, Path(tokenizer_dir), cfg=cfg)
    if added:
        log(f"export: the tokenizer lacked {added}; the exported tokenizer.json holds them")
