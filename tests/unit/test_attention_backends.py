"""Attention backends against the SDPA reference on CPU: FlexAttention with document masks (forward;
PyTorch has no CPU flex backward), and the `auto` choice per device."""

import pytest
import torch

from keye_train.models.attention import BACKENDS, auto_backend, packed_attention, resolve_backend


def _packed(seed=0, *, heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 5, 37, 38, 90, 128], dtype=torch.int32)  # 1-token and uneven documents
    q = torch.randn(1, 128, heads, dim, generator=g)
    k = torch.randn(1, 128, kv_heads, dim, generator=g)
    v = torch.randn(1, 128, kv_heads, dim, generator=g)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_sdpa_on_cpu(causal):
    q, k, v, cu = _packed()
    ref = packed_attention(q, k, v, cu_seqlens=cu, causal=causal, backend="sdpa")
    with torch.no_grad():
        got = packed_attention(q, k, v, cu_seqlens=cu, causal=causal, backend="flex")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # The reference itself respects the documents: a token of document 2 ignores document 1.
    moved = v.clone()
    moved[:, :5] += 1.0
    other = packed_attention(q, k, moved, cu_seqlens=cu, causal=causal, backend="sdpa")
    torch.testing.assert_close(other[:, 5:], ref[:, 5:])
    assert not torch.allclose(other[:, :5], ref[:, :5])


def test_auto_is_sdpa_on_cpu_and_fast_kernels_refuse_cpu():
    assert auto_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert set(BACKENDS) >= {"auto", "sdpa", "flex", "varlen", "flash"}
    q, k, v, cu = _packed()
    torch.testing.assert_close(
        packed_attention(q, k, v, cu_seqlens=cu, causal=True, backend="auto"),
        packed_attention(q, k, v, cu_seqlens=cu, causal=True, backend="sdpa"),
    )
    for name in ("varlen", "flash"):
        with pytest.raises(RuntimeError, match=f"attention backend '{name}' needs CUDA"):
            resolve_backend(name, torch.device("cpu"))


def test_sdpa_under_bf16_autocast_returns_the_autocast_dtype():
    q, k, v, cu = _packed()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_attention(q, k, v.bfloat16(), cu_seqlens=cu, causal=True, backend="sdpa")
    assert out.dtype == torch.bfloat16
