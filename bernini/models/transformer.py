"""The Wan2.2 DiT over a packed multi-source token sequence; parameter names equal diffusers'.

Single-device code. Sequence parallelism reaches it only through the `sequence` hooks given
when the model is built (shard after embedding, the self-attention call, gather before the
head): the identity `LocalSequence` unless bernini.parallel passes its Ulysses hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from bernini.attention import attention
from bernini.models.rope import apply_rope


@dataclass(frozen=True)
class TransformerConfig:
    """The fields of diffusers' WanTransformer3DModel config.json that this model uses."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: (tuple(v) if k == "patch_size" else v) for k, v in data.items() if k in known})
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise ValueError("image-conditioned (I2V) Wan transformers are not Bernini-R experts")
        if cfg.qk_norm != "rms_norm_across_heads" or not cfg.cross_attn_norm:
            raise ValueError(f"unsupported transformer config: qk_norm={cfg.qk_norm}, cross_attn_norm={cfg.cross_attn_norm}")
        return cfg

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_features(self) -> int:
        return self.in_channels * math.prod(self.patch_size)


class LocalSequence:
    """Single-device sequence hooks; bernini.parallel's Ulysses hooks subclass it."""

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (diffusers' FP32LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MLP(nn.Module):
    """linear_1 -> act -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection names)."""

    def __init__(self, d_in: int, d_out: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = act
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))

    def timestep_features(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features [B, freq_dim], cos half first."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def time(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """temb [B, dim] and the block modulation [B, 6, dim]."""
        feats = self.timestep_features(t).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(feats).to(dtype)
        return temb, self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.register_module("to_qkv", None)  # self-attention's fused projection, built by fuse_qkv after loading

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1))

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads_of(self.norm_k(self.to_k(context))), self.heads_of(self.to_v(context))

    def fuse_qkv(self, keep_separate: bool = False) -> None:
        """One [3*dim, dim] projection instead of three: the same products, one GEMM that reads x once.

        Built after the weights load, so checkpoints keep their to_q/to_k/to_v keys; the separate layers are
        dropped (their memory freed) unless ``keep_separate`` (benchmarks time both forms on one model).
        """
        if self.to_qkv is not None:
            return
        parts = (self.to_q, self.to_k, self.to_v)
        if type(parts[0]) is nn.Linear:
            fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), device="meta")
            fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        else:  # FP8 storage (bernini.fp8.FP8Linear, loaded from converted files): its rows and scales joined
            fused = type(parts[0]).concat(parts)
        self.to_qkv = fused
        if not keep_separate:
            del self.to_q, self.to_k, self.to_v

    def self_query(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention's normed queries of x (fused: from the one QKV GEMM, so each product is the unchunked one)."""
        q = self.to_qkv(x).chunk(3, dim=-1)[0] if self.to_qkv is not None else self.to_q(x)
        return self.heads_of(self.norm_q(q))

    def self_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention's normed keys and values of x (fused: from the one QKV GEMM)."""
        if self.to_qkv is None:
            return self.key_value(x)
        _, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.heads_of(self.norm_k(k)), self.heads_of(v)

    def self_attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], sequence: LocalSequence) -> torch.Tensor:
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # views: the norms and RoPE read them in place
            q, k, v = self.heads_of(self.norm_q(q)), self.heads_of(self.norm_k(k)), self.heads_of(v)
        else:
            q = self.heads_of(self.norm_q(self.to_q(x)))
            k, v = self.key_value(x)
        out = sequence.attend(q, k, v, *rope).flatten(2).type_as(q)
        return self.to_out[0](out)

    def cross_attend(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.heads_of(self.norm_q(self.to_q(x)))
        k, v = kv
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        out = attention(q, k, v, allow_fp8=False).flatten(2).type_as(q)  # text attention: 0.6% of the time, kept exact
        return self.to_out[0](out)


def linear_gelu(x: torch.Tensor, linear: nn.Module, fuse: bool = True) -> torch.Tensor:
    """gelu_tanh(linear(x)). On CUDA the GELU runs in the GEMM's cuBLASLt epilogue (tanh form, on the float32
    accumulator): the FFN's widest tensor is written once instead of written, read and written again."""
    # Plain bf16/fp16 weights only: FP8 layers (ours, or torchao's weight subclass) take their own GEMM.
    plain = type(linear) is nn.Linear and type(linear.weight) is nn.Parameter and linear.bias is not None
    if fuse and plain and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and linear.weight.dtype == x.dtype:
        out = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


class FeedForward(nn.Module):
    fuse_gelu = True  # class-wide switch; benchmarks turn it off to measure the unfused form

    def __init__(self, dim: int, inner: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, inner)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](linear_gelu(x, self.net[0].proj, self.fuse_gelu))


def modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm + scale/shift chain before attention and the FFN, in float32, back in x's dtype."""
    return (norm(x.float()) * (1 + scale) + shift).type_as(x)


def gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gated residual x + y * gate, in float32, back in x's dtype."""
    return (x.float() + y.float() * gate).type_as(x)


MIN_RUN = 64  # tokens: shorter GEMMs take BLAS small-matrix paths whose rounding differs (below 12 rows on x86 MKL)


def token_spans(length: int, size: int) -> list[slice]:
    """Equal runs of at most ``size`` (at least MIN_RUN) tokens covering ``length``; one run when size is 0 or covers it.

    Equal runs, not a short remainder: a GEMM of a few rows rounds differently from the same rows in a large one.
    """
    runs = max(1, min(-(-length // size), length // MIN_RUN)) if size > 0 else 1
    edges = [length * i // runs for i in range(runs + 1)]
    return [slice(a, b) for a, b in pairwise(edges)]


def _splits_queries(sequence: LocalSequence) -> bool:
    # Queries may run in chunks only against the single-device hook: Ulysses exchanges whole sequences.
    return type(sequence) is LocalSequence


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        sequence: LocalSequence,
        chunk_tokens: int = 0,
    ) -> torch.Tensor:
        """x: [B, L, dim]; modulation: [B, 6, dim]; text_kv: this block's cross-attention K/V.

        chunk_tokens > 0: everything but the attention's keys and values runs over that many tokens (of the
        whole batch) at a time, and x is updated in place (the model passes a copy of its own).
        """
        mod = (self.scale_shift_table + modulation.float()).chunk(6, dim=1)
        runs = token_spans(x.shape[1], chunk_tokens // x.shape[0]) if chunk_tokens else []
        if len(runs) > 1:
            return self._chunked(x, mod, text_kv, rope, sequence, runs)
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        x = gated(x, self.attn1.self_attend(modulate(self.norm1, x, shift, scale), rope, sequence), gate)
        x = x + self.attn2.cross_attend(self.norm2(x.float()).type_as(x), text_kv)
        return gated(x, self.ffn(modulate(self.norm3, x, c_shift, c_scale)), c_gate)

    def _chunked(
        self,
        x: torch.Tensor,
        mod: tuple[torch.Tensor, ...],
        text_kv: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
        sequence: LocalSequence,
        runs: list[slice],
    ) -> torch.Tensor:
        """The same arithmetic run by run, so no [B, L, ffn_dim] hidden state or float32 copy of x exists at once.

        Every op is per token but attention, whose keys and values (of the block's input) are built whole first.
        GPU attention kernels treat each query row alone (given the hundred-odd query tiles a run of thousands of
        tokens makes over 40 heads: fewer, and flash kernels split the keys), so there the queries run in runs too;
        the CPU's SDPA blocks its queries by their count (a run would round differently), so there they attend whole.
        (--fp8_attention scales its queries per tensor, so there each run gets its own scale: lossy either way.)
        """
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        attn = self.attn1
        queries = [slice(0, x.shape[1])] if x.device.type == "cpu" else runs
        if _splits_queries(sequence):
            cos, sin = rope
            k = x.new_empty(*x.shape[:2], attn.heads, x.shape[2] // attn.heads)
            v = torch.empty_like(k)
            for s in runs:
                ks, vs = attn.self_key_value(modulate(self.norm1, x[:, s], shift, scale))
                k[:, s], v[:, s] = apply_rope(ks, cos[s], sin[s]), vs
            # A run's queries read x[:, s] before it is overwritten. Fused, the QKV GEMM runs again for them (its K/V
            # part unused): no whole [B, L, dim] of queries is kept, and no narrower GEMM that might round differently.
            for s in queries:
                q = apply_rope(attn.self_query(modulate(self.norm1, x[:, s], shift, scale)), cos[s], sin[s])
                x[:, s] = gated(x[:, s], attn.to_out[0](attention(q, k, v).flatten(2).type_as(q)), gate)
            del k, v
        else:
            y = attn.self_attend(torch.cat([modulate(self.norm1, x[:, s], shift, scale) for s in runs], dim=1), rope, sequence)
            for s in runs:
                x[:, s] = gated(x[:, s], y[:, s], gate)
            del y
        for s in queries:
            run = x[:, s]
            run.add_(self.attn2.cross_attend(self.norm2(run.float()).type_as(run), text_kv))
        for s in runs:
            run = x[:, s]
            run.copy_(gated(run, self.ffn(modulate(self.norm3, run, c_shift, c_scale)), c_gate))
        return x


TextKV = list[tuple[torch.Tensor, torch.Tensor]]


class WanTransformer(nn.Module):
    """One Bernini-R expert. Tokens in, per-token patch predictions [B, L, C*pt*ph*pw] out."""

    # Parameters whose dotted name has one of these parts stay float32 when loaded (the weight loader's
    # default): diffusers' WanTransformer3DModel._keep_in_fp32_modules, minus "rope" (no stored weights).
    keep_fp32: tuple[str, ...] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

    def __init__(self, cfg: TransformerConfig, sequence: LocalSequence | None = None, chunk_tokens: int = 0):
        super().__init__()
        self.cfg = cfg
        self.sequence = sequence or LocalSequence()
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, cfg.dim))
        self.chunk_tokens = chunk_tokens  # > 0: activations in runs of this many tokens (exact; the memory plan sets it)

    def embed(self, packed: torch.Tensor) -> torch.Tensor:
        """Patch-embed packed patches [B, L, (pt ph pw c)] -> tokens [B, L, dim].

        Equal to the Conv3d with kernel = stride = patch size, applied per patch.
        """
        w = self.patch_embedding.weight  # [dim, c, pt, ph, pw]
        w = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
        return F.linear(packed.to(w.dtype), w, self.patch_embedding.bias)

    def encode_text(self, text: torch.Tensor) -> TextKV:
        """Cross-attention K/V of every block for text embeddings [B, 512, text_dim]; once per case."""
        context = self.condition_embedder.text_embedder(text.to(self.proj_out.weight.dtype))
        return [block.attn2.key_value(context) for block in self.blocks]

    def forward(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        text_kv: TextKV,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """tokens: [B, L, dim]; timestep: [B]; rope: cos/sin [L, head_dim/2] -> [B, L, patch_features]."""
        temb, modulation = self.condition_embedder.time(timestep, text_kv[0][0].dtype)
        x = self.sequence.shard(tokens)
        if self.chunk_tokens:
            x = x.clone(memory_format=torch.contiguous_format)  # the chunked blocks update it in place
        for block, kv in zip(self.blocks, text_kv, strict=True):
            x = block(x, modulation, kv, rope, self.sequence, self.chunk_tokens)
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        runs = [self.proj_out(modulate(self.norm_out, x[:, s], shift, scale)) for s in token_spans(x.shape[1], self.chunk_tokens // x.shape[0])]
        return self.sequence.gather(runs[0] if len(runs) == 1 else torch.cat(runs, dim=1))


def checkpoint_keys(key: str) -> list[str]:
    """The checkpoint keys whose tensors make up a model key's, in row order (the fused QKV is to_q's, to_k's, to_v's rows)."""
    if ".to_qkv." not in key:
        return [key]
    return [key.replace(".to_qkv.", f".to_{part}.") for part in "qkv"]


def fuse_projections(model: WanTransformer) -> None:
    """The lossless fusions that need loaded weights (today: self-attention's QKV projection), every block."""
    for block in model.blocks:
        block.attn1.fuse_qkv()


def compile_blocks(model: WanTransformer, mode: str | None = None) -> None:
    """Regional torch.compile: every block shares one compiled graph per sequence length.

    ``mode``: torch.compile's (benchmarks try "max-autotune-no-cudagraphs": Triton GEMM templates with epilogues).
    """
    import torch._dynamo

    # One graph per (length, batch) bucket; a batch of cases of many sizes must not fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.blocks:
        block.compile(dynamic=False, mode=mode)


def patchify(latent: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] -> packed [B, (T/pt)(H/ph)(W/pw), pt*ph*pw*C] in (t h w)(pt ph pw c) order."""
    b, c, t, h, w = latent.shape
    pt, ph, pw = patch
    x = latent.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(packed: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of patchify: packed [B, L, pt*ph*pw*C] on token grid (T', H', W') -> [B, C, T, H, W]."""
    b = packed.shape[0]
    (t, h, w), (pt, ph, pw) = grid, patch
    x = packed.reshape(b, t, h, w, pt, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, t * pt, h * ph, w * pw)
