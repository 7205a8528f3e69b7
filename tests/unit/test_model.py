"""Composite model behaviour: splicing, errors, configs, meta-device build, freezing-friendly structure."""

import pytest
import torch

from keye_train.models.configs import KeyeConfig, LanguageConfig, VisionConfig, keye_8b, preset, tiny
from keye_train.models.keye import build_model, position_ids_for
from keye_train.models.projector import merge_patches


def multimodal_sample(cfg):
    img, vid = cfg.image_token_id, cfg.video_token_id
    ids = torch.tensor([1, 2, *[img] * 4, 3, *[vid] * 6, 4, 5])
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
    positions = position_ids_for(ids, grids_hw=[(4, 4), (4, 6)], cfg=cfg)
    return ids, grid, positions


def test_visual_embeddings_land_on_pad_positions_in_order():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    ids, grid, _ = multimodal_sample(cfg)
    visual = torch.arange(10 * 64, dtype=torch.float32).view(10, 64)
    embeds = model.embed(ids[None], visual)[0]
    pad_rows = torch.nonzero(torch.isin(ids, torch.tensor([cfg.image_token_id, cfg.video_token_id])))[:, 0]
    torch.testing.assert_close(embeds[pad_rows], visual)
    torch.testing.assert_close(embeds[0], model.model.embed_tokens.weight[1])


def test_pad_count_mismatch_names_both_counts():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    ids, _, _ = multimodal_sample(cfg)
    with pytest.raises(ValueError, match="10 image/video pad tokens but the ViT produced 9"):
        model.embed(ids[None], torch.zeros(9, 64))


def test_forward_backward_reaches_every_trainable_parameter():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    ids, grid, positions = multimodal_sample(cfg)
    logits = model(
        ids[None], position_ids=positions[:, None], pixel_values=torch.randn(40, 3, 14, 14), grid_thw=grid
    )
    assert logits.shape == (1, ids.numel(), cfg.language.vocab_size)
    logits.square().mean().backward()
    unused = {"visual.vision_model.embeddings.packing_position_embedding.weight"}
    missing = [
        n for n, p in model.named_parameters() if p.grad is None and n not in unused and ".head." not in n
    ]
    assert missing == []


def test_merge_order_is_tl_tr_bl_br():
    # one 2x4 grid with feature = patch index: blocks are (0,1,4,5) and (2,3,6,7)
    features = torch.arange(8, dtype=torch.float32)[:, None]
    merged = merge_patches(features, torch.tensor([[1, 2, 4]]), 2)
    assert merged.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_position_table_is_bilinear_resize_of_the_learned_grid():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    emb = model.visual.vision_model.embeddings
    grid = cfg.vision.position_grid
    torch.testing.assert_close(emb.resized_positions(grid, grid), emb.position_embedding.weight)
    # 1x1 target: bilinear with align_corners=False samples the table's centre
    centre = emb.position_embedding.weight.view(grid, grid, -1)[
        grid // 2 - 1 : grid // 2 + 1, grid // 2 - 1 : grid // 2 + 1
    ]
    torch.testing.assert_close(emb.resized_positions(1, 1)[0], centre.mean((0, 1)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LanguageConfig(num_heads=32, num_kv_heads=5), "not a multiple of num_kv_heads"),
        (lambda: LanguageConfig(mrope_section=(16, 24, 23)), "mrope_section"),
        (lambda: VisionConfig(hidden_size=1152, num_heads=7), "not divisible"),
        (lambda: VisionConfig(attn_backend="xformers"), "attention backend"),
        (lambda: KeyeConfig(image_token_id=10**7), "outside the vocabulary"),
        (lambda: preset("keye_70b"), "unknown model preset"),
    ],
)
def test_invalid_configs_name_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_8b_builds_on_meta_without_memory():
    model = build_model(keye_8b(), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
