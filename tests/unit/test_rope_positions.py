"""M-RoPE position ids against hand-worked examples of the KEYE_SPEC rule."""

import pytest
import torch

from keye_train.models.rope import mrope_position_ids

IMG, VID = 90, 91  # stand-in pad ids
T = 7  # any text token


def ids(*parts):
    return torch.tensor([t for part in parts for t in part])


def test_image_between_text():
    # text x2, an image of 4x6 patches (merged 2x3 -> 6 tokens), text x2
    seq = ids([T, T], [IMG] * 6, [T, T])
    pos = mrope_position_ids(seq, grids_hw=[(4, 6)], visual_token_ids=(IMG, VID))
    expected_t = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]  # text after the block starts at s + max(2, 3) = 5
    expected_h = [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    expected_w = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert pos.tolist() == [expected_t, expected_h, expected_w]


def test_video_frames_are_separate_t1_grids_with_timestamp_text():
    # <frame> "0.0" [4 tokens: 2x2] <frame> "0.5" [4 tokens]  (timestamps are ordinary text tokens)
    seq = ids([T], [T, T], [VID] * 4, [T], [T, T], [VID] * 4, [T])
    pos = mrope_position_ids(seq, grids_hw=[(4, 4), (4, 4)], visual_token_ids=(IMG, VID))
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 5, 6, 7, 8, 8, 8, 8, 10]
    assert pos[1].tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8, 8, 9, 9, 10]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 8, 9, 10]


def test_tall_image_advances_by_the_larger_side():
    seq = ids([IMG] * 3, [T])  # grid 6x2 patches -> merged 3x1
    pos = mrope_position_ids(seq, grids_hw=[(6, 2)], visual_token_ids=(IMG, VID))
    assert pos.tolist() == [[0, 0, 0, 3], [0, 1, 2, 3], [0, 0, 0, 3]]


def test_interleaved_text_only_is_1d():
    pos = mrope_position_ids(ids([T] * 5), grids_hw=[], visual_token_ids=(IMG, VID))
    assert pos.tolist() == [list(range(5))] * 3


@pytest.mark.parametrize(
    ("seq", "grids", "message"),
    [
        (ids([IMG] * 3), [(4, 4)], "needs 4 consecutive"),
        (ids([IMG] * 4, [IMG] * 4), [(4, 4)], "no grid left"),
        (ids([T]), [(4, 4)], "left over"),
        (ids([IMG] * 4), [(3, 4)], "not divisible"),
    ],
)
def test_mismatches_are_clear_errors(seq, grids, message):
    with pytest.raises(ValueError, match=message):
        mrope_position_ids(seq, grids_hw=grids, visual_token_ids=(IMG, VID))
