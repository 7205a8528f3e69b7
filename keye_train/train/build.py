"""Build a run's pieces from its config: tokenizer, model config, weights (init_from), data stream."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from keye_train.config.schema import TrainConfig
from keye_train.data.loader.packing import PackingConfig
from keye_train.data.loader.stream import PackedStream
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


def keye_config(cfg: TrainConfig, tokenizer: LoadedTokenizer) -> KeyeConfig:
    ids = tokenizer.ids
    token_ids = {
        "image_token_id": ids.image_pad,
        "video_token_id": ids.video_pad,
        "vision_start_token_id": ids.vision_start,
        "vision_end_token_id": ids.vision_end,
        "pad_token_id": ids.endoftext,
    }
    return cfg.model.build(vocab_size=tokenizer.vocab_size, token_ids=token_ids)


def build_stream(
    cfg: TrainConfig, tokenizer: LoadedTokenizer, *, manifest: str | None = None
) -> PackedStream:
    data_cfg = load_manifest(manifest or cfg.data.manifest)
    return PackedStream(
        data_cfg,
        tokenizer=tokenizer,
        packing=PackingConfig(
            max_seq_len=cfg.stage.max_seq_len,
            overlong=cfg.data.overlong,
            pad_token_id=tokenizer.ids.endoftext,
        ),
        image_cfg=cfg.data.image,
        video_cfg=cfg.data.video,
        shares=cfg.data.shares or None,
    )


def build_indexed_loader(cfg: TrainConfig, tokenizer: LoadedTokenizer, *, dims):
    """The topology-aware loader over the shard indexes (see data/loader/planned.py)."""
    from keye_train.data.loader.planned import TopologyAwareLoader
    from keye_train.data.plan.cost import CostModel

    data = cfg.data
    return TopologyAwareLoader(
        load_manifest(data.manifest),
        dims=dims,
        tokenizer=tokenizer,
        max_seq_len=cfg.stage.max_seq_len,
        microbatches=data.microbatches,
        cost_model=CostModel.load(data.cost_model) if data.cost_model else None,
        io=data.ioserver,
        prefetch=data.prefetch,
        workers=data.workers,
        plan_method=data.plan_method,
        fill=data.fill,
        image_cfg=data.image,
        video_cfg=data.video,
        shares=data.shares or None,
        overlong=data.overlong,
    )


def build_weights(
    cfg: TrainConfig, keye_cfg: KeyeConfig, *, device: torch.device
) -> tuple[nn.Module, SiglipTextTower | None]:
    """The model (and, for the SigLIP loss, the text tower) with init_from's weights or a seeded init.

    init_from carries weights only: a stage directory, a checkpoint directory or a Hugging Face
    directory. Optimizer and schedule always start fresh in a new stage.
    """
    model = build_model(keye_cfg, device=device, seed=cfg.model.init_seed)
    model.lm_head.chunk_tokens = cfg.loss.chunk_tokens
    tower = None
    if cfg.stage.loss == "siglip":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.model.init_seed + 1)
            tower = SiglipTextTower(keye_cfg.text_tower).to(device)
    source = cfg.stage.init_from
    if source:
        from keye_train.checkpoint.manager import load_model_weights

        load_model_weights(model, source)
        tower_dir = Path(source) / "siglip_text"
        if tower is not None and tower_dir.is_dir():
            from keye_train.checkpoint.hf import load_into_model

            load_into_model(tower, tower_dir)
        log.info("initialised weights from %s", source)
    return model, tower


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda but CUDA is not available; use parallel.device=cpu")
    return torch.device(name)
