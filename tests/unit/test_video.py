"""SlowFast video preprocessing: config, sampling, frame typing, budget, pixels, image lists, bad input."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import torch

from keye_train.data.media import slowfast
from keye_train.data.media.video import FrameList, VideoConfig, inspect_video, preprocess_video, resize_video

av = pytest.importorskip("av")

BLACK = np.zeros((3,), dtype=np.uint8)


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """Saturated colour blocks: far (in HSV cosine) from black, so black -> picture is a scene cut."""
    rng = np.random.default_rng(seed)
    palette = np.array([[230, 20, 20], [20, 200, 40], [30, 40, 220], [240, 220, 30]], dtype=np.uint8)
    small = palette[rng.integers(0, 4, (4, 4))]
    return np.kron(small, np.ones((-(-h // 4), -(-w // 4), 1), dtype=np.uint8))[:h, :w].copy()


def write_mp4(path, frames: list[np.ndarray], fps: float, *, fmt: str = "mp4", options=None) -> None:
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4")
        stream.rate = Fraction(fps).limit_denominator(1000)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    """30 frames at 10 fps, 112x168: 15 black frames, then 15 frames of one still picture."""
    path = tmp_path_factory.mktemp("videos") / "cut.mp4"
    black = np.zeros((112, 168, 3), dtype=np.uint8)
    write_mp4(path, [black] * 15 + [picture(112, 168, 0)] * 15, fps=10)
    return path


# ------------------------------------------------------------------------------------------- config


def test_video_config_defaults_are_the_released_values():
    cfg = VideoConfig()
    assert (cfg.fps, cfg.min_frame_similarity, cfg.patch_similarity_threshold) == (2.0, 0.9, 0.7)
    assert (cfg.video_max_tokens, cfg.fast_token_ratio) == (65536, 0.3)
    assert (cfg.min_tokens_per_frame, cfg.max_tokens_per_frame, cfg.similarity_max_tokens) == (48, 768, 256)
    assert cfg.frame_cap == 1365  # 65536 // 48
    assert VideoConfig(max_frames=10).frame_cap == 10
    paper = VideoConfig.paper()
    assert (paper.video_max_tokens, paper.min_frame_similarity) == (75000, 0.95)


@pytest.mark.parametrize(
    "field,value",
    [
        ("fps", 0),
        ("video_max_tokens", 10),
        ("min_tokens_per_frame", 0),
        ("max_tokens_per_frame", 47),
        ("fast_token_ratio", 1.5),
        ("min_frame_similarity", -0.1),
        ("patch_similarity_threshold", 2),
        ("similarity_patch_size", 5),
        ("similarity_max_tokens", 10),
        ("max_frames", 0),
        ("decoder", "opencv"),
        ("threads", -1),
        ("threads", 1.5),
        ("mean", (0.5,)),
        ("std", (1, 1, -1)),
        ("similarity_eps", 0),
    ],
)
def test_video_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        VideoConfig(**{field: value})


# ------------------------------------------------------------------------------------ sampling rules


def test_fps_sampling_indices_and_timestamps(cut_video):
    result = preprocess_video(str(cut_video), VideoConfig())
    # 3 s at 2 fps = 6 frames; linspace(0, 29, 6) = 0, 5.8, 11.6, 17.4, 23.2, 29
    assert [f.index for f in result.frames] == [0, 6, 12, 17, 23, 29]
    assert [f.timestamp for f in result.frames] == pytest.approx([0.0, 0.6, 1.2, 1.7, 2.3, 2.9], abs=1e-6)
    assert result.native_fps == 10 and result.total_frames == 30 and result.duration == pytest.approx(3.0)


def test_scene_cut_starts_a_slow_frame(cut_video):
    result = preprocess_video(str(cut_video), VideoConfig())
    # frames 0-14 black, 15-29 picture: sampled 0, 6, 12 black; 17 first picture frame
    assert [f.is_fast for f in result.frames] == [False, True, True, False, True, True]


def test_frame_cap_and_short_videos(tmp_path, cut_video):
    assert len(preprocess_video(str(cut_video), VideoConfig(max_frames=4)).frames) == 4
    assert len(preprocess_video(str(cut_video), VideoConfig(fps=100)).frames) == 30  # never above native
    short = tmp_path / "short.mp4"
    write_mp4(short, [picture(56, 56, 1)] * 3, fps=30)  # 0.1 s: floor(0.2) frames -> kept at 1
    result = preprocess_video(str(short), VideoConfig())
    assert [f.index for f in result.frames] == [0] and not result.frames[0].is_fast


def test_pixels_and_grids_line_up_with_frames(cut_video):
    cfg = VideoConfig(video_max_tokens=200)  # the frame cap binds: 200 // 48 = 4 frames
    result = preprocess_video(str(cut_video), cfg)
    # linspace(0, 29, 4) = 0, 9.67, 19.33, 29; frames 0 and 10 black, 19 and 29 the picture
    assert [(f.index, f.is_fast) for f in result.frames] == [(0, False), (10, True), (19, False), (29, True)]
    slow = {f.grid_hw for f in result.frames if not f.is_fast}
    fast = {f.grid_hw for f in result.frames if f.is_fast}
    assert len(slow) == 1 and len(fast) == 1
    assert result.grid_thw.dtype == torch.long
    assert result.grid_thw.tolist() == [[1, *f.grid_hw] for f in result.frames]
    assert result.pixel_values.shape == (int(result.grid_thw.prod(dim=1).sum()), 3, 14, 14)
    assert result.pixel_values.dtype == torch.float32
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in slow | fast)
    assert next(iter(fast))[0] * next(iter(fast))[1] <= next(iter(slow))[0] * next(iter(slow))[1]
    assert all(f.num_tokens >= 48 for f in result.frames)
    # 2 slow + 2 fast fit up to 52 slow tokens (2t + 2 * 48 <= 200), so the cap is 53; but 112x168 is
    # 24 tokens, below the 48 minimum, and scaling up by sqrt(2) with ceil gives 6x9 = 54 tokens. The
    # fast cap (max(int(0.3 * 54), 48) = 48) is also below the minimum: the same ceil, the same 54.
    assert result.slow_hw == result.fast_hw == (168, 252)
    assert result.num_tokens == 4 * 54


def test_slow_token_limit_binary_search():
    cfg = VideoConfig(video_max_tokens=1000)
    # 10 slow frames: 10 * t <= 1000 up to t = 100; the released search returns the first t over it
    assert slowfast.slow_token_limit(n_slow=10, n_fast=0, cfg=cfg) == 101
    strict = VideoConfig(video_max_tokens=1000, strict_token_budget=True)
    assert slowfast.slow_token_limit(n_slow=10, n_fast=0, cfg=strict) == 100
    # 2 slow + 10 fast: 2t + 10 * max(int(0.3t), 48) is 1000 at t = 200 and 1002 at t = 201
    assert slowfast.slow_token_limit(n_slow=2, n_fast=10, cfg=cfg) == 201
    assert slowfast.slow_token_limit(n_slow=2, n_fast=10, cfg=strict) == 200
    # everything fits: the per-frame maximum; nothing fits: the minimum
    assert slowfast.slow_token_limit(n_slow=1, n_fast=0, cfg=VideoConfig()) == 768
    assert slowfast.slow_token_limit(n_slow=100, n_fast=0, cfg=strict) == 48


def test_static_video_is_all_fast_after_the_first(tmp_path):
    path = tmp_path / "static.mp4"
    write_mp4(path, [picture(84, 84, 2)] * 20, fps=4)
    types = [f.is_fast for f in preprocess_video(str(path), VideoConfig()).frames]
    assert types == [False] + [True] * 9


def test_similarity_rules():
    cfg = VideoConfig()
    black = torch.zeros(3, 56, 56, dtype=torch.uint8)
    image = torch.from_numpy(picture(56, 56, 3)).permute(2, 0, 1).contiguous()
    half = black.clone()
    half[:, :28] = image[:, :28]

    def sim(a, b):
        return slowfast.patch_similarity(
            slowfast.unit_patches(a, patch=28, eps=1e-8), slowfast.unit_patches(b, patch=28, eps=1e-8), cfg
        )

    assert sim(image, image) == 1.0
    assert sim(black, black) == 1.0  # only blank patches: identical, never a new slow frame
    assert sim(black, image) == 0.0
    assert sim(half, black) == 0.0  # blank-in-both patches are ignored: 2 of 2 informative differ
    assert sim(half, image) == 0.5


def test_numpy_hsv_fallback_gives_the_same_plan(cut_video, monkeypatch):
    expected = inspect_video(str(cut_video), VideoConfig())
    monkeypatch.setattr(slowfast, "cv2", None)
    assert inspect_video(str(cut_video), VideoConfig()) == expected


# -------------------------------------------------------------------------------- sources & backends


def test_bytes_path_and_decord_agree(cut_video):
    from_path = preprocess_video(str(cut_video), VideoConfig())
    from_bytes = preprocess_video(cut_video.read_bytes(), VideoConfig())
    assert from_bytes.frames == from_path.frames
    assert torch.equal(from_bytes.pixel_values, from_path.pixel_values)
    pytest.importorskip("decord")
    with_decord = preprocess_video(cut_video, VideoConfig(decoder="decord"))
    assert with_decord.frames == from_path.frames
    assert torch.equal(with_decord.pixel_values, from_path.pixel_values)


def test_inspect_video_is_json_and_matches_preprocess(cut_video):
    info = json.loads(json.dumps(inspect_video(str(cut_video), VideoConfig())))
    result = preprocess_video(str(cut_video), VideoConfig())
    assert info["frame_indices"] == [f.index for f in result.frames]
    assert info["frame_types"] == ["slow", "fast", "fast", "slow", "fast", "fast"]
    assert info["tokens_per_frame"] == [f.num_tokens for f in result.frames]
    assert info["total_tokens"] == result.num_tokens == sum(info["tokens_per_frame"])
    assert info["slow_hw"] == list(result.slow_hw) and info["fast_hw"] == list(result.fast_hw)
    assert info["slow_grid_hw"] == [s // 14 for s in result.slow_hw]
    assert info["native_fps"] == 10 and info["num_frames"] == 6


# -------------------------------------------------------------------------------------- image lists


def test_image_list_video_pixels_are_raster_patches():
    frames = [picture(100, 150, 4)] * 3 + [np.zeros((100, 150, 3), np.uint8)] * 2
    images = [PIL.Image.fromarray(f) for f in frames]
    result = preprocess_video(FrameList(images, fps=1.0), VideoConfig())
    assert [f.index for f in result.frames] == [0, 1, 2, 3, 4]  # a list is taken as already sampled
    assert [f.timestamp for f in result.frames] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [f.is_fast for f in result.frames] == [False, True, True, False, True]
    # independent reference for frame 0: PIL bicubic to its smart size (100x150 is 4x5 = 20 tokens, below
    # the 48 minimum: scaled by sqrt(48 * 784 / 15000) = 1.584 and ceiled to 6x9 tokens = 168x252), then
    # the processor's uint8 antialiased bilinear to the slow size
    assert result.slow_hw == (168, 252)
    pre = torch.from_numpy(np.array(images[0].resize((252, 168), PIL.Image.Resampling.BICUBIC)))
    want = torch.nn.functional.interpolate(
        pre.permute(2, 0, 1)[None], list(result.slow_hw), mode="bilinear", antialias=True
    )[0]
    want = (want.permute(1, 2, 0).double() / 255 - 0.5) / 0.5
    gh, gw = result.frames[0].grid_hw
    got = result.pixel_values[: gh * gw].reshape(gh, gw, 3, 14, 14).permute(0, 3, 1, 4, 2)
    np.testing.assert_allclose(got.reshape(gh * 14, gw * 14, 3).numpy(), want.numpy(), atol=1e-6, rtol=0)


def test_frame_folder_uses_natural_order(tmp_path):
    # f1..f9 black, f10..f12 a picture: natural order puts the cut at position 9, plain sorting at 1
    for i in range(1, 13):
        pixels = picture(56, 84, 5) if i >= 10 else np.zeros((56, 84, 3), np.uint8)
        PIL.Image.fromarray(pixels).save(tmp_path / f"f{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    result = preprocess_video(FrameList(tmp_path, fps=2), VideoConfig())
    assert len(result.frames) == 12
    assert [i for i, f in enumerate(result.frames) if not f.is_fast] == [0, 9]


def test_resampled_image_list_uses_fps():
    images = [PIL.Image.fromarray(picture(56, 56, 6))] * 20
    result = preprocess_video(FrameList(images, fps=10), VideoConfig(resample_frame_lists=True))
    assert [f.index for f in result.frames] == [0, 6, 13, 19]  # 2 s at 2 fps; linspace(0, 19, 4)


@pytest.mark.parametrize(
    "frames,fps,match",
    [
        ([], 1.0, "no frames"),
        ([PIL.Image.new("RGB", (56, 56))], 0, "fps"),
        ([PIL.Image.new("RGB", (56, 56))], None, "fps"),
        ([PIL.Image.new("RGB", (56, 56)), PIL.Image.new("RGB", (560, 56))], 1.0, "different sizes"),
        ([PIL.Image.new("RGB", (56, 56)), "frame.png"], 1.0, "str"),
        ([PIL.Image.new("RGB", (0, 56))], 1.0, "empty"),
    ],
)
def test_bad_image_lists(frames, fps, match):
    with pytest.raises(ValueError, match=match):
        preprocess_video(FrameList(frames, fps=fps), VideoConfig())


def test_empty_frame_folder(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        preprocess_video(FrameList(tmp_path, fps=1), VideoConfig())


# -------------------------------------------------------------------------------------------- errors


def test_bad_video_files_are_value_errors(tmp_path, cut_video):
    data = cut_video.read_bytes()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 this is not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    cases = [
        (str(tmp_path / "missing.mp4"), "does not exist"),
        (str(garbage), "garbage.mp4"),
        (str(truncated), "truncated.mp4"),
        (data[: len(data) // 3], "bytes"),
        (b"", "empty"),
        (str(tmp_path), "FrameList"),
        ([PIL.Image.new("RGB", (56, 56))], "FrameList"),
    ]
    for source, match in cases:
        with pytest.raises(ValueError, match=match):
            preprocess_video(source, VideoConfig())
        if isinstance(source, str) and source.endswith(".mp4"):
            with pytest.raises(ValueError, match=match):
                inspect_video(source, VideoConfig())


def test_audio_only_file_is_a_value_error(tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ValueError, match="no video stream"):
        preprocess_video(str(path), VideoConfig(decoder="pyav"))  # PyAV states the reason in its own words


def test_truncated_streamable_mp4_is_a_value_error(tmp_path):
    # moov atom first: the header survives the cut, so the file opens but announced frames are missing
    path = tmp_path / "faststart.mp4"
    frames = [np.zeros((112, 168, 3), np.uint8)] * 15 + [picture(112, 168, 7)] * 15
    write_mp4(path, frames, fps=10, options={"movflags": "faststart"})
    data = path.read_bytes()
    with pytest.raises(ValueError, match="truncated"):
        preprocess_video(data[: int(len(data) * 0.8)], VideoConfig(decoder="pyav"))


def test_container_without_frame_count(tmp_path, cut_video):
    path = tmp_path / "cut.mkv"  # matroska does not record the number of frames
    frames = [np.zeros((112, 168, 3), np.uint8)] * 15 + [picture(112, 168, 0)] * 15
    write_mp4(path, frames, fps=10, fmt="matroska")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    info = inspect_video(str(path), VideoConfig())
    assert info["total_frames"] == 30 and info["frame_indices"] == [0, 6, 12, 17, 23, 29]


def test_decord_backend_bad_input_is_a_value_error(tmp_path):
    pytest.importorskip("decord")
    with pytest.raises(ValueError, match="cannot decode"):
        preprocess_video(b"garbage" * 100, VideoConfig(decoder="decord"))


def test_resize_video_is_the_uint8_stage_of_preprocess_video(tmp_path):
    """Scenes that cut (slow frames) and hold (fast frames): the resized uint8 frames, normalised by
    hand with the SigLIP mean/std, are exactly the patches preprocess_video returns, frame by frame."""
    path = tmp_path / "cuts.mp4"
    write_mp4(path, [picture(112, 168, 1)] * 8 + [picture(112, 168, 2)] * 8, fps=4)
    cfg = VideoConfig(min_tokens_per_frame=4)
    plan, resized = resize_video(str(path), cfg)
    result = preprocess_video(str(path), cfg)
    assert sorted(resized) == sorted({f.is_fast for f in plan.frames})
    taken = {False: 0, True: 0}
    offset = 0
    for frame in plan.frames:
        pixels = resized[frame.is_fast][taken[frame.is_fast]].double() / 255
        taken[frame.is_fast] += 1
        h, w = frame.grid_hw
        by_hand = (
            ((pixels.float() - 0.5) / 0.5)
            .reshape(3, h, 14, w, 14)
            .permute(1, 3, 0, 2, 4)
            .reshape(-1, 3, 14, 14)
        )
        torch.testing.assert_close(result.pixel_values[offset : offset + h * w], by_hand, atol=0, rtol=0)
        offset += h * w
    assert offset == result.pixel_values.shape[0]


# ------------------------------------------------------------------------ seeking, planned decoding


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    """120 frames at 30 fps with B-frames (x264 default structure), a keyframe every 20 frames and a cut."""
    if "libx264" not in av.codecs_available:
        pytest.skip("needs libx264 for B-frames")
    path = tmp_path_factory.mktemp("gop") / "gop.mp4"
    rng = np.random.default_rng(3)
    frames = []
    for i in range(120):
        img = picture(48, 64, 0 if i < 70 else 1)
        img = np.roll(img, i, axis=1)  # motion: P/B frames carry real residuals
        frames.append(np.clip(img.astype(int) + rng.integers(0, 8, img.shape), 0, 255).astype(np.uint8))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.options = {"g": "20", "bf": "3", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _full_decode(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("threads", [1, 3])  # one decoder (frame threading) / runs on three decoders at once
@pytest.mark.parametrize(
    "wanted",
    [[0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 119], [5, 63, 101], [119], [1, 2, 3]],
)
def test_planned_decode_equals_a_full_decode(gop_video, wanted, threads):
    from keye_train.data.media.video_seek import decode_planned

    full = _full_decode(gop_video)
    kept, info = decode_planned(av, str(gop_video), wanted=set(wanted), fps=30.0, what="gop", threads=threads)
    assert sorted(kept) == wanted
    for i in wanted:
        np.testing.assert_array_equal(kept[i], full[i])
    assert info["frames_decoded"] < len(full)  # non-reference frames nobody needs are not decoded
    if wanted == [5, 63, 101]:
        assert info["seeks"] == 2  # far apart: seek to the keyframes before 63 and 101
    if threads == 3 and len(wanted) > 3:
        assert info["workers"] == 3 and info["runs"] > 3  # the parallel path did run


def test_split_runs_cover_the_targets_in_order_from_keyframes():
    from keye_train.data.media.video_seek import split_runs

    keyframes = [0, 20, 40, 60, 70, 100]
    targets = [1, 5, 21, 39, 44, 61, 75, 99, 100, 119]
    for runs in (1, 2, 3, 4, 50):
        split = split_runs(targets, keyframes, runs)
        assert len(split) == min(runs, 6)  # 6 keyframe groups hold targets
        assert [t for _, ts in split for t in ts] == targets
        for start, ts in split:
            assert start in keyframes and start <= ts[0]
            assert not any(start < k <= ts[0] for k in keyframes)  # the keyframe right before its first
    assert split_runs(targets, keyframes, 1) == [(0, targets)]


def test_threads_give_the_same_video(tmp_path):
    """Decoding, SlowFast typing and resizing on several threads: the same plan and pixels as on one,
    and the resized frames equal one batched resize of each kind's frames (the processor's call)."""
    from keye_train.data.media.image import resize_frames
    from keye_train.data.media.video import _decode

    path = tmp_path / "cuts.mp4"
    scenes = [picture(96, 128, 1)] * 9 + [picture(96, 128, 2)] * 7 + [picture(96, 128, 3)] * 8
    write_mp4(path, [np.roll(f, i, axis=1) for i, f in enumerate(scenes)], fps=4)
    cfg = VideoConfig(min_tokens_per_frame=4, fps=4.0, min_frame_similarity=0.95)
    one = preprocess_video(str(path), VideoConfig(**{**vars(cfg), "threads": 1}))
    many = preprocess_video(str(path), VideoConfig(**{**vars(cfg), "threads": 3}))
    assert one.frames == many.frames and torch.equal(one.pixel_values, many.pixel_values)
    plan, resized = resize_video(str(path), VideoConfig(**{**vars(cfg), "threads": 3}))
    kinds = {f.is_fast for f in plan.frames}
    assert kinds == {False, True}, "needs slow and fast frames"
    frames = _decode(str(path), VideoConfig(**{**vars(cfg), "threads": 1})).frames
    is_fast = torch.tensor([f.is_fast for f in plan.frames])
    for fast, size in ((False, plan.slow_hw), (True, plan.fast_hw)):
        assert torch.equal(resized[fast], resize_frames(frames[is_fast == fast], size))


def test_ordered_map_keeps_order():
    import time

    from keye_train.data.media.threads import chunks, ordered_map

    slow_first = lambda i: (time.sleep(0.02 if i % 3 == 0 else 0), i)[1]  # noqa: E731
    assert list(ordered_map(slow_first, list(range(20)), 4)) == list(range(20))
    assert [list(r) for r in chunks(7, 3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert chunks(2, 5) == [range(0, 1), range(1, 2)]


def test_pyav_decoder_uses_the_plan_and_matches_decord(gop_video):
    cfg = VideoConfig(decoder="pyav")
    planned = preprocess_video(str(gop_video), cfg)
    assert planned.total_frames == 120 and len(planned.frames) == 8
    pytest.importorskip("decord")
    with_decord = preprocess_video(str(gop_video), VideoConfig(decoder="decord"))
    assert with_decord.frames == planned.frames
    assert torch.equal(with_decord.pixel_values, planned.pixel_values)


def test_variable_frame_rate_falls_back_to_counting(tmp_path):
    from keye_train.data.media.video_seek import decode_planned

    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate([0, 100, 250, 300, 480, 500]):  # uneven gaps: pts do not index frames
            frame = av.VideoFrame.from_ndarray(picture(32, 32, i), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ValueError, match="do not map one-to-one"):
        decode_planned(av, str(path), wanted={0, 3}, fps=10.0, what="vfr")
    result = preprocess_video(str(path), VideoConfig(decoder="pyav"))  # the counting decoder still works
    assert result.total_frames == 6
