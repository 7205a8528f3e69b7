"""Prompt layout against hand-written expected strings, and the shifted label mask."""

import pytest

from keye_train.data.batch import IGNORE_INDEX, FrameSpec
from keye_train.data.text import chat
from keye_train.data.text.chat import ChatOptions, ImageInfo, Segment, VideoInfo

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG6 = "<|vision_start|>" + "<|image_pad|>" * 6 + "<|vision_end|>"  # grid 4x6 -> 24 patches / 4


def text(s):
    return {"type": "text", "text": s}


def render(messages, **kw):
    return chat.segments_to_text(chat.render_conversation(messages, **kw))


def test_image_conversation():
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "img0.jpg"}, text("What is this?")]},
        {"role": "assistant", "content": "A cat."},
    ]
    out = render(messages, images=[ImageInfo(grid_hw=(4, 6), size=(84, 56))])
    assert out == (
        SYS + "<|im_start|>user\n" + IMG6 + "What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )


@pytest.mark.parametrize("mode", ["think", "no_think"])
def test_think_suffix_and_custom_system(mode):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hello"},
    ]
    out = render(messages, options=ChatOptions(think_mode=mode))
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nHi/{mode}<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        f"<|im_start|>user\nAgain/{mode}<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_no_system_prompt():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    out = render(messages, options=ChatOptions(system_prompt=None))
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def test_video_placeholder_with_timestamps_and_fast_markers():
    frames = (
        FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(4, 4)),
        FrameSpec(index=4, timestamp=0.5, is_fast=True, grid_hw=(2, 2)),
        FrameSpec(index=8, timestamp=1.0, is_fast=True, grid_hw=(2, 4)),
        FrameSpec(index=100, timestamp=12.5, is_fast=False, grid_hw=(4, 2)),
    )
    expected_video = (
        "<|vision_start|>"
        "<|frame|>0.0<|video_pad|><|video_pad|><|video_pad|><|video_pad|>"
        "<|frame|>0.5<|fast_start|><|video_pad|><|fast_end|>"
        "<|frame|>1.0<|fast_start|><|video_pad|><|video_pad|><|fast_end|>"
        "<|frame|>12.5<|video_pad|><|video_pad|>"
        "<|vision_end|>"
    )
    assert chat.video_placeholder(frames) == expected_video
    messages = [
        {"role": "user", "content": [{"type": "video", "video": "mp4"}, text("When?")]},
        {"role": "assistant", "content": [{"type": "clip_time", "clip_time": [1, 2.5]}]},
    ]
    out = render(messages, videos=[VideoInfo(frames=frames)])
    assert out == (
        SYS + "<|im_start|>user\n" + expected_video + "When?<|im_end|>\n"
        "<|im_start|>assistant\n<|clip_time_start|>[1.0, 2.5]<|clip_time_end|><|im_end|>\n"
    )


def test_caption_orders():
    img = ImageInfo(grid_hw=(4, 6), size=(84, 56))
    first = chat.render_caption(
        "A dog.", image=img, question="Color?", answer="Brown.", order="caption_first"
    )
    assert chat.segments_to_text(first) == IMG6 + "A dog.<|endoftext|>Color?Brown.<|endoftext|>"
    rev = chat.render_caption("A dog.", image=img, question="Color?", answer="Brown.", order="qa_first")
    assert chat.segments_to_text(rev) == IMG6 + "Color?Brown.<|endoftext|>A dog.<|endoftext|>"
    plain = chat.render_caption("A dog.", image=img)
    assert chat.segments_to_text(plain) == IMG6 + "A dog.<|endoftext|>"
    assert [s.train for s in rev] == [False, False, True, True]


