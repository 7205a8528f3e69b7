"""Image preprocessing: config validation, smart resize edge cases, raster patch order, bad input."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

from keye_train.data.media.image import ImageConfig, open_image, preprocess_image, smart_resize

TOKEN = 28 * 28


def _normalised(pixels_hwc: np.ndarray) -> np.ndarray:
    return (pixels_hwc.astype(np.float64) / 255 - 0.5) / 0.5


def _unpatchify(patches: torch.Tensor, grid_hw: tuple[int, int]) -> np.ndarray:
    """Rebuild the (H, W, 3) picture assuming raster order, one explicit patch at a time."""
    gh, gw = grid_hw
    out = np.zeros((gh * 14, gw * 14, 3), dtype=np.float32)
    for k in range(gh * gw):
        row, col = divmod(k, gw)
        out[row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] = patches[k].permute(1, 2, 0).numpy()
    return out


# ------------------------------------------------------------------------------------------- config


def test_image_config_defaults():
    cfg = ImageConfig()
    assert (cfg.min_tokens, cfg.max_tokens, cfg.patch_size, cfg.merge_size) == (4, 20480, 14, 2)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5) and cfg.max_aspect_ratio == 200
    assert (cfg.factor, cfg.min_pixels, cfg.max_pixels) == (28, 3136, 16056320)


@pytest.mark.parametrize(
    "field,value",
    [
        ("min_tokens", 0),
        ("max_tokens", 3),
        ("patch_size", 0),
        ("merge_size", 0),
        ("mean", (0.5, 0.5)),
        ("std", (0.5, 0.0, 0.5)),
        ("max_aspect_ratio", 0.5),
    ],
)
def test_image_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ImageConfig(**{field: value})


# -------------------------------------------------------------------------------------- smart resize


@pytest.mark.parametrize(
    "size,expected",
    [
        ((56, 280), (56, 280)),  # already multiples: unchanged
        ((42, 280), (56, 280)),  # 1.5 -> 2 (round half to even)
        ((70, 280), (56, 280)),  # 2.5 -> 2, not 3: Python rounding
        ((98, 280), (112, 280)),  # 3.5 -> 4
        ((41, 280), (28, 280)),  # 1.46 -> 1
    ],
)
def test_smart_resize_rounds_like_python(size, expected):
    assert smart_resize(*size, min_pixels=0, max_pixels=10**8) == expected


def test_smart_resize_floors_down_to_max_pixels():
    # sqrt(2e6 / 78400) = 5.0508: 1000 -> 197.99 -> 7 tokens, 2000 -> 395.98 -> 14 tokens
    assert smart_resize(1000, 2000, min_pixels=0, max_pixels=100 * TOKEN) == (196, 392)


def test_smart_resize_ceils_up_to_min_pixels():
    # sides clamp to 28 first (784 px < 3136), then scale sqrt(3136 / 200) = 3.96: 39.6 -> 56, 79.2 -> 84
    assert smart_resize(10, 20, min_pixels=4 * TOKEN, max_pixels=10**8) == (56, 84)
    assert smart_resize(1, 1, min_pixels=4 * TOKEN, max_pixels=10**8) == (56, 56)


def test_smart_resize_aspect_limit():
    assert smart_resize(1, 200, min_pixels=4 * TOKEN, max_pixels=10**8) == (28, 196)
    with pytest.raises(ValueError, match="1x201"):
        smart_resize(1, 201, min_pixels=4 * TOKEN, max_pixels=10**8)
    with pytest.raises(ValueError, match="3000x10"):
        smart_resize(3000, 10, min_pixels=0, max_pixels=10**8, max_aspect_ratio=100)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 10)])
def test_smart_resize_rejects_empty_sizes(size):
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        smart_resize(*size, min_pixels=0, max_pixels=10**8)


def test_smart_resize_invariants_on_random_sizes():
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 5000, (500, 2)):
        if max(h, w) / min(h, w) > 40:
            continue
        out_h, out_w = smart_resize(int(h), int(w), min_pixels=4 * TOKEN, max_pixels=1000 * TOKEN)
        assert out_h % 28 == 0 and out_w % 28 == 0
        assert 4 * TOKEN <= out_h * out_w <= 1000 * TOKEN
        # aspect ratio kept within one token of rounding on each side
        assert abs(out_h / out_w - h / w) <= (h / w) * (28 / out_h + 28 / out_w) * 1.01


# ------------------------------------------------------------------------------------------ patches


def test_patches_are_raster_order_without_resize():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)  # 2x3 tokens, 4x6 patches: no resize
    patches, grid = preprocess_image(PIL.Image.fromarray(pixels), ImageConfig())
    assert grid == (4, 6) and patches.shape == (24, 3, 14, 14) and patches.dtype == torch.float32
    np.testing.assert_allclose(_unpatchify(patches, grid), _normalised(pixels), atol=1e-6, rtol=0)
    # patch 1 is right of patch 0 (not below it): raster order, not the 2x2-merge-grouped order
    np.testing.assert_allclose(
        patches[1].permute(1, 2, 0).numpy(), _normalised(pixels[:14, 14:28]), atol=1e-6
    )


def test_patches_follow_bicubic_resize():
    rng = np.random.default_rng(2)
    image = PIL.Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    patches, grid = preprocess_image(image, ImageConfig())
    # 100/28 = 3.57 -> 4 tokens = 112 px, 150/28 = 5.36 -> 5 tokens = 140 px
    assert grid == (8, 10) and patches.shape[0] == 80
    expected = np.asarray(image.resize((140, 112), PIL.Image.Resampling.BICUBIC))
    np.testing.assert_allclose(_unpatchify(patches, grid), _normalised(expected), atol=1e-6, rtol=0)


def test_grid_is_even_and_within_token_limits():
    cfg = ImageConfig(min_tokens=16, max_tokens=64)
    for size in [(1, 1), (10, 300), (300, 10), (1000, 1000), (57, 57), (2000, 33)]:
        patches, (gh, gw) = preprocess_image(PIL.Image.new("RGB", size, (10, 200, 30)), cfg)
        assert gh % 2 == 0 and gw % 2 == 0 and patches.shape[0] == gh * gw
        assert 16 <= gh * gw // 4 <= 64


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "1", "I;16", "LA"])
def test_other_modes_become_rgb(mode):
    image = PIL.Image.new("RGB", (60, 40), (200, 100, 50)).convert(mode)
    patches, grid = preprocess_image(image, ImageConfig())
    assert patches.shape == (grid[0] * grid[1], 3, 14, 14)
    assert float(patches.min()) >= -1 and float(patches.max()) <= 1


def test_rgba_alpha_is_dropped_not_composited():
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    patches, _ = preprocess_image(PIL.Image.fromarray(rgba, "RGBA"), ImageConfig())
    assert torch.all(patches[:, 0] == 1.0) and torch.all(patches[:, 1:] == -1.0)


# -------------------------------------------------------------------------------------------- errors


def test_zero_size_image_is_a_value_error():
    with pytest.raises(ValueError, match="empty"):
        preprocess_image(PIL.Image.new("RGB", (0, 10)), ImageConfig())


def test_extreme_aspect_ratio_is_a_value_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(PIL.Image.new("RGB", (5000, 10)), ImageConfig())


def test_truncated_image_is_a_value_error():
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    truncated = PIL.Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))  # lazy: decodes later
    with pytest.raises(ValueError, match="cannot decode"):
        preprocess_image(truncated, ImageConfig())
    with pytest.raises(ValueError, match="cannot decode"):
        open_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_open_image_errors_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="12 bytes"):
        open_image(b"not an image")
    with pytest.raises(ValueError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    path = tmp_path / "ok.png"
    PIL.Image.new("RGB", (5, 7)).save(path)
    assert open_image(path).size == (5, 7)


def test_non_image_input_is_a_value_error():
    with pytest.raises(ValueError, match="ndarray"):
        preprocess_image(np.zeros((28, 28, 3), dtype=np.uint8), ImageConfig())


# ------------------------------------------------------------------------------- no float64, vs HF


def test_normalise_has_no_float64_and_is_exact_for_every_byte():
    from torch.utils._python_dispatch import TorchDispatchMode

    from keye_train.data.media.image import normalize_patchify

    class Dtypes(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    self.seen.add(t.dtype)
            return out

    pixels = (torch.arange(3 * 28 * 14) % 256).to(torch.uint8).reshape(3, 28, 14)  # every byte value
    with Dtypes() as mode:
        patches, grid = normalize_patchify(pixels, patch_size=14, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))
    assert torch.float64 not in mode.seen and grid == (2, 1)
    # the reference processor's arithmetic: rescale in float64, cast, normalise in float32
    ref = (pixels.numpy().astype(np.float64) * (1 / 255)).astype(np.float32)
    ref = (ref - np.float32([0.5, 0.4, 0.3])[:, None, None]) / np.float32([0.5, 0.25, 0.2])[:, None, None]
    got = patches.permute(1, 0, 2, 3).reshape(3, 28, 14).numpy()
    np.testing.assert_array_equal(got, ref)


def test_pixels_equal_the_hf_qwen2_vl_processor():
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(5)
    image = PIL.Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    cfg = ImageConfig()
    patches, (gh, gw) = preprocess_image(image, cfg)
    proc = transformers.Qwen2VLImageProcessorPil(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    out = proc(images=[image], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, gh, gw]]
    # HF rows: 2x2 merge groups in raster order, features (C, temporal 2, p, p) with the frame repeated
    ours = patches.reshape(gh // 2, 2, gw // 2, 2, 3, 14, 14).permute(0, 2, 1, 3, 4, 5, 6)
    ours = ours.reshape(-1, 3, 1, 14, 14).expand(-1, 3, 2, 14, 14).reshape(gh * gw, -1)
    np.testing.assert_array_equal(ours.numpy(), out["pixel_values"])
