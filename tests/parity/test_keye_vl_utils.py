"""Parity of image/video preprocessing with the released keye-vl-utils 1.5.2 (the inference reference)."""

from __future__ import annotations

import importlib
import sys
import types
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import torch

from keye_train.data.media import slowfast
from keye_train.data.media.image import ImageConfig, preprocess_image, smart_resize
from keye_train.data.media.video import FrameList, VideoConfig, preprocess_video

av = pytest.importorskip("av")
cv2 = pytest.importorskip("cv2")  # keye-vl-utils imports it at module level
pytest.importorskip("einops")  # keye-vl-utils' get_frame_sim uses it


class StandInCalled(AssertionError):
    """Raised when keye-vl-utils touches the torchvision stand-in: the comparison would be void."""


TOUCHED: list[str] = []


class _Tripwire:
    """Any use (attribute, call, iteration) of a torchvision object fails the test."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _fail(self, what: str):
        TOUCHED.append(f"{self._name}{what}")
        raise StandInCalled(f"keye-vl-utils used the torchvision stand-in: {self._name}{what}")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._fail(f".{attr}")

    def __call__(self, *args, **kwargs):
        self._fail("(...)")

    def __iter__(self):
        self._fail(" iterated")


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        TOUCHED.append(f"{self.__name__}.{attr}")
        raise StandInCalled(f"keye-vl-utils used the torchvision stand-in: {self.__name__}.{attr}")


def _import_reference():
    """Import keye_vl_utils.vision_process with stand-ins for torchvision (and requests if absent).

    The stand-ins are removed from sys.modules right after the import, so other tests (and libraries
    probing for torchvision) never see them; the reference keeps its own references to them.
    """
    tv = _StandInModule("torchvision")
    tv_io = _StandInModule("torchvision.io")
    tv_transforms = _StandInModule("torchvision.transforms")
    tv_transforms.InterpolationMode = _Tripwire("torchvision.transforms.InterpolationMode")
    tv.io, tv.transforms = tv_io, tv_transforms
    stand_ins = {"torchvision": tv, "torchvision.io": tv_io, "torchvision.transforms": tv_transforms}
    try:
        importlib.import_module("requests")
    except ImportError:  # only used for http URLs, which these tests never pass
        stand_ins["requests"] = _StandInModule("requests")
    saved = {
        name: sys.modules.get(name) for name in [*stand_ins, "keye_vl_utils", "keye_vl_utils.vision_process"]
    }
    try:
        sys.modules.update(stand_ins)
        sys.modules.pop("keye_vl_utils", None)
        sys.modules.pop("keye_vl_utils.vision_process", None)
        module = importlib.import_module("keye_vl_utils.vision_process")
    except ImportError as exc:
        pytest.skip(f"keye-vl-utils 1.5.2 is not importable: {exc}")
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    assert module.torchvision is tv, "keye_vl_utils bound a real torchvision; the stand-in check is void"
    return module


@pytest.fixture(scope="module")
def ref():
    module = _import_reference()
    TOUCHED.clear()
    yield module
    assert not TOUCHED, f"keye-vl-utils used torchvision: {TOUCHED}"


def test_torchvision_stand_in_fails_loudly(ref):
    """The guard itself: any use of the stand-in raises (and is recorded), and no real one is left behind."""
    for use in (
        lambda: ref.torchvision.io.read_video("x.mp4"),
        lambda: ref.transforms.Resize(10),
        lambda: ref.InterpolationMode.BICUBIC,
        lambda: ref.io.read_image("x.png"),
    ):
        with pytest.raises(StandInCalled):
            use()
    assert len(TOUCHED) == 4
    TOUCHED.clear()
    assert "torchvision" not in sys.modules or not isinstance(sys.modules["torchvision"], _StandInModule)


# ---------------------------------------------------------------------------------------------- images

IMAGE_SIZES = [
    (1, 1), (1, 200), (200, 1), (1, 201), (3, 5), (27, 29), (28, 28), (42, 70), (56, 57), (13, 2600),
    (100, 100), (224, 224), (333, 500), (480, 640), (719, 1281), (1080, 1920), (2160, 3840), (5000, 3333),
    (4321, 7777), (8000, 8000), (12000, 60), (60, 11999), (3, 599), (14, 2799),
]  # fmt: skip


def _ref_resize(ref, h, w, **kwargs):
    try:
        return ref.smart_resize(h, w, **kwargs)
    except ValueError:
        return "error"


def _ours_resize(h, w, **kwargs):
    try:
        return smart_resize(h, w, **kwargs)
    except ValueError:
        return "error"


@pytest.mark.parametrize(
    "min_pixels,max_pixels",
    [(4 * 784, 20480 * 784), (48 * 784, 768 * 784), (48 * 784, 256 * 784), (130 * 784, 1280 * 784)],
)
def test_smart_resize_matches(ref, min_pixels, max_pixels):
    rng = np.random.default_rng(0)
    sizes = IMAGE_SIZES + [tuple(int(v) for v in rng.integers(1, 6000, 2)) for _ in range(400)]
    sizes += [(int(h), int(h * r)) for h, r in zip(rng.integers(2, 400, 100), rng.uniform(0.02, 60, 100))]
    kwargs = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    mismatches = [
        (h, w, _ref_resize(ref, h, w, **kwargs), _ours_resize(h, w, **kwargs))
        for h, w in sizes
        if h > 0 and w > 0 and _ref_resize(ref, h, w, **kwargs) != _ours_resize(h, w, **kwargs)
    ]
    assert not mismatches, mismatches[:10]


@pytest.mark.parametrize(
    "size_hw", [(1, 1), (27, 29), (70, 42), (333, 500), (123, 2300), (1500, 1100), (40, 7000)]
)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_preprocess_image_pixels_match_fetch_image(ref, size_hw, mode):
    h, w = size_hw
    rng = np.random.default_rng(h * 7 + w)
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    cfg = ImageConfig(max_tokens=1200)  # keeps the 7000-pixel-wide case small
    patches, (gh, gw) = preprocess_image(image, cfg)
    expected = ref.fetch_image({"image": image, "max_pixels": cfg.max_pixels, "min_pixels": cfg.min_pixels})
    assert (gh * 14, gw * 14) == (expected.height, expected.width)
    # the processor's rescale and normalise, written out independently of our code
    want = (np.asarray(expected, dtype=np.float64) / 255 - 0.5) / 0.5
    got = patches.reshape(gh, gw, 3, 14, 14).permute(0, 3, 1, 4, 2).reshape(gh * 14, gw * 14, 3)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- similarity


def test_hsv_matches_opencv_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(1)
    colors = rng.integers(0, 256, (512, 1024, 3), dtype=np.uint8)
    grid = np.stack(np.meshgrid(np.arange(0, 256, 5), np.arange(0, 256, 5), indexing="ij"), -1)
    # every max/min/tie pattern of a few levels, including pure greys and saturated edges
    levels = np.array([0, 1, 2, 127, 128, 254, 255])
    combos = np.array(np.meshgrid(levels, levels, levels)).reshape(3, -1).T.astype(np.uint8)
    monkeypatch.setattr(slowfast, "cv2", None)  # force the numpy implementation
    for rgb in (colors, np.concatenate([grid, grid[..., :1]], -1).astype(np.uint8), combos[None]):
        np.testing.assert_array_equal(slowfast.rgb_to_hsv_u8(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))


def test_frame_similarity_matches_get_frame_sim(ref):
    cfg = VideoConfig()
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (3, 112, 168), dtype=np.uint8)
    cases = []
    for noise in (0, 3, 10, 40, 120, 255):
        other = np.clip(base.astype(int) + rng.integers(-noise, noise + 1, base.shape), 0, 255).astype(
            np.uint8
        )
        cases.append((base, other))
    black = np.zeros_like(base)
    half = black.copy()
    half[:, :56] = base[:, :56]
    cases += [(black, half), (half, black), (base, base[:, ::-1, ::-1].copy()), (half, half)]
    for a, b in cases:
        ours = slowfast.patch_similarity(
            slowfast.unit_patches(torch.from_numpy(a), patch=28, eps=1e-8),
            slowfast.unit_patches(torch.from_numpy(b), patch=28, eps=1e-8),
            cfg,
        )
        theirs = ref.get_frame_sim(torch.from_numpy(a).float(), torch.from_numpy(b).float())
        assert ours == theirs


# --------------------------------------------------------------------------------------------- videos


# Dark, grey and saturated colours: HSV patch cosines only drop below 0.7 between such kinds, so cuts
# between pictures of these blocks are seen as new scenes, while compression noise is not.
PALETTE = np.array(
    [
        [0, 0, 0],
        [255, 255, 255],
        [128, 128, 128],
        [230, 20, 20],
        [20, 200, 40],
        [30, 40, 220],
        [240, 220, 30],
    ],
    dtype=np.uint8,
)


def _blocks(rng, h, w, n_blocks=(4, 6)):
    small = PALETTE[rng.integers(0, len(PALETTE), n_blocks)]
    big = np.kron(small, np.ones((-(-h // n_blocks[0]), -(-w // n_blocks[1]), 1), dtype=np.uint8))
    return np.ascontiguousarray(big[:h, :w])


def make_frames(script: list[tuple[str, int]], h: int, w: int, seed: int) -> list[np.ndarray]:
    """Frames from (kind, count) segments: 'static' repeats one picture, 'cut' starts a new one, 'pan'
    slides the picture, 'noise' draws fresh noise each frame. Big colour blocks survive compression."""
    rng = np.random.default_rng(seed)
    frames, picture = [], _blocks(rng, h, w)
    for kind, count in script:
        if kind == "cut":
            picture = _blocks(rng, h, w)
        for i in range(count):
            if kind == "pan":
                picture = np.roll(picture, max(1, w // 12), axis=1)
            frames.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if kind == "noise" else picture)
            del i
    return frames


def write_mp4(path, frames: list[np.ndarray], fps) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(
            "libx264" if "libx264" in av.codecs_available else "mpeg4",
            rate=Fraction(fps).limit_denominator(1000),
        )
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


SCRIPT_A = [("static", 12), ("cut", 10), ("pan", 8), ("cut", 14), ("noise", 4), ("cut", 12)]
VIDEOS = {
    # name: (script, height, width, fps)
    "cuts_small": (SCRIPT_A, 64, 96, 10),
    "cuts_tall": (SCRIPT_A, 160, 90, 8),
    "cuts_hd": (SCRIPT_A, 360, 640, 10),  # 299 tokens: above the 256-token similarity size, budget binds
    "static_only": ([("static", 25)], 72, 128, 25),
    "noise_30fps": ([("noise", 20), ("static", 20)], 56, 84, 30),
    "pan_wide": ([("pan", 24), ("cut", 12), ("static", 12)], 90, 320, 12),
    "three_frames_2fps": ([("static", 3)], 48, 64, 2),
    "odd_fps": ([("static", 20), ("cut", 20), ("pan", 10)], 120, 160, 7.5),
}
CONFIGS = {
    # name: (our config, the same settings as keye-vl-utils element keys)
    "released": (VideoConfig(), {}),
    "tight_budget": (VideoConfig(video_max_tokens=900), {"video_total_pixels": 900 * 784}),
    "paper_threshold": (VideoConfig(min_frame_similarity=0.95), {"min_frame_similarity": 0.95}),
    "capped_frames": (VideoConfig(max_frames=7, fps=4.0), {"max_frames": 7, "fps": 4.0}),
    "big_frames": (
        VideoConfig(min_tokens_per_frame=64, max_tokens_per_frame=1000, video_max_tokens=1500),
        {"min_pixels": 64 * 784, "max_pixels": 1000 * 784, "video_total_pixels": 1500 * 784},
    ),
}


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_videos")
    files = {}
    for seed, (name, (script, h, w, fps)) in enumerate(VIDEOS.items()):
        files[name] = root / f"{name}.mp4"
        write_mp4(files[name], make_frames(script, h, w, seed), fps)
    return files


def _reference_plan(ref, ele: dict) -> dict:
    frames, kwargs = ref.fetch_video(ele)
    types = kwargs["frame_types"].tolist()
    slow_hw, fast_hw = (kwargs["height"], kwargs["width"]), (kwargs["fast_height"], kwargs["fast_width"])
    return {
        "n": frames.shape[0],
        "timestamps": kwargs["timestamps"].tolist() if "timestamps" in kwargs else None,
        "is_fast": [t == 1 for t in types],
        "slow_hw": slow_hw,
        "fast_hw": fast_hw,
        "tokens": sum(
            (fast_hw if t == 1 else slow_hw)[0] * (fast_hw if t == 1 else slow_hw)[1] // 784 for t in types
        ),
    }


def _our_plan(result) -> dict:
    return {
        "n": len(result.frames),
        "timestamps": [f.timestamp for f in result.frames],
        "is_fast": [f.is_fast for f in result.frames],
        "slow_hw": result.slow_hw,
        "fast_hw": result.fast_hw,
        "tokens": sum(f.num_tokens for f in result.frames),
    }


def _reference_indices(ref, path, ele: dict) -> list[int]:
    """Frame indices as keye-vl-utils' decord reader picks them (its own functions, in its own order)."""
    import decord

    reader = decord.VideoReader(str(path))
    count = ref.smart_nframes(ele, total_frames=len(reader), video_fps=reader.get_avg_fps())
    return torch.linspace(0, len(reader) - 1, count).round().long().tolist()


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("video_name", list(VIDEOS))
def test_video_plan_matches_fetch_video(ref, video_files, video_name, config_name):
    pytest.importorskip("decord")  # the reference reads files with decord
    cfg, ele = CONFIGS[config_name]
    path = video_files[video_name]
    expected = _reference_plan(ref, {"video": str(path), **ele})
    result = preprocess_video(str(path), cfg)
    assert _our_plan(result) == expected
    assert [f.index for f in result.frames] == _reference_indices(ref, path, ele)
    if config_name == "released" and video_name.startswith("cuts"):
        assert any(expected["is_fast"]) and not all(expected["is_fast"][1:]), "need slow and fast frames"
    if config_name in ("tight_budget", "big_frames") and video_name == "cuts_hd":
        assert expected["slow_hw"][0] * expected["slow_hw"][1] < 360 * 640, "the budget must bind here"


