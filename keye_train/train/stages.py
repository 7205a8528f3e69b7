"""Curriculum stages: which modules train, the loss, RoPE base resets, and the four paper presets."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from keye_train.models.configs import KeyeConfig, LanguageConfig

STAGE_NAMES = ("stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal", "custom")
TRAINABLE = ("vit", "projector", "llm", "text_tower")
LOSSES = ("lm", "siglip")
# Modules each loss sends gradients to; training anything else would only apply weight decay to it.
_LOSS_REACHES = {"siglip": {"vit", "text_tower"}, "lm": {"vit", "projector", "llm"}}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# KEYE_SPEC "Training recipe": what each named stage trains, with which loss, at which length.
_PRESETS: dict[str, dict[str, object]] = {
    # ViT continued pre-training from SigLIP with the sigmoid loss and the SigLIP text tower.
    "stage0_vit": {"train": ["vit", "text_tower"], "loss": "siglip", "rope_theta": None, "max_seq_len": 8192},
    # Cross-modal alignment: only the projector learns; ViT and LLM are frozen.
    "stage1_align": {"train": ["projector"], "loss": "lm", "rope_theta": None, "max_seq_len": 8192},
    # Multi-task pre-training, all parameters, 8K sequences.
    "stage2_multitask": {
        "train": ["vit", "projector", "llm"],
        "loss": "lm",
        "rope_theta": None,
        "max_seq_len": 8192,
    },
    # Annealing on high-quality data at up to 128K with the RoPE base raised 1e6 -> 8e6.
    "stage3_anneal": {
        "train": ["vit", "projector", "llm"],
        "loss": "lm",
        "rope_theta": 8e6,
        "max_seq_len": 131072,
    },
}
_CUSTOM_DEFAULTS: dict[str, object] = {"loss": "lm", "rope_theta": None, "max_seq_len": 8192}


@dataclass
class StageConfig:
    """One curriculum stage. Fields left None take the named stage's preset (KEYE_SPEC recipe), so
    `StageConfig(name="stage3_anneal")` is the paper's stage 3. A named stage fixes `train` and `loss`
    (use name=custom for anything else); rope_theta, max_seq_len and init_from stay free because the
    128K length and the 8e6 base are recipe options (KEYE_SPEC: rope base UNVERIFIED).
    """

    name: str = "custom"
    train: list[str] | None = None  # module groups that learn: vit, projector, llm, text_tower
    loss: str | None = None  # lm (next-token cross entropy) or siglip (sigmoid contrastive)
    rope_theta: float | None = None  # LLM RoPE base set when the stage starts; None keeps the model's
    max_seq_len: int | None = None  # packed sequence length (LLM tokens; ViT patches for siglip)
    init_from: str | None = None  # previous stage dir or a Hugging Face dir; weights only

    def __post_init__(self) -> None:
        _require(self.name in STAGE_NAMES, f"stage.name={self.name!r} must be one of {STAGE_NAMES}")
        preset = _PRESETS.get(self.name)
        _require(
            preset is not None or self.train is not None,
            f"stage.train is required for stage.name=custom; list modules from {TRAINABLE}",
        )
        for key, value in (preset or _CUSTOM_DEFAULTS).items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        self.train = list(self.train)
        unknown = [m for m in self.train if m not in TRAINABLE]
        _require(not unknown, f"stage.train={self.train} has unknown modules {unknown}; use {TRAINABLE}")
        _require(len(set(self.train)) == len(self.train), f"stage.train={self.train} lists a module twice")
        _require(bool(self.train), f"stage.train=[] trains nothing; list at least one of {TRAINABLE}")
        _require(self.loss in LOSSES, f"stage.loss={self.loss!r} must be one of {LOSSES}")
        unreachable = sorted(set(self.train) - _LOSS_REACHES[self.loss])
        _require(
            not unreachable,
            f"stage.train={self.train} with stage.loss={self.loss!r}: the loss gives no gradient to "
            f"{unreachable}",
        )
        _require(
            self.rope_theta is None or self.rope_theta > 0,
            f"stage.rope_theta={self.rope_theta} must be > 0 (or null to keep the model's)",
        )
        _require(self.max_seq_len >= 1, f"stage.max_seq_len={self.max_seq_len} must be >= 1")
        if preset is not None:
            _require(
                sorted(self.train) == sorted(preset["train"]) and self.loss == preset["loss"],
                f"stage.train={self.train} / stage.loss={self.loss!r} contradict stage.name={self.name!r}, "
                f"which trains {preset['train']} with loss {preset['loss']!r}; use stage.name=custom for a "
                f"different recipe",
            )


def stage_preset(name: str, **overrides: object) -> StageConfig:
    """The paper's stage `name` with its free fields (rope_theta, max_seq_len, init_from) overridden."""
    _require(name in _PRESETS, f"unknown stage preset {name!r}; choose one of {sorted(_PRESETS)}")
    return StageConfig(name=name, **overrides)


