"""Build a run's pieces from its config: tokenizer, model config, weights (init_from), data loader."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from keye_train.config.schema import TrainConfig
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.text.tokenizer import LoadedTokenizer, load_tokenizer
from keye_train.models.configs import KeyeConfig
from keye_train.models.keye import build_model
from keye_train.models.siglip_text import SiglipTextTower

log = logging.getLogger(__name__)


def build_tokenizer(cfg: TrainConfig) -> LoadedTokenizer:
    """data.tokenizer, else the tokenizer the manifest names (relative to the manifest)."""
    path = cfg.data.tokenizer
    if path is None:
        manifest = load_manifest(cfg.data.manifest)
        if manifest.tokenizer is None:
            raise ValueError(
                f"data.tokenizer is null and the manifest {cfg.data.manifest} names no tokenizer"
            )
        path = manifest.tokenizer
    return load_tokenizer(path)


def tokenizer_token_ids(tokenizer: LoadedTokenizer) -> dict[str, int]:
    """KeyeConfig's token-id fields as the tokenizer assigns them (never constants)."""
    ids = tokenizer.ids
    return {
        "image_token_id": ids.image_pad,
        "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
        "pad_token_id": ids.endoftext,
        "bos_token_id": ids.endoftext,
        "eos_token_id": ids.im_end,
    }


def _shape(cfg: KeyeConfig) -> tuple[int, ...]:
    v, lang = cfg.vision, cfg.language
    return (
        *(v.hidden_size, v.num_layers, v.intermediate_size),
        *(lang.hidden_size, lang.num_layers, lang.num_heads, lang.num_kv_heads, lang.head_dim),
        *(lang.intermediate_size, lang.vocab_size),
    )


def checkpoint_architecture(cfg: TrainConfig) -> tuple[KeyeConfig | None, str]:
    """(the architecture model.from_hf / stage.init_from imply, which key said so); (None, "") if neither."""
    from keye_train.checkpoint.architecture import (
        architecture_from_hf,
        architecture_of_checkpoint,
        describe,
    )
    from keye_train.models.configs import preset

    arch, source = None, ""
    if cfg.model.from_hf:
        arch, source = architecture_from_hf(cfg.model.from_hf, base=preset(cfg.model.preset)), "model.from_hf"
    init = architecture_of_checkpoint(cfg.stage.init_from) if cfg.stage.init_from else None
    if init is not None:
        if arch is not None and _shape(arch) != _shape(init):
            raise ValueError(
                f"model.from_hf={cfg.model.from_hf} is {describe(arch)} but stage.init_from="
                f"{cfg.stage.init_from} is {describe(init)}; drop model.from_hf or init from a matching run"
            )
        arch, source = init, "stage.init_from"
    return arch, source


def keye_config(cfg: TrainConfig, tokenizer: LoadedTokenizer) -> KeyeConfig:
    """The run's model config: the checkpoint's architecture when model.from_hf or stage.init_from gives
    one (its RoPE base carried forward), else the preset; token ids always from the tokenizer."""
    from keye_train.checkpoint.architecture import describe
    from keye_train.models.configs import preset

    arch, source = checkpoint_architecture(cfg)
    if arch is not None:
        where = f"{source}={cfg.model.from_hf if source == 'model.from_hf' else cfg.stage.init_from}"
        base, wanted, reset = arch.language.rope_theta, cfg.model.rope_theta, cfg.stage.rope_theta
        # The recipe's expected base is checked even when the stage resets it (stage 3: 1e6 -> 8e6): a
        # checkpoint at another base is not the one the recipe was written for.
        if wanted is not None and wanted != base:
            raise ValueError(
                f"{where} was trained at RoPE base {base:g} but the recipe says model.rope_theta={wanted:g}; "
                f"set model.rope_theta={base:g} (or null) to start from the checkpoint's base"
                + (f" (stage.rope_theta={reset:g} still resets it when the stage starts)" if reset else "")
            )
        if reset is not None and reset != base:
            log.info("RoPE base: %s carries %g; stage.rope_theta resets it to %g", where, base, reset)
        fresh = preset(cfg.model.preset)
        if _shape(fresh)[:-1] != _shape(arch)[:-1]:
            log.warning("model.preset=%s is not used: %s carries %s", cfg.model.preset, where, describe(arch))
    return cfg.model.build(
        vocab_size=tokenizer.vocab_size, token_ids=tokenizer_token_ids(tokenizer), architecture=arch
    )


def prepare_indexes(cfg: TrainConfig, tokenizer: LoadedTokenizer, *, manifests: list[str]) -> None:
    """Build the manifests' missing or stale shard indexes on rank 0 (progress bar); the others wait."""
    import torch.distributed as dist

    from keye_train.data.shards.prepare import ensure_indexes

    if not cfg.data.build_index:
        return
    distributed = dist.is_available() and dist.is_initialized()
    ensure_indexes(
        [load_manifest(m) for m in manifests],
        tokenizer=tokenizer,
        builds=not distributed or dist.get_rank() == 0,
        barrier=dist.barrier if distributed else None,
        progress=cfg.logging.progress_bar,
    )


