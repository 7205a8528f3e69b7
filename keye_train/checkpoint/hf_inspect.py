"""Inspecting a Hugging Face dir (Keye-VL, Qwen3 or SigLIP): kind, size, dtypes, layout disagreements."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from keye_train.checkpoint.hf import (
    KEYE_ARCH,
    KIND_KEYE,
    KIND_PREVIEW,
    KIND_QWEN3,
    KIND_SIGLIP,
    TEXT_TOWER_DIR,
    compare_layout,
    detect_kind,
    expected_keye_layout,
    expected_text_tower_layout,
    keye_config_from_hf,
    language_config_from_qwen3,
    meta_state_shapes,
    read_config,
    text_tower_config_from_siglip,
    vision_config_from_siglip,
)
from keye_train.checkpoint.safetensors_io import read_layout


@dataclass
class InspectReport:
    """What `inspect_checkpoint` found; `ok` is False when keys disagree with the layout."""

    directory: Path
    kind: str
    num_parameters: int
    dtypes: dict[str, int]
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parts: list[InspectReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        clean = not (self.missing or self.unexpected or self.mismatched) and self.kind != "unknown"
        return clean and all(part.ok for part in self.parts)

    def lines(self) -> list[str]:
        dtypes = ", ".join(f"{name} ({count} tensors)" for name, count in sorted(self.dtypes.items()))
        out = [
            f"{self.directory}: {self.kind}",
            f"  parameters: {self.num_parameters:,}",
            f"  dtypes: {dtypes}",
        ]
        out += [f"  note: {note}" for note in self.notes]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            out.append(f"  {label} keys: {len(items)}")
            out += [f"    {item}" for item in items]
        out.append(f"  shape-mismatched keys: {len(self.mismatched)}")
        out += [f"    {item}" for item in self.mismatched]
        for part in self.parts:
            out += part.lines()
        return out


def inspect_checkpoint(directory: str | Path) -> InspectReport:
    """Kind, parameter count, dtypes and layout disagreements of a HF dir (Keye-VL, Qwen3 or SigLIP)."""
    directory = Path(directory)
    config = read_config(directory)
    layout = read_layout(directory)
    kind = detect_kind({k: v.shape for k, v in layout.items()}, config)
    report = InspectReport(
        directory=directory,
        kind=kind,
        num_parameters=sum(info.numel for info in layout.values()),
        dtypes=dict(Counter(info.dtype for info in layout.values())),
    )
    if kind == KIND_SIGLIP:
        from keye_train.models.vision import VisionTower

        vision = vision_config_from_siglip(config)
        expected = {k: v for k, v in meta_state_shapes(lambda: VisionTower(vision)).items()}
        expected.pop("vision_model.embeddings.packing_position_embedding.weight", None)  # init creates it
        if "text_config" in config:
            expected |= expected_text_tower_layout(text_tower_config_from_siglip(config))
        report.missing, report.unexpected, report.mismatched = compare_layout(layout, expected)
        report.notes.append("vision_model.* maps to visual.vision_model.*; text_model.* goes to siglip_text/")
        return report
    if kind == KIND_QWEN3:
        from keye_train.models.language import Qwen3Model

        language = language_config_from_qwen3(config)
        expected = {"model." + k: v for k, v in meta_state_shapes(lambda: Qwen3Model(language)).items()}
        if not config.get("tie_word_embeddings"):
            expected["lm_head.weight"] = (language.vocab_size, language.hidden_size)
        report.missing, report.unexpected, report.mismatched = compare_layout(layout, expected)
        report.notes.append("keys map to Keye unchanged")
        return report
    if kind not in (KIND_KEYE, KIND_PREVIEW):
        report.notes.append("keys match none of Keye-VL-1.5, Keye-VL-Preview, Qwen3, SigLIP")
        return report
    if kind != KIND_KEYE:
        report.notes.append(
            "Keye-VL-Preview: its projector pre_norm has the vision width, not 4x; not loadable"
        )
    # The layout is that of the config found; a Preview config is read as 1.5 to show where it differs.
    as_1_5 = {**config, "architectures": [KEYE_ARCH]}
    cfg = keye_config_from_hf(as_1_5, shapes={k: v.shape for k, v in layout.items()})
    report.missing, report.unexpected, report.mismatched = compare_layout(layout, expected_keye_layout(cfg))
    absent = [name for name, there in (("packing table", cfg.vision.num_packing_positions),
                                       ("pooling head", cfg.vision.use_head)) if not there]  # fmt: skip
    if absent:
        report.notes.append(f"no {' / '.join(absent)} (unused by the VLM; as the transformers port writes)")
    tower_dir = directory / TEXT_TOWER_DIR
    if (tower_dir / "config.json").is_file():
        tower_cfg = text_tower_config_from_siglip(read_config(tower_dir))
        tower_layout = read_layout(tower_dir)
        part = InspectReport(
            directory=tower_dir,
            kind="siglip-text-tower",
            num_parameters=sum(info.numel for info in tower_layout.values()),
            dtypes=dict(Counter(info.dtype for info in tower_layout.values())),
        )
        part.missing, part.unexpected, part.mismatched = compare_layout(
            tower_layout, expected_text_tower_layout(tower_cfg)
        )
        report.parts.append(part)
    return report
