"""`keye-convert import` is lenient where the reference is (unused tensors may be absent, absent config fields
take the reference defaults, vision_config.rope_theta is read) and exact otherwise."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from keye_train.checkpoint.dcp import saved_keye_config
from keye_train.checkpoint.export import export_to_hf, import_from_hf
from keye_train.checkpoint.hf import load_into_model, load_keye_config, save_keye_hf
from keye_train.checkpoint.hf_config import language_config_from_qwen3
from keye_train.checkpoint.hf_inspect import inspect_checkpoint
from keye_train.models.configs import VisionConfig, tiny
from keye_train.models.keye import build_model
from keye_train.models.vision import VisionTower
from keye_train.testing.toy_batch import toy_packed_batch

CFG = tiny()
UNUSED = ("visual.vision_model.embeddings.packing_position_embedding.", "visual.vision_model.head.")
quiet = dict(log=lambda _: None)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out |= load_file(file)
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A bf16 HF folder of a tiny model with the packing table and pooling head, as released."""
    root = tmp_path_factory.mktemp("import")
    model = build_model(CFG, seed=0)
    save_keye_hf(model.state_dict(), cfg=CFG, out_dir=root / "full", dtype="bf16", max_shard_bytes=200_000)
    return root, model


def _link_with_config(full: Path, out: Path, config: dict) -> None:
    """`full`'s tensors (linked) under another config.json."""
    (out / "config.json").write_text(json.dumps(config))
    for file in full.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file)


def _without_unused(full: Path, out: Path) -> Path:
    """The folder as the transformers port writes it: no packing table, no pooling head."""
    out.mkdir()
    (out / "config.json").write_text((full / "config.json").read_text())
    tensors = {k: v for k, v in _tensors(full).items() if not k.startswith(UNUSED)}
    save_file(tensors, out / "model.safetensors")
    return out


def test_round_trip_with_unused_tensors_is_bit_identical(released, tmp_path):
    root, _ = released
    import_from_hf(root / "full", tmp_path / "dcp", **quiet)
    export_to_hf(tmp_path / "dcp", tmp_path / "back", dtype="bf16", **quiet)
    before, after = _tensors(root / "full"), _tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    assert any(k.startswith(UNUSED[0]) for k in after) and any(k.startswith(UNUSED[1]) for k in after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


def test_import_without_packing_table_and_head(released, tmp_path):
    root, model = released
    port = _without_unused(root / "full", tmp_path / "port")
    report = inspect_checkpoint(port)
    assert report.ok and any("no packing table / pooling head" in note for note in report.notes)
    import_from_hf(port, tmp_path / "dcp", **quiet)
    cfg = saved_keye_config(tmp_path / "dcp")
    assert cfg.vision.num_packing_positions == 0 and not cfg.vision.use_head
    export_to_hf(tmp_path / "dcp", tmp_path / "back", dtype="fp32", **quiet)
    exported = _tensors(tmp_path / "back")
    assert not [k for k in exported if k.startswith(UNUSED)]
    # The unused tensors never reach the logits: the folder gives the released model's (bf16) logits.
    loaded, reference = build_model(cfg, seed=5), build_model(CFG, seed=5)
    load_into_model(loaded, tmp_path / "back")
    load_into_model(reference, root / "full")
    batch = toy_packed_batch(CFG, seed=0)
    inputs = {k: batch[k] for k in ("position_ids", "cu_seqlens", "pixel_values", "grid_thw")}
    with torch.no_grad():
        assert torch.equal(loaded(batch["input_ids"], **inputs), reference(batch["input_ids"], **inputs))


def test_other_missing_tensors_are_refused_by_name(released, tmp_path):
    root, _ = released
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "full" / "config.json").read_text())
    tensors = _tensors(root / "full")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing key: model\.layers\.1\.self_attn\.k_norm\.weight"):
        import_from_hf(broken, tmp_path / "dcp", **quiet)
    assert not (tmp_path / "dcp").exists()


