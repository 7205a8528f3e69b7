"""Every parameter name and shape of the 8B model against KEYE_SPEC's layout, written out by hand."""

from __future__ import annotations

import torch

from keye_train.models.configs import keye_8b
from keye_train.models.keye import KeyeForConditionalGeneration

# KEYE_SPEC numbers. Vision: SigLIP-so400m-patch14-384.
V_HIDDEN, V_LAYERS, V_MLP, PATCH, V_TABLE, PACKING = 1152, 27, 4304, 14, 729, 32768
# Projector: 2x2 merge -> 4608 -> 4608 -> 4096.
MERGED = 4608
# Qwen3-8B.
HIDDEN, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 4096, 36, 32, 8, 128, 12288, 151936


def spec_layout() -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {}
    vm = "visual.vision_model"
    layout[f"{vm}.embeddings.patch_embedding.weight"] = (V_HIDDEN, 3, PATCH, PATCH)
    layout[f"{vm}.embeddings.patch_embedding.bias"] = (V_HIDDEN,)
    layout[f"{vm}.embeddings.position_embedding.weight"] = (V_TABLE, V_HIDDEN)
    layout[f"{vm}.embeddings.packing_position_embedding.weight"] = (PACKING, V_HIDDEN)
    for i in range(V_LAYERS):
        p = f"{vm}.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            layout[f"{p}.{norm}.weight"] = layout[f"{p}.{norm}.bias"] = (V_HIDDEN,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout[f"{p}.self_attn.{proj}.weight"] = (V_HIDDEN, V_HIDDEN)
            layout[f"{p}.self_attn.{proj}.bias"] = (V_HIDDEN,)
        layout[f"{p}.mlp.fc1.weight"], layout[f"{p}.mlp.fc1.bias"] = (V_MLP, V_HIDDEN), (V_MLP,)
        layout[f"{p}.mlp.fc2.weight"], layout[f"{p}.mlp.fc2.bias"] = (V_HIDDEN, V_MLP), (V_HIDDEN,)
    layout[f"{vm}.post_layernorm.weight"] = layout[f"{vm}.post_layernorm.bias"] = (V_HIDDEN,)
    # SigLIP pooling head: probe + nn.MultiheadAttention (packed in_proj) + LayerNorm + MLP.
    h = f"{vm}.head"
    layout[f"{h}.probe"] = (1, 1, V_HIDDEN)
    layout[f"{h}.attention.in_proj_weight"] = (3 * V_HIDDEN, V_HIDDEN)
    layout[f"{h}.attention.in_proj_bias"] = (3 * V_HIDDEN,)
    layout[f"{h}.attention.out_proj.weight"] = (V_HIDDEN, V_HIDDEN)
    layout[f"{h}.attention.out_proj.bias"] = (V_HIDDEN,)
    layout[f"{h}.layernorm.weight"] = layout[f"{h}.layernorm.bias"] = (V_HIDDEN,)
    layout[f"{h}.mlp.fc1.weight"], layout[f"{h}.mlp.fc1.bias"] = (V_MLP, V_HIDDEN), (V_MLP,)
    layout[f"{h}.mlp.fc2.weight"], layout[f"{h}.mlp.fc2.bias"] = (V_HIDDEN, V_MLP), (V_HIDDEN,)
    layout["mlp_AR.pre_norm.weight"] = layout["mlp_AR.pre_norm.bias"] = (MERGED,)
    layout["mlp_AR.linear_1.weight"], layout["mlp_AR.linear_1.bias"] = (MERGED, MERGED), (MERGED,)
    layout["mlp_AR.linear_2.weight"], layout["mlp_AR.linear_2.bias"] = (HIDDEN, MERGED), (HIDDEN,)
    layout["model.embed_tokens.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        layout[f"{p}.input_layernorm.weight"] = layout[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
        layout[f"{p}.self_attn.q_proj.weight"] = (Q_HEADS * HEAD_DIM, HIDDEN)
        layout[f"{p}.self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        layout[f"{p}.self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        layout[f"{p}.self_attn.o_proj.weight"] = (HIDDEN, Q_HEADS * HEAD_DIM)
        layout[f"{p}.self_attn.q_norm.weight"] = layout[f"{p}.self_attn.k_norm.weight"] = (HEAD_DIM,)
        layout[f"{p}.mlp.gate_proj.weight"] = layout[f"{p}.mlp.up_proj.weight"] = (MLP, HIDDEN)
        layout[f"{p}.mlp.down_proj.weight"] = (HIDDEN, MLP)
    layout["model.norm.weight"] = (HIDDEN,)
    layout["lm_head.weight"] = (VOCAB, HIDDEN)  # untied: its own tensor
    return layout


def test_8b_parameters_match_the_spec_layout():
    with torch.device("meta"):
        model = KeyeForConditionalGeneration(keye_8b())
    found = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = spec_layout()
    assert sorted(set(expected) - set(found)) == []
    assert sorted(set(found) - set(expected)) == []
    assert {k: v for k, v in found.items() if v != expected[k]} == {}
    # Untied lm_head: named parameters are distinct tensors, so they count once each.
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    total = sum(p.numel() for p in model.parameters())
    # Per-part sums written from the spec numbers (not from the model), and the literal totals they give.
    vision_layer = 2 * 2 * 1152 + 4 * (1152 * 1152 + 1152) + (4304 * 1152 + 4304) + (1152 * 4304 + 1152)
    head = (
        1152 + (3 * 1152 * 1152 + 3 * 1152) + (1152 * 1152 + 1152) + 2 * 1152 + 4304 * 1152 * 2 + 4304 + 1152
    )
    vision = (1152 * 3 * 14 * 14 + 1152) + 729 * 1152 + 32768 * 1152 + 27 * vision_layer + 2 * 1152 + head
    projector = 2 * 4608 + (4608 * 4608 + 4608) + (4096 * 4608 + 4096)
    llm_layer = 2 * 4096 + 4096 * 4096 * 2 + 1024 * 4096 * 2 + 2 * 128 + 3 * 12288 * 4096
    llm = 151936 * 4096 + 36 * llm_layer + 4096 + 151936 * 4096
    assert (vision, projector, llm) == (465_974_336, 40_125_952, 8_190_735_360)
    assert total == vision + projector + llm == 8_696_835_648
    assert sum(torch.Size(shape).numel() for shape in expected.values()) == total
