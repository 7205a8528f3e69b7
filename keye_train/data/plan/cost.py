"""Per-sample cost model: ViT cost per image/frame and LLM cost per packed sample, in seconds-like units."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from keye_train.data.shards.index import IndexEntry


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


def predict_sample_cost(entry: IndexEntry, *, cost_model: CostModel, image_cfg: Any, video_cfg: Any) -> float:
    """Cost of an indexed sample from its predicted tokens and frame patches (nothing is decoded)."""
    from keye_train.data.shards.index import predict_tokens

    tokens, patches = predict_tokens(entry, image_cfg=image_cfg, video_cfg=video_cfg)
    return cost_model.sample_cost(tokens=tokens, frame_patches=patches)


COST_PARTS = ("vit", "llm")


@dataclass(frozen=True)
class Measurement:
    """One timed pass: `count` items (ViT: frames of `size` patches each, packed; LLM: samples of `size`
    tokens) took `seconds` (forward + backward)."""

    part: str
    size: int
    seconds: float
    count: int = 1

    def __post_init__(self) -> None:
        if self.part not in COST_PARTS:
            raise ValueError(f"measurement part={self.part!r} must be one of {COST_PARTS}")
        if self.size < 1 or self.count < 1 or not self.seconds >= 0:
            raise ValueError(f"measurement {self}: size and count must be >= 1 and seconds >= 0")


def _nonnegative_lstsq(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with all coefficients >= 0 (CostModel refuses negative ones). Columns are scaled to
    unit norm first (p and p^2 differ by orders of magnitude); a coefficient that comes out negative is
    fixed at 0 and the rest refitted, which is exact active-set NNLS for the two or three terms here."""
    norms = np.linalg.norm(columns, axis=0)
    norms[norms == 0] = 1.0
    scaled = columns / norms
    active = list(range(columns.shape[1]))
    coef = np.zeros(columns.shape[1])
    while active:
        sol = np.linalg.lstsq(scaled[:, active], y, rcond=None)[0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef / norms


def fit_part(measurements: Sequence[Measurement], *, intercept: bool = True) -> tuple[float, float, float]:
    """(linear, quadratic, per-pass overhead) of one part: seconds = count*(a*s + b*s^2) + c.

    The overhead c absorbs fixed per-call costs (launches, Python) that would otherwise bias a; it is
    not part of CostModel because a planned microbatch pays it once whatever its samples.
    """
    if len({m.size for m in measurements}) < 2:
        raise ValueError(
            f"fitting needs measurements at >= 2 sizes, got {sorted({m.size for m in measurements})}"
        )
    s = np.array([m.size for m in measurements], dtype=np.float64)
    n = np.array([m.count for m in measurements], dtype=np.float64)
    cols = [n * s, n * s * s] + ([np.ones_like(s)] if intercept else [])
    coef = _nonnegative_lstsq(np.stack(cols, axis=1), np.array([m.seconds for m in measurements]))
    return float(coef[0]), float(coef[1]), float(coef[2]) if intercept else 0.0


def fit_cost_model(measurements: Sequence[Measurement], *, intercept: bool = True) -> CostModel:
    """CostModel (in seconds, scale 1) fitted by least squares to ViT and LLM measurements."""
    by_part = {p: [m for m in measurements if m.part == p] for p in COST_PARTS}
    missing = [p for p, ms in by_part.items() if not ms]
    if missing:
        raise ValueError(f"no measurements for {missing}; time both the ViT and the LLM")
    vit = fit_part(by_part["vit"], intercept=intercept)
    llm = fit_part(by_part["llm"], intercept=intercept)
    return CostModel(
        vit_linear=vit[0], vit_quadratic=vit[1], llm_linear=llm[0], llm_quadratic=llm[1], scale=1.0
    )


def fit_residuals(
    model: CostModel, measurements: Sequence[Measurement], *, overhead: Mapping[str, float] | None = None
) -> list[dict]:
    """Per measurement: measured and predicted seconds (plus the part's per-pass overhead) and residual."""
    rows = []
    for m in measurements:
        one = model.vit_cost([m.size]) if m.part == "vit" else model.llm_cost(m.size)
        predicted = m.count * one + (overhead or {}).get(m.part, 0.0)
        rows.append(
            {"part": m.part, "size": m.size, "count": m.count, "seconds": m.seconds, "predicted": predicted}
            | {"residual": m.seconds - predicted}
        )
    return rows