def _llm_modules(model: nn.Module) -> nn.ModuleDict:
    # Decoder and head together; a ModuleDict keeps the Hugging Face names (model.*, lm_head.*) for the
    # optimizer's view without re-parenting anything. Pipeline stages may lack either piece.
    parts = {name: getattr(model, name, None) for name in ("model", "lm_head")}
    return nn.ModuleDict({k: v for k, v in parts.items() if v is not None})


def module_groups(model: nn.Module, text_tower: nn.Module | None) -> dict[str, nn.Module]:
    """The composite model cut into the optimizer's module groups (missing pieces left out)."""
    groups: dict[str, nn.Module] = {}
    if getattr(model, "visual", None) is not None:
        groups["vit"] = model.visual
    if getattr(model, "mlp_AR", None) is not None:
        groups["projector"] = model.mlp_AR
    llm = _llm_modules(model)
    if len(llm):
        groups["llm"] = llm
    if text_tower is not None:
        groups["text_tower"] = text_tower
    return groups


def apply_stage(model: nn.Module, text_tower: nn.Module | None, cfg: StageConfig) -> dict[str, nn.Module]:
    """Start a stage: set requires_grad (True for trained module groups, False for everything else,
    text tower included), reset the RoPE base if the stage says so, and return the trained module groups
    for optim.build_optimizer. Idempotent, so a resumed stage calls it again before loading state.

    Works on the plain model and after FSDP2/TP (which keep the module tree and make each parameter a
    DTensor whose requires_grad can be set). Under pipeline parallelism call it on every model chunk.
    """
    if "text_tower" in cfg.train and text_tower is None:
        raise ValueError(f"stage {cfg.name!r} trains the text tower but no text tower was given")
    groups = module_groups(model, text_tower)
    for module in (model, text_tower):
        if module is not None:
            module.requires_grad_(False)  # anything outside the named groups stays frozen too
    trainable = {}
    for name, module in groups.items():
        if name in cfg.train:
            module.requires_grad_(True)
            trainable[name] = module
    if cfg.rope_theta is not None:
        reset_rope_theta(model, cfg.rope_theta)
    return trainable


def reset_rope_theta(model: nn.Module, theta: float) -> None:
    """Set the LLM's M-RoPE base. The decoder computes cos/sin from `model.model.cfg.rope_theta` on every
    forward (nothing is cached), so changing the config changes the next forward. The composite's
    KeyeConfig is updated too, so checkpoints and Hugging Face exports record the new base."""
    _require(theta > 0, f"rope_theta={theta} must be > 0")
    configs: dict[int, LanguageConfig] = {}
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, LanguageConfig):
            configs[id(cfg)] = cfg
        elif isinstance(cfg, KeyeConfig):
            configs[id(cfg.language)] = cfg.language
    if not configs:
        raise ValueError(
            f"{type(model).__name__} holds no language model config (LanguageConfig) whose rope_theta "
            f"could be reset"
        )
    # In place: the composite's KeyeConfig.language and the decoder's cfg are normally one object, and
    # any holder of the model's config (checkpoint writer, exporter) must see the same value.
    for cfg in configs.values():
        cfg.rope_theta = float(theta)