def test_absent_fields_take_the_reference_defaults(released, tmp_path):
    root, _ = released
    folder = tmp_path / "sparse"
    folder.mkdir()
    config = json.loads((root / "full" / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta"):
        del config[key]
    _link_with_config(root / "full", folder, config)
    cfg = load_keye_config(folder)
    assert (cfg.language.rms_norm_eps, cfg.language.rope_theta) == (1e-5, 1e6)  # the Keye port's (KEYE_SPEC)
    assert cfg.vision.rope_theta == 10000.0
    # A Qwen3 config.json keeps Qwen3Config's own defaults (the transformers class is the reference).
    transformers = pytest.importorskip("transformers")
    qwen3 = transformers.Qwen3Config()
    lang = language_config_from_qwen3({"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "intermediate_size": 32})  # fmt: skip
    assert lang.rms_norm_eps == qwen3.rms_norm_eps
    assert lang.rope_theta == qwen3.rope_parameters["rope_theta"]


# ------------------------------------------------------------------- vision_config.rope_theta


def _reference_vit(tower: VisionTower, pixels: torch.Tensor, grids: list[tuple[int, int]], theta: float):
    """An independent native-resolution SigLIP forward: 2D RoPE written as a complex rotation of the pairs
    (d, d + head_dim/2), angle row * theta^(-4j/head_dim) for the first quarter of d, col * ... for the
    second, and attention as an explicit softmax inside each image."""
    vm = tower.vision_model
    cfg = vm.cfg
    hd, heads = cfg.head_dim, cfg.num_heads
    conv = vm.embeddings.patch_embedding
    x = pixels.flatten(1) @ conv.weight.flatten(1).T + conv.bias
    side = cfg.position_grid
    table = vm.embeddings.position_embedding.weight.T.reshape(1, -1, side, side)
    pos = [F.interpolate(table, size=g, mode="bilinear", align_corners=False)[0].flatten(1).T for g in grids]
    x = x + torch.cat(pos)
    quarter = hd // 4
    freqs = torch.tensor([theta ** (-2 * j / (hd // 2)) for j in range(quarter)], dtype=torch.float64)
    angles = []
    for h, w in grids:
        for r in range(h):
            for c in range(w):
                angles.append(torch.cat([r * freqs, c * freqs]))
    rotation = torch.polar(torch.ones(len(angles), hd // 2, dtype=torch.float64), torch.stack(angles))

    def rotate(t):  # (N, heads, hd)
        z = torch.complex(t[..., : hd // 2].double(), t[..., hd // 2 :].double()) * rotation[:, None]
        return torch.cat([z.real, z.imag], dim=-1).float()

    def norm(t, ln):
        mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    bounds = [0]
    for h, w in grids:
        bounds.append(bounds[-1] + h * w)
    for layer in vm.encoder.layers:
        a = layer.self_attn
        y = norm(x, layer.layer_norm1)
        q, k, v = (p(y).view(-1, heads, hd) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = rotate(q), rotate(k)
        out = torch.zeros_like(q)
        for s, e in zip(bounds[:-1], bounds[1:]):
            scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / math.sqrt(hd)
            out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e])
        x = x + a.out_proj(out.reshape(len(x), -1))
        y = norm(x, layer.layer_norm2)
        x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(y), approximate="tanh"))
    return norm(x, vm.post_layernorm)


def test_vision_rope_theta_is_read_and_changes_the_vit_as_the_formula_says(released, tmp_path):
    root, _ = released
    folder = tmp_path / "theta"
    folder.mkdir()
    config = json.loads((root / "full" / "config.json").read_text())
    config["vision_config"]["rope_theta"] = 5000.0
    _link_with_config(root / "full", folder, config)
    import_from_hf(folder, tmp_path / "dcp", **quiet)
    cfg = saved_keye_config(tmp_path / "dcp")
    assert cfg.vision.rope_theta == 5000.0
    grids = [(4, 6), (2, 2)]
    pixels = torch.randn(28, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    grid_thw = torch.tensor([(1, h, w) for h, w in grids])
    model = build_model(cfg, seed=1)
    load_into_model(model, folder)
    default = build_model(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, rope_theta=1e4)))
    load_into_model(default, folder)
    with torch.no_grad():
        for m in (model, default):  # sharpen attention (init std 0.02 makes it uniform, hiding positions)
            for layer in m.visual.vision_model.encoder.layers:
                layer.self_attn.q_proj.weight.mul_(40)
                layer.self_attn.k_proj.weight.mul_(40)
        ours = model.visual(pixels, grid_thw)
        reference = _reference_vit(model.visual, pixels, grids, theta=5000.0)
        at_default = default.visual(pixels, grid_thw)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)
    assert (ours - at_default).abs().max() > 1e-3  # the base is not ignored


def test_vision_config_validates_its_rope_theta():
    with pytest.raises(ValueError, match="vision.rope_theta=0"):
        VisionConfig(rope_theta=0)
