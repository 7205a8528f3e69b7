"""Numerical parity with Hugging Face transformers (Qwen3, SigLIP) in fp32.

Weights travel from the transformers models to ours ONLY through `keye-convert init` and the HF adapter
(`load_into_model`), so these tests also prove the key mapping. Tolerance: max |ours - ref| <= 1e-5 x
max |ref| (the issue's "1e-5 relative to output scale").
"""

import dataclasses

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipConfig, SiglipModel

from keye_train.checkpoint.hf import load_into_model, load_keye_config
from keye_train.cli.convert import main as convert_main
from keye_train.models.keye import KeyeForConditionalGeneration
from keye_train.models.siglip_text import SiglipTextTower, sigmoid_contrastive_loss

VOCAB = 300


def assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5 * scale, f"max abs diff {diff:.3e} exceeds 1e-5 x output scale {scale:.3e}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("parity")
    siglip = SiglipModel(
        SiglipConfig(
            vision_config=dict(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=384,
                patch_size=14,
            ),
            text_config=dict(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=120,
                max_position_embeddings=16,
                projection_size=48,
            ),
        )
    ).eval()
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=1e6,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    ).eval()
    siglip.save_pretrained(root / "siglip")
    qwen3.save_pretrained(root / "qwen3", max_shard_size="100KB")  # several shards, as published
    ids = "image=296,video=297,vision_start=298,vision_end=299,pad=0"
    rc = convert_main(
        [
            "init",
            "--siglip",
            str(root / "siglip"),
            "--qwen3",
            str(root / "qwen3"),
            "--out",
            str(root / "keye"),
            "--dtype",
            "fp32",
            "--token-ids",
            ids,
        ]
    )
    assert rc == 0
    cfg = load_keye_config(root / "keye")
    model = KeyeForConditionalGeneration(cfg).eval()
    load_into_model(model, root / "keye")
    tower = SiglipTextTower(cfg.text_tower).eval()
    load_into_model(tower, root / "keye" / "siglip_text")
    return {"siglip": siglip, "qwen3": qwen3, "model": model, "tower": tower, "cfg": cfg}


def text_positions(length: int, batch: int = 1) -> torch.Tensor:
    return torch.arange(length).expand(3, batch, length)  # text only: T = H = W, M-RoPE == 1D RoPE


@pytest.mark.parametrize("length", [1, 7, 64, 200])
def test_language_logits_match_qwen3(converted, length):
    torch.manual_seed(length)
    ids = torch.randint(0, 290, (2, length))
    with torch.no_grad():
        ref = converted["qwen3"](ids).logits
        ours = converted["model"](ids, position_ids=text_positions(length, 2))
    assert_close_to_scale(ours, ref)


def test_packed_batch_matches_qwen3_per_document(converted):
    torch.manual_seed(1)
    docs = [torch.randint(0, 290, (n,)) for n in (13, 40, 1, 26)]
    lengths = torch.tensor([len(d) for d in docs])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    positions = torch.cat([torch.arange(len(d)) for d in docs]).expand(3, 1, -1)
    with torch.no_grad():
        ours = converted["model"](torch.cat(docs)[None], position_ids=positions, cu_seqlens=cu)[0]
        ref = torch.cat([converted["qwen3"](d[None]).logits[0] for d in docs])
    assert_close_to_scale(ours, ref)


def patchify(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B * H/14 * W/14, 3, 14, 14) in raster order, as the data pipeline delivers."""
    p = images.unfold(2, 14, 14).unfold(3, 14, 14)  # B, 3, h, w, 14, 14
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 14, 14)


def plain_siglip_tower(converted):
    """Our tower with 2D RoPE switched off is plain SigLIP; the weights are the converted ones."""
    vision = converted["model"].visual.vision_model
    plain = dataclasses.replace(vision.cfg, use_rope=False)
    vision.cfg = plain
    return vision


def test_vision_tower_without_rope_matches_siglip_at_384(converted):
    torch.manual_seed(2)
    images = torch.randn(2, 3, 384, 384)
    vision = plain_siglip_tower(converted)
    try:
        with torch.no_grad():
            ref = converted["siglip"].vision_model(pixel_values=images).last_hidden_state  # (2, 729, 48)
            ours = vision(patchify(images), torch.tensor([[1, 27, 27]] * 2)).view(2, 729, -1)
    finally:
        vision.cfg = dataclasses.replace(vision.cfg, use_rope=True)
    assert_close_to_scale(ours, ref)


def test_text_tower_and_sigmoid_loss_match_siglip_model(converted):
    torch.manual_seed(3)
    images = torch.randn(3, 3, 384, 384)
    text = torch.randint(0, 120, (3, 16))
    vision = plain_siglip_tower(converted)
    tower = converted["tower"]
    try:
        with torch.no_grad():
            ref = converted["siglip"](input_ids=text, pixel_values=images, return_loss=True)
            grid = torch.tensor([[1, 27, 27]] * 3)
            image_embeds = vision.pool(vision(patchify(images), grid), grid)
            text_embeds = tower(text)
            loss = sigmoid_contrastive_loss(
                image_embeds, text_embeds, logit_scale=tower.logit_scale, logit_bias=tower.logit_bias
            )
    finally:
        vision.cfg = dataclasses.replace(vision.cfg, use_rope=True)
    assert_close_to_scale(text_embeds / text_embeds.norm(dim=-1, keepdim=True), ref.text_embeds)
    assert_close_to_scale(image_embeds / image_embeds.norm(dim=-1, keepdim=True), ref.image_embeds)
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
