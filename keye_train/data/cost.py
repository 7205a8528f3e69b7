"""Per-sample cost model: ViT cost per image/frame and LLM cost per packed sample, in seconds-like units."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class CostModel:
    """cost = ViT sum over frames (a*p + b*p^2) + LLM (c*t + d*t^2), p patches per frame, t tokens.

    The quadratic terms are attention: a frame attends only within itself (NaViT segments), a packed
    sample only within itself (document masking). Defaults are FLOP-proportional for the 8B model
    (linear term ~ 2 * params per token, quadratic ~ 4 * layers * hidden per token pair) so that the
    planner is sensible before `keye-data calibrate` fits measured coefficients.
    """

    vit_linear: float = 2 * 0.4e9  # ~2 x ViT parameters per patch
    vit_quadratic: float = 4 * 27 * 1152  # attention score + value FLOPs per patch pair
    llm_linear: float = 2 * 8.2e9  # ~2 x LLM parameters per token
    llm_quadratic: float = 4 * 36 * 4096 / 2  # causal: half the pairs
    scale: float = 1e-12  # keeps numbers readable (about TFLOP)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"cost.{name}={value} must be >= 0")

    def vit_cost(self, frame_patches: Sequence[int]) -> float:
        return self.scale * sum(self.vit_linear * p + self.vit_quadratic * p * p for p in frame_patches)

    def llm_cost(self, tokens: int) -> float:
        return self.scale * (self.llm_linear * tokens + self.llm_quadratic * tokens * tokens)

    def sample_cost(self, *, tokens: int, frame_patches: Sequence[int] = ()) -> float:
        return self.vit_cost(frame_patches) + self.llm_cost(tokens)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown cost coefficients {sorted(unknown)}")
        return cls(**data)
