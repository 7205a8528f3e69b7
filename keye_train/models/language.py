"""Qwen3 decoder (GQA, q/k RMSNorm, SwiGLU) with chunked M-RoPE over packed sequences."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye_train.models.attention import packed_attention
from keye_train.models.configs import LanguageConfig
from keye_train.models.rope import apply_rotary, mrope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm normalising in fp32, then scaling in the input dtype (as the Qwen3 reference does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attention_fn = functools.partial(packed_attention, backend=cfg.attn_backend)

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor], cu_seqlens: Tensor | None) -> Tensor:
        batch, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.q_norm(self.q_proj(x).view(batch, seqlen, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, seqlen, -1, self.head_dim))
        v = self.v_proj(x).view(batch, seqlen, -1, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = self.attention_fn(q, k, v, cu_seqlens=cu_seqlens, causal=True)
        return self.o_proj(out.reshape(batch, seqlen, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor], cu_seqlens: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope=rope, cu_seqlens=cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """`model` in the checkpoint: embeddings, decoder layers, final norm (the head lives in the composite).

    Layers sit in a ModuleDict keyed "0".."n-1": the state-dict keys equal a ModuleList's, and a pipeline
    stage that drops layers keeps the original names, so checkpoints stay layout-independent.
    Each piece may be None on a pipeline stage that does not own it.
    """

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Qwen3DecoderLayer(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = mrope_cos_sin(
            position_ids=position_ids,
            head_dim=self.cfg.head_dim,
            theta=self.cfg.rope_theta,
            mrope_section=self.cfg.mrope_section,
        )
        return cos, sin

    def forward(self, inputs_embeds: Tensor, *, position_ids: Tensor, cu_seqlens: Tensor | None) -> Tensor:
        """inputs_embeds (B, S, D), position_ids (3, B, S); cu_seqlens over the flattened B*S tokens
        (document masking of packed samples), None to treat each row as one sequence."""
        rope = self.rope(position_ids)
        x = inputs_embeds
        for layer in self.layers.values():
            x = layer(x, rope=rope, cu_seqlens=cu_seqlens)
        return self.norm(x) if self.norm is not None else x