def test_video_from_bytes_and_decord_backend_match(ref, video_files):
    pytest.importorskip("decord")
    data = video_files["cuts_small"].read_bytes()
    expected = _reference_plan(ref, {"video": data})
    assert _our_plan(preprocess_video(data, VideoConfig())) == expected
    assert _our_plan(preprocess_video(data, VideoConfig(decoder="decord"))) == expected


@pytest.mark.parametrize("fps", [1, 2.0, 3.0, 0.5])
@pytest.mark.parametrize("config_name", ["released", "tight_budget", "capped_frames"])
def test_image_list_video_matches_fetch_video(ref, fps, config_name):
    cfg, ele = CONFIGS[config_name]
    ele = {k: v for k, v in ele.items() if k != "fps"}  # for a list, keye-vl-utils' fps is the list's rate
    script = [("static", 5), ("cut", 4), ("pan", 3), ("cut", 3), ("static", 3)]
    images = [PIL.Image.fromarray(f) for f in make_frames(script, 150, 230, seed=int(fps * 10))]
    expected = _reference_plan(ref, {"video": images, "fps": fps, **ele})
    result = preprocess_video(FrameList(images, fps=fps), cfg)
    assert _our_plan(result) == expected
    assert any(expected["is_fast"]) and not all(expected["is_fast"][1:])


