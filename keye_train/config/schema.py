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
    """Which architecture a run builds. A fresh start builds `preset`; `from_hf` builds the architecture of
    a Hugging Face folder; `stage.init_from` carries the architecture (and RoPE base) of the run or folder
    it starts from, and a recipe value that contradicts it is an error naming both."""

    preset: str = "tiny"  # keye_8b | keye_2b | keye_1b | tiny (used when no checkpoint gives the shapes)
    # HF Keye-VL-1.5 folder (whole model), Qwen3 folder (the LLM) or SigLIP folder (the ViT); null: preset
    from_hf: str | None = None
    # LLM RoPE base the recipe expects; null: the checkpoint's (or the preset's). A stage's own reset is
    # stage.rope_theta (stage 3: 8e6).
    rope_theta: float | None = None
    attn_backend: str = "auto"  # auto | sdpa | varlen | flex | flash (LLM and ViT; models/attention.py)
    init_seed: int = 0  # initialisation of weights that init_from does not provide

    def __post_init__(self) -> None:
        _require(self.preset in PRESETS, f"model.preset={self.preset!r} must be one of {sorted(PRESETS)}")
        _require(
            self.attn_backend in ATTENTION_BACKENDS,
            f"model.attn_backend={self.attn_backend!r} must be one of {ATTENTION_BACKENDS}",
        )
        _require(
            self.rope_theta is None or self.rope_theta > 0,
            f"model.rope_theta={self.rope_theta} must be > 0 (or null to keep the checkpoint's)",
        )

    def build(
        self, *, vocab_size: int, token_ids: dict[str, int], architecture: KeyeConfig | None = None
    ) -> KeyeConfig:
        """`architecture` (from a checkpoint) or the preset, with this run's backend, the tokenizer's
        vocabulary size (the larger of the two) and special-token ids."""
        cfg = architecture if architecture is not None else preset(self.preset)
        language = dataclasses.replace(
            cfg.language, attn_backend=self.attn_backend, vocab_size=max(vocab_size, cfg.language.vocab_size)
        )
        if architecture is None and self.rope_theta is not None:
            language.rope_theta = float(self.rope_theta)
        vision = dataclasses.replace(cfg.vision, attn_backend=self.attn_backend)
        # Stage 0 feeds the text tower with the same tokenizer (the tiny preset's tower is smaller).
        tower = dataclasses.replace(cfg.text_tower, vocab_size=max(vocab_size, cfg.text_tower.vocab_size))
        return dataclasses.replace(cfg, language=language, vision=vision, text_tower=tower, **token_ids)


# One loader: planned from the shard indexes. "stream" (every rank decoding the whole mixture) is retired.
LOADERS = ("indexed",)
PLAN_METHODS = ("lpt", "kk", "random")


@dataclass
class DataConfig:
    manifest: str = MISSING  # dataset manifest YAML (keye-data synth writes one)
    tokenizer: str | None = None  # tokenizer dir; None: the manifest's
    microbatches: int = 1  # packed sequences per DP rank per optimizer step (gradient accumulation)
    # The one loader: every step is planned from the shard indexes (built by keye-train when missing or
    # stale) with cost balancing; each DP replica reads only its samples, one rank per TP/CP group loads,
    # only PP stage 0 gets pixels. Kept as a key so old overrides (data.loader=indexed) still parse.
    loader: str = "indexed"
    plan_method: str = "lpt"  # lpt | kk (Karmarkar-Karp) | random (equal count, the baseline)
    fill: float = 0.95  # predicted tokens per step as a fraction of dp x microbatches x max_seq_len
    prefetch: int = 2  # steps planned and loaded ahead in the background
    workers: int = 0  # decoding processes per loading rank (0: decode in the loader thread)
    cost_model: str | None = None  # coefficients from `keye-data calibrate` (JSON); None: FLOP-based
    build_index: bool = True  # build missing or stale shard indexes at start-up (rank 0; others wait)
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
        _require(
            self.loader in LOADERS,
            f"data.loader={self.loader!r}: the planned loader ('indexed') is the only loader since the "
            "stream loader was retired; drop the override",
        )
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
    resume: bool = True  # continue from the newest checkpoint in checkpoint.dir that verifies, if any
    # Start over in a run_dir that holds an earlier run (its metrics.jsonl and checkpoint dir are moved
    # aside with a timestamp). Without it such a start is refused: a mistyped checkpoint.dir would
    # otherwise restart at step 0 and append duplicate steps (train/preflight.py).
    fresh_run: bool = False
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
