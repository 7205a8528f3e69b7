"""The root training config: one section per component, each the component's own typed config.

Only sections that no single component owns are defined here (model choice, data sources); everything
else is the component's dataclass, so a recipe key and the code that validates it can never drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omegaconf import MISSING

from keye_train.checkpoint.manager import CheckpointConfig
from keye_train.data.ioserver.config import IOServerConfig
from keye_train.data.loader.packing import OVERLONG_POLICIES
from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig
from keye_train.distributed.parallelize import ParallelConfig
from keye_train.distributed.precision import check_precision
from keye_train.models.configs import ATTENTION_BACKENDS, PRESETS, KeyeConfig, preset
from keye_train.train.loss import LossConfig
from keye_train.train.metrics import LoggingConfig
from keye_train.train.optim import OptimConfig
from keye_train.train.schedule import ScheduleConfig
from keye_train.train.stages import StageConfig


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # keye_8b | tiny
    attn_backend: str = "auto"  # auto | sdpa | varlen | flex | flash (LLM and ViT; models/attention.py)
    init_seed: int = 0  # initialisation of weights that init_from does not provide

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, f"model.preset={self.preset!r} must be one of {sorted(PRESETS)}")
        _require(
            self.attn_backend in ATTENTION_BACKENDS,
            f"model.attn_backend={self.attn_backend!r} must be one of {ATTENTION_BACKENDS}",
        )

    def build(self, *, vocab_size: int, token_ids: dict[str, int]) -> KeyeConfig:
        """The preset with this run's backend, the tokenizer's vocabulary size and special-token ids."""
        cfg = preset(self.preset)
        language = dataclasses.replace(
            cfg.language, attn_backend=self.attn_backend, vocab_size=max(vocab_size, cfg.language.vocab_size)
        )
        vision = dataclasses.replace(cfg.vision, attn_backend=self.attn_backend)
        # Stage 0 feeds the text tower with the same tokenizer (the tiny preset's tower is smaller).
        tower = dataclasses.replace(cfg.text_tower, vocab_size=max(vocab_size, cfg.text_tower.vocab_size))
        return dataclasses.replace(cfg, language=language, vision=vision, text_tower=tower, **token_ids)


LOADERS = ("indexed", "stream")
PLAN_METHODS = ("lpt", "kk", "random")


@dataclass
class DataConfig:
    manifest: str = MISSING  # dataset manifest YAML (keye-data synth writes one)
    tokenizer: str | None = None  # tokenizer dir; None: the manifest's
    microbatches: int = 1  # packed sequences per DP rank per optimizer step (gradient accumulation)
    # indexed: plan every step from the shard indexes (`keye-data index` first) with cost balancing; each
    #   DP replica reads only its samples, one rank per TP/CP group loads, only PP stage 0 gets pixels.
    # stream: every rank decodes the mixture in order and keeps its share (no index needed; simple).
    loader: str = "stream"
    plan_method: str = "lpt"  # indexed: lpt | kk (Karmarkar-Karp) | random (equal count, the baseline)
    fill: float = 0.95  # indexed: predicted tokens per step as a fraction of dp x microbatches x max_seq_len
    prefetch: int = 2  # indexed: steps planned and loaded ahead in the background
    workers: int = 0  # indexed: decoding processes per loading rank (0: decode in the loader thread)
    cost_model: str | None = None  # indexed: coefficients from `keye-data calibrate` (JSON); None: FLOP-based
    ioserver: IOServerConfig = field(default_factory=IOServerConfig)  # remote decoding (keye-ioserver)
    overlong: str = "skip"  # a sample longer than stage.max_seq_len: skip | truncate_text
    # Token share per source name, replacing the manifest's (e.g. stage 3's video 24 / image 50 / text 26);
    # empty keeps the manifest's shares.
    shares: dict[str, float] = field(default_factory=dict)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    eval_manifest: str | None = None  # held-out shards; None disables evaluation
    eval_interval: int = 0  # steps between evaluations (0: never)
    eval_batches: int = 4  # packed sequences per DP rank per evaluation

    def __post_init__(self) -> None:
        _require(self.microbatches >= 1, f"data.microbatches={self.microbatches} must be >= 1")
        _require(self.loader in LOADERS, f"data.loader={self.loader!r} must be one of {LOADERS}")
        _require(
            self.plan_method in PLAN_METHODS,
            f"data.plan_method={self.plan_method!r} must be in {PLAN_METHODS}",
        )
        _require(0 < self.fill <= 1, f"data.fill={self.fill} must be in (0, 1]")
        _require(
            self.overlong in OVERLONG_POLICIES,
            f"data.overlong={self.overlong!r} must be in {OVERLONG_POLICIES}",
        )
        bad = {k: v for k, v in self.shares.items() if not v > 0}
        _require(not bad, f"data.shares={dict(self.shares)}: shares must be > 0, got {bad}")
        _require(self.eval_interval >= 0, f"data.eval_interval={self.eval_interval} must be >= 0")


@dataclass
class TrainConfig:
    run_dir: str = MISSING  # metrics.jsonl, resolved config and (by default) checkpoints go here
    steps: int = MISSING  # optimizer steps of this stage
    seed: int = 0
    resume: bool = True  # continue from the latest complete checkpoint in checkpoint.dir, if any
    max_nonfinite_steps: int = 5  # skipped steps (non-finite loss or gradient) before the run stops
    peak_tflops: float | None = None  # peak TFLOP/s of one device (H100 bf16 dense: 989); enables MFU
    # bf16: bf16 parameters in compute with fp32 master weights, optimizer state and gradient reductions,
    # on every path (distributed/precision.py); fp32: everything fp32 (TF32 matmuls on CUDA either way).
    precision: str = "bf16"
    model: ModelConfig = field(default_factory=ModelConfig)
    # Mesh degrees and every parallel technique's settings (distributed/parallelize.py: ParallelConfig).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = MISSING  # every recipe names its stage
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        _require(self.steps >= 1, f"steps={self.steps} must be >= 1")
        _require(
            self.max_nonfinite_steps >= 0, f"max_nonfinite_steps={self.max_nonfinite_steps} must be >= 0"
        )
