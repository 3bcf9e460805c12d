"""Our transformer against diffusers' WanTransformer3DModel on the same random weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from bernini.models import rope_tables
from bernini.models.transformer import TransformerConfig, WanTransformer, linear_gelu, patchify, unpatchify

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[WanTransformer3DModel, WanTransformer]:
    ref = randomized(WanTransformer3DModel(**TINY), seed=0).eval()
    ours = WanTransformer(TransformerConfig.from_dict(TINY)).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref, ours


def test_parameter_names_equal_diffusers(pair) -> None:
    ref, ours = pair
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())


@pytest.mark.parametrize("shape", [(1, 3, 4, 6), (2, 1, 6, 4)])
def test_single_source_equals_diffusers(pair, shape) -> None:
    ref, ours = pair
    b, t, h, w = shape
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(b, 16, t, h, w, generator=g)
    text = torch.randn(b, 7, 32, generator=g)
    timestep = torch.tensor([937.0] * b)
    with torch.no_grad():
        expected = ref(latent, timestep, text, return_dict=False)[0]
        grid = (t, h // 2, w // 2)
        cos, sin = rope_tables([grid], [0.0], 24, "cpu")
        packed = ours(ours.embed(patchify(latent, (1, 2, 2))), timestep, ours.encode_text(text), (cos, sin))
        got = unpatchify(packed, grid, (1, 2, 2))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_patchify_roundtrip_and_conv_equivalence(pair) -> None:
    _, ours = pair
    latent = torch.randn(1, 16, 2, 4, 6)
    packed = patchify(latent, (1, 2, 2))
    assert torch.equal(unpatchify(packed, (2, 2, 3), (1, 2, 2)), latent)
    with torch.no_grad():
        conv = ours.patch_embedding(latent).flatten(2).transpose(1, 2)
        torch.testing.assert_close(ours.embed(packed), conv, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_equal_eager(pair) -> None:
    import copy

    from bernini.models import compile_blocks

    _, ours = pair
    compiled = copy.deepcopy(ours)
    compile_blocks(compiled)
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(1, 2 * 2 * 3, 64, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    cos, sin = rope_tables([(2, 2, 3)], [0.0], 24, "cpu")
    t = torch.tensor([500.0])
    with torch.no_grad():
        eager = ours(ours.embed(packed), t, ours.encode_text(text), (cos, sin))
        fast = compiled(compiled.embed(packed), t, compiled.encode_text(text), (cos, sin))
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)


def test_block_compiles_without_graph_breaks(pair) -> None:
    import torch._dynamo

    _, ours = pair
    block = ours.blocks[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 48, generator=g)
    modulation = torch.randn(2, 6, 48, generator=g)
    kv = ours.encode_text(torch.randn(2, 7, 32, generator=g))[0]
    rope = rope_tables([(2, 2, 3)], [0.0], 24, "cpu")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, modulation, kv, rope, ours.sequence)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_flash_kernels_are_opaque_to_the_compiler() -> None:
    """The FA3/FA4/FA2 call is a custom op: dynamo keeps one graph around a kernel it cannot trace."""
    import torch._dynamo

    from bernini import attention

    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    saved = dict(attention._state)
    attention._state.update(name="fa4", fn=attention._sdpa)  # a stand-in kernel that runs on the CPU
    try:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda a, b, c: attention._kernel(a, b, c) * 2)(q, k, v)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch.testing.assert_close(attention._kernel(q, k, v), attention._sdpa(q, k, v))
    finally:
        attention._state.update(saved)


def test_linear_gelu_without_cuda_is_the_plain_form() -> None:
    linear = torch.nn.Linear(16, 32)
    x = torch.randn(2, 5, 16)
    assert torch.equal(linear_gelu(x, linear), F.gelu(linear(x), approximate="tanh"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cuBLASLt GELU epilogue)")
def test_fused_gelu_is_the_tanh_gelu_within_bf16_rounding() -> None:
    """The epilogue form against a float64 re-computation: no further from it than the unfused bf16 form."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 1024).cuda().bfloat16()
    x = torch.randn(3, 77, 256, device="cuda", dtype=torch.bfloat16)
    exact = F.gelu(F.linear(x.double(), linear.weight.double(), linear.bias.double()), approximate="tanh")
    fused, plain = linear_gelu(x, linear), linear_gelu(x, linear, fuse=False)
    scale = exact.abs().max()
    assert fused.shape == plain.shape == exact.shape and fused.dtype == torch.bfloat16
    assert (fused.double() - exact).abs().max() / scale < 1e-2
    assert (fused.double() - exact).abs().max() <= (plain.double() - exact).abs().max() * 1.5