def build_loader(
    cfg: TrainConfig,
    tokenizer: LoadedTokenizer,
    *,
    dims,
    manifest: str | None = None,
    microbatches: int | None = None,
    prefetch: int | None = None,
):
    """The planned, topology-aware loader over the shard indexes (data/loader/planned.py): the run's
    data, or with `manifest`/`microbatches` a held-out set read as one planned step."""
    from keye_train.data.loader.planned import TopologyAwareLoader
    from keye_train.data.plan.cost import CostModel

    data = cfg.data
    manifest = manifest or data.manifest
    prepare_indexes(cfg, tokenizer, manifests=[manifest])
    return TopologyAwareLoader(
        load_manifest(manifest),
        dims=dims,
        tokenizer=tokenizer,
        max_seq_len=cfg.stage.max_seq_len,
        microbatches=microbatches or data.microbatches,
        cost_model=CostModel.load(data.cost_model) if data.cost_model else None,
        io=data.ioserver,
        prefetch=data.prefetch if prefetch is None else prefetch,
        workers=data.workers,
        plan_method=data.plan_method,
        fill=data.fill,
        image_cfg=data.image,
        video_cfg=data.video,
        shares=data.shares or None,
        overlong=data.overlong,
    )


def build_pair_loader(
    cfg: TrainConfig, tokenizer: LoadedTokenizer, *, world_size: int, rank: int, text_len: int
):
    """Stage 0's planned loader of image-caption pairs (data/loader/pairs.py), data parallel over every
    rank, each rank's share bounded by stage.max_seq_len ViT patches."""
    from keye_train.data.loader.pairs import PairLoader
    from keye_train.data.plan.cost import CostModel

    data = cfg.data
    prepare_indexes(cfg, tokenizer, manifests=[data.manifest])
    return PairLoader(
        load_manifest(data.manifest),
        tokenizer=tokenizer,
        image_cfg=data.image,
        max_patches=cfg.stage.max_seq_len,
        text_len=text_len,
        world_size=world_size,
        rank=rank,
        cost_model=CostModel.load(data.cost_model) if data.cost_model else None,
        plan_method=data.plan_method,
        fill=data.fill,
        shares=data.shares or None,
    )


def build_weights(
    cfg: TrainConfig, keye_cfg: KeyeConfig, *, device: torch.device
) -> tuple[nn.Module, SiglipTextTower | None]:
    """The model (and, for the SigLIP loss, the text tower) with init_from's weights or a seeded init.

    init_from carries weights only: a stage directory, a checkpoint directory or a Hugging Face
    directory. Optimizer and schedule always start fresh in a new stage.
    """
    arch, _ = checkpoint_architecture(cfg) if cfg.stage.init_from else (None, "")
    stored_vocab = arch.language.vocab_size if arch is not None else keye_cfg.language.vocab_size
    grow = stored_vocab < keye_cfg.language.vocab_size
    # A tokenizer that added tokens (the Keye-1.5 <|frame|>, <|fast_start|>, <|fast_end|>) needs more rows
    # than the checkpoint has: load at the stored size, then grow the embedding and lm_head.
    build_cfg = dataclasses.replace(
        keye_cfg, language=dataclasses.replace(keye_cfg.language, vocab_size=stored_vocab)
    ) if grow else keye_cfg  # fmt: skip
    model = build_model(build_cfg, device=device, seed=cfg.model.init_seed)
    model.lm_head.chunk_tokens = cfg.loss.chunk_tokens
    tower = None
    if cfg.stage.loss == "siglip":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.model.init_seed + 1)
            tower = SiglipTextTower(keye_cfg.text_tower).to(device)
    source = cfg.stage.init_from
    if source:
        from keye_train.checkpoint.model_weights import load_model_weights

        load_model_weights(model, source)
        tower_dir = Path(source) / "siglip_text"
        if tower is not None and tower_dir.is_dir():
            from keye_train.checkpoint.hf import load_into_model

            load_into_model(tower, tower_dir)
        log.info("initialised weights from %s", source)
    if grow:
        from keye_train.checkpoint.vocab import grow_vocabulary

        grow_vocabulary(model, keye_cfg)
        log.warning(
            "vocabulary grown from %d to %d rows for the tokenizer's added tokens (new rows: the mean of "
            "the existing ones)",
            stored_vocab,
            keye_cfg.language.vocab_size,
        )
    return model, tower


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda but CUDA is not available; use parallel.device=cpu")
    return torch.device(name)
