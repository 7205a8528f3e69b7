"""Cost fit recovers known coefficients; indexed cost predictions equal real encoded samples' costs."""

import json

import numpy as np
import pytest

from keye_train.cli import data as data_cli
from keye_train.cli import data_index
from keye_train.data.loader.encode import SampleEncoder
from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig
from keye_train.data.plan.cost import CostModel, Measurement, fit_cost_model, fit_part, predict_sample_cost
from keye_train.data.shards import index as idx
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer

TRUE = {"vit": (3e-6, 2e-9, 0.004), "llm": (5e-5, 4e-9, 0.02)}  # linear, quadratic, per-pass overhead
SIZES = {"vit": [16, 64, 256, 1024, 4096], "llm": [128, 512, 2048, 8192]}


def synthetic_measurements(*, noise: float, seed: int = 0) -> list[Measurement]:
    """Timings generated from TRUE (two pass sizes per item size, as calibrate times them), with
    multiplicative noise."""
    rng = np.random.default_rng(seed)
    out = []
    for part, sizes in SIZES.items():
        a, b, c = TRUE[part]
        for size in sizes:
            for count in data_index._counts(max(sizes), size):
                seconds = (count * (a * size + b * size * size) + c) * (1 + noise * rng.standard_normal())
                out.append(Measurement(part=part, size=size, seconds=seconds, count=count))
    return out


def test_fit_recovers_known_coefficients_exactly_without_noise():
    model = fit_cost_model(synthetic_measurements(noise=0.0))
    assert model.scale == 1.0
    got = (model.vit_linear, model.vit_quadratic, model.llm_linear, model.llm_quadratic)
    want = (*TRUE["vit"][:2], *TRUE["llm"][:2])
    assert got == pytest.approx(want, rel=1e-6)
    assert fit_part([m for m in synthetic_measurements(noise=0.0) if m.part == "vit"])[2] == pytest.approx(
        0.004
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_coefficients_within_tolerance_under_noise(seed):
    model = fit_cost_model(synthetic_measurements(noise=0.01, seed=seed))
    assert model.vit_linear == pytest.approx(TRUE["vit"][0], rel=0.15)
    assert model.vit_quadratic == pytest.approx(TRUE["vit"][1], rel=0.05)
    assert model.llm_linear == pytest.approx(TRUE["llm"][0], rel=0.05)
    assert model.llm_quadratic == pytest.approx(TRUE["llm"][1], rel=0.05)


def test_fit_never_returns_negative_coefficients():
    # pure linear data with noise: an unconstrained fit would often give a slightly negative quadratic
    rng = np.random.default_rng(3)
    ms = [
        Measurement(part=p, size=s, seconds=1e-4 * s * (1 + 0.05 * rng.standard_normal()))
        for p in ("vit", "llm")
        for s in (10, 20, 40, 80, 160)
    ]
    model = fit_cost_model(ms, intercept=False)  # CostModel itself refuses negative values
    assert model.vit_quadratic >= 0 and model.llm_quadratic >= 0
    assert model.vit_linear == pytest.approx(1e-4, rel=0.1)


def test_fit_refuses_underdetermined_input():
    with pytest.raises(ValueError, match=">= 2 sizes"):
        fit_cost_model([Measurement("vit", 16, 1.0), Measurement("llm", 8, 1.0), Measurement("llm", 16, 2.0)])
    with pytest.raises(ValueError, match=r"no measurements for \['llm'\]"):
        fit_cost_model([Measurement("vit", 16, 1.0), Measurement("vit", 32, 2.0)])
    with pytest.raises(ValueError, match="part"):
        Measurement("gpu", 16, 1.0)


def test_calibrate_cli_fits_saved_measurements(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([m.__dict__ for m in synthetic_measurements(noise=0.0)]))
    out = tmp_path / "recipes" / "cost_test.json"
    assert data_cli.main(["calibrate", "--measurements", str(path), "--out", str(out)]) == 0
    model = CostModel.load(out)
    assert model.llm_quadratic == pytest.approx(TRUE["llm"][1], rel=1e-6)
    report = json.loads(out.with_suffix(".fit.json").read_text())
    assert max(abs(r["residual"]) for r in report["residuals"]) < 1e-9
    assert "residual" in capsys.readouterr().err


def test_calibrate_cli_times_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "cost_tiny.json"
    args = ["calibrate", "--model", "tiny", "--out", str(out), "--vit-sides", "2,4", "--llm-lengths", "16,32"]
    assert data_cli.main([*args, "--repeats", "1", "--warmup", "0", "--device", "cpu"]) == 0
    model = CostModel.load(out)  # a loadable, valid (non-negative) cost model; timings are not asserted
    report = json.loads(out.with_suffix(".fit.json").read_text())
    assert {(m["part"], m["size"]) for m in report["measurements"]} == {
        ("vit", 4),
        ("vit", 16),
        ("llm", 16),
        ("llm", 32),
    }
    assert model.scale == 1.0


def test_predicted_cost_equals_the_cost_of_the_encoded_sample(tmp_path):
    synth_dataset(SynthConfig(out=tmp_path, samples=15, seed=11))
    cfg = load_manifest(tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer")
    model = CostModel()
    image_cfg, video_cfg = ImageConfig(), VideoConfig()
    encoder = SampleEncoder(tok, image_cfg=image_cfg, video_cfg=video_cfg)
    for source in cfg.sources:
        shard = source.shards[0]
        idx.build_index(shard, tokenizer=tok, kind=source.kind)
        for entry in idx.load_index(shard):
            sample = encoder.encode(idx.read_record(shard, entry, source=source))
            real = model.sample_cost(
                tokens=sample.num_tokens, frame_patches=[h * w for _, h, w in sample.grid_thw.tolist()]
            )
            predicted = predict_sample_cost(entry, cost_model=model, image_cfg=image_cfg, video_cfg=video_cfg)
            if source.kind == "video":  # token upper bound (fast markers); frame patches exact here
                assert real <= predicted <= 1.03 * real
            else:
                assert predicted == pytest.approx(real, rel=1e-12), entry.key


def test_the_vit_router_uses_the_calibrated_coefficients(tmp_path):
    from keye_train.distributed.vision_plan import VisualItem
    from keye_train.train.pipeline_step import calibrated_visual_cost

    path = tmp_path / "cost.json"
    CostModel(vit_linear=2.0, vit_quadratic=3.0, llm_linear=0.0, llm_quadratic=0.0, scale=1.0).save(path)
    cost = calibrated_visual_cost(str(path))
    # A 4x6 frame has 24 patches: 2 * 24 + 3 * 24**2.
    assert cost(VisualItem(grid_hw=(4, 6), consumers=(0,))) == 2 * 24 + 3 * 576
    assert calibrated_visual_cost(None) is None  # the router's own FLOP estimate