def test_video_caption_interleaved_and_text():
    frames = (FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(2, 2)),)
    vid = chat.render_caption("Snow.", video=VideoInfo(frames=frames))
    assert (
        chat.segments_to_text(vid)
        == "<|vision_start|><|frame|>0.0<|video_pad|><|vision_end|>Snow.<|endoftext|>"
    )
    doc = chat.render_interleaved(
        [text("Intro. "), {"type": "image", "image": "a.png"}, text("Outro.")],
        images=[ImageInfo(grid_hw=(2, 4), size=(56, 28))],
    )
    assert chat.segments_to_text(doc) == (
        "Intro. <|vision_start|><|image_pad|><|image_pad|><|vision_end|>Outro.<|endoftext|>"
    )
    assert [s.train for s in doc] == [True, False, True, True]
    assert chat.segments_to_text(chat.render_text("Plain.")) == "Plain.<|endoftext|>"


def test_grounding_formats_normalised_to_1000():
    img = ImageInfo(grid_hw=(4, 6), size=(200, 100))  # width 200, height 100
    answer = [
        {"type": "ref", "text": "red square"},
        {"type": "box", "box": [50, 25, 150, 75]},
        text(" at "),
        {"type": "point", "point": [20, 10]},
        text(" shape "),
        # counter-clockwise on screen (y down): must come out clockwise
        {"type": "polygon", "polygon": [[100, 10], [20, 90], [180, 90]]},
        text(" reads "),
        {"type": "ocr", "text": "STOP"},
        {"type": "box", "box": [[0, 0, 200, 100], [10, 5, 30, 15]]},
        {"type": "point", "point": [500, 1000], "normalized": True},
    ]
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "i.jpg"}, text("Find it.")]},
        {"role": "assistant", "content": answer},
    ]
    out = render(messages, images=[img], options=ChatOptions(system_prompt=None))
    assert out == (
        "<|im_start|>user\n" + IMG6 + "Find it.<|im_end|>\n<|im_start|>assistant\n"
        "<|object_ref_start|>red square<|object_ref_end|><|box_start|>[[250, 250, 750, 750]]<|box_end|>"
        " at <|point_start|>[[100, 100]]<|point_end|>"
        " shape <|polygon_start|>[[[500, 100], [900, 900], [100, 900]]]<|polygon_end|>"
        " reads <|ocr_text_start|>STOP<|ocr_text_end|>"
        "<|box_start|>[[0, 0, 1000, 1000], [50, 50, 150, 150]]<|box_end|>"
        "<|point_start|>[[500, 1000]]<|point_end|><|im_end|>\n"
    )


def test_bad_content_is_value_error():
    with pytest.raises(ValueError, match="image #1"):
        render(
            [
                {"role": "user", "content": [{"type": "image", "image": "x"}]},
                {"role": "assistant", "content": "a"},
            ]
        )
    with pytest.raises(ValueError, match="no assistant turn"):
        render([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="every visual member"):
        render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            images=[ImageInfo(grid_hw=(2, 2), size=(28, 28))],
        )
    with pytest.raises(ValueError, match="think_mode"):
        ChatOptions(think_mode="maybe")


def char_encode(texts):
    return [[ord(c) for c in t] for t in texts]


def test_labels_shifted_and_masked():
    ids, labels = chat.encode_segments(
        [Segment("ab", False), Segment("cd", True), Segment("e", False)], encode_batch=char_encode
    )
    assert ids.tolist() == [97, 98, 99, 100, 101]
    # labels[i] is the token at i+1 when that token is a target
    assert labels.tolist() == [IGNORE_INDEX, 99, 100, IGNORE_INDEX, IGNORE_INDEX]


def test_conversation_labels_cover_assistant_turn_only():
    segs = chat.render_conversation(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Ans"}],
        options=ChatOptions(system_prompt=None),
    )
    ids, labels = chat.encode_segments(segs, encode_batch=char_encode)
    full = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nAns<|im_end|>\n"
    target = "Ans<|im_end|>"
    start = full.index(target)
    expected = [IGNORE_INDEX] * len(full)
    for pos in range(start, start + len(target)):
        expected[pos - 1] = ord(full[pos])
    assert labels.tolist() == expected
    assert labels[-1] == IGNORE_INDEX