def test_token_budget_search_matches_over_many_type_mixes(ref, monkeypatch):
    """Only the budget search and the sizes: the reference is handed the frame types directly."""
    rng = np.random.default_rng(3)
    image = PIL.Image.fromarray(rng.integers(0, 256, (224, 364, 3), dtype=np.uint8))  # 8x13 = 104 tokens
    # (frames, fast frames, budget): all fit; slow-only cap 84; 1 slow + 11 fast; cap 97; nothing fits
    # (the minimum wins); cap 89
    cases = [(1, 0, 65536), (12, 0, 1000), (12, 11, 1000), (40, 30, 2400), (30, 10, 700), (24, 8, 1800)]
    for n_frames, n_fast, budget in cases:
        types = torch.zeros(n_frames, dtype=torch.int32)
        types[1 + torch.randperm(n_frames - 1, generator=torch.Generator().manual_seed(n_fast))[:n_fast]] = 1
        monkeypatch.setattr(ref, "extract_slow_fast_frames", lambda frames, threshold, t=types: t)
        frames, kwargs = ref.fetch_video(
            {"video": [image] * n_frames, "fps": 1.0, "video_total_pixels": budget * 784}
        )
        cfg = VideoConfig(video_max_tokens=budget)
        native_hw = tuple(frames.shape[-2:])
        sizes = slowfast.frame_sizes(*native_hw, is_fast=[bool(t) for t in types], cfg=cfg)
        assert sizes.slow_hw == (kwargs["height"], kwargs["width"]), (n_frames, n_fast, budget)
        assert sizes.fast_hw == (kwargs["fast_height"], kwargs["fast_width"]), (n_frames, n_fast, budget)
