"""bench/gpu_check.py --smoke: the GPU check's own code on CPU with the tiny model, so it cannot rot."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--smoke", "--steps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    attention = {(r["backend"], r["dtype"]): r for r in result["attention"]}
    assert set(attention) == {(b, d) for b in gpu_check.ATTENTION_BACKENDS for d in ("float32", "bfloat16")}
    for dtype in ("float32", "bfloat16"):
        assert attention[("sdpa", dtype)]["ok"]
        flex = attention[("flex", dtype)]  # forward only on CPU, checked against SDPA
        assert flex["ok"] and not flex["backward"], flex
        for name in ("varlen", "flash"):  # CUDA kernels: reported as unavailable, with the reason
            assert "needs CUDA" in attention[(name, dtype)]["unavailable"]
    variants = {(r["compile"], r["ac"]): r for r in result["training"]}
    assert set(variants) == {(c, a) for c in (False, True) for a in ("none", "full")}
    for variant in variants.values():
        assert "error" not in variant, variant
        assert variant["tokens_per_s"] > 0 and 0 < variant["mfu"] < 1
        assert variant["losses"][-1] < variant["losses"][0]  # the AdamW step lowered the loss
    eager, compiled = variants[(False, "none")], variants[(True, "full")]
    assert compiled["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-4)  # same model, bf16
