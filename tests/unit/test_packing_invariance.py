"""Packing N images/frames/documents into one sequence equals N separate forwards, per backend."""

import dataclasses

import pytest
import torch

from keye_train.models.attention import flash_available
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model

BACKENDS = [
    "sdpa",
    "flex",
    pytest.param(
        "flash",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not flash_available(), reason="gpu: needs CUDA + flash-attn"),
        ],
    ),
]


def tiny_with_backend(backend):
    cfg = tiny()
    cfg.vision = dataclasses.replace(cfg.vision, attn_backend=backend)
    cfg.language = dataclasses.replace(cfg.language, attn_backend=backend)
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_packing_invariance(backend):
    device = "cuda" if backend == "flash" else "cpu"
    model = build_model(tiny_with_backend(backend), device=device, seed=1).eval()
    grids = [(1, 4, 6), (2, 2, 2), (1, 8, 4)]  # an image, a 2-frame item, another image
    pixels = [torch.randn(t * h * w, 3, 14, 14, device=device) for t, h, w in grids]
    with torch.no_grad():
        packed = model.visual(torch.cat(pixels), torch.tensor(grids, device=device))
        separate = torch.cat(
            [model.visual(p, torch.tensor([g], device=device)) for p, g in zip(pixels, grids)]
        )
        # A 2-frame item equals its two frames encoded one by one (frames never attend to each other).
        frames = model.visual(pixels[1], torch.tensor([[1, 2, 2], [1, 2, 2]], device=device))
    tol = 1e-5 if backend != "flash" else 2e-2
    torch.testing.assert_close(packed, separate, atol=tol, rtol=tol)
    torch.testing.assert_close(frames, separate[24:32], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_packing_invariance(backend):
    device = "cuda" if backend == "flash" else "cpu"
    cfg = tiny_with_backend(backend)
    model = build_model(cfg, device=device, seed=2).eval()
    lengths = [5, 17, 9]
    docs = [torch.randint(0, 400, (n,), device=device) for n in lengths]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths]).expand(3, 1, -1)
    cu = torch.tensor([0, 5, 22, 31], dtype=torch.int32, device=device)
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=positions, cu_seqlens=cu)[0]
        separate = torch.cat(
            [
                model(d[None], position_ids=torch.arange(len(d), device=device).expand(3, 1, -1))[0]
                for d in docs
            ]
        )
    tol = 1e-5 if backend != "flash" else 2e-2
    torch.testing.assert_close(packed, separate, atol=tol, rtol=tol)


def naive_attention(q, k, v, *, cu_seqlens, causal):
    """Explicit softmax(QK^T/sqrt(d)) with a block-diagonal mask: the textbook definition."""
    b, s, h, d = q.shape
    rep = h // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    doc = torch.zeros(b * s, dtype=torch.long)
    for i, start in enumerate(cu_seqlens[1:-1].tolist()):
        doc[start:] = i + 1
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones(b * s, b * s, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q.reshape(-1, h, d), k.reshape(-1, h, d)) / d**0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.reshape(-1, h, d)).view(b, s, h, d)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_match_textbook_attention(backend, causal):
    from keye_train.models.attention import packed_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 30, 4, 8), torch.randn(1, 30, 2, 8), torch.randn(1, 30, 2, 8)
    cu = torch.tensor([0, 7, 7, 19, 30], dtype=torch.int32)  # includes an empty segment
    out = packed_attention(q, k, v, cu_seqlens=cu, causal=causal, backend=backend)
    torch.testing.assert_close(
        out, naive_attention(q, k, v, cu_seqlens=cu, causal=causal), atol=1e-5, rtol=1e-5
    )


def test_flash_off_cuda_is_a_clear_error():
    from keye_train.models.attention import packed_attention

    q = torch.randn(1, 4, 2, 8)
    if flash_available():
        pytest.skip("flash is available here")
    with pytest.raises(RuntimeError, match="needs CUDA and flash-attn"):
        packed_attention(q, q, q, cu_seqlens=None, causal=True, backend="flash")
