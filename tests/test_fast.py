"""Fast mode: the fused QKV projection (lossless), the flags of the lossy options and their fallbacks, and (on a GPU)
each lossy option's error bound.

CPU tests check the plumbing: what each flag turns on, that nothing lossy is on unless named, that 'auto' falls
back to the exact path (bit-identical renders) where a card or package lacks FP8, that a named option that cannot
run is a clear error, and that cross-attention never takes the 8-bit kernel. GPU tests bound each option's error
against the exact path at head size 128 (the A14B's), on random weights: they are sanity bounds that catch a
broken kernel or layout, not a measurement of quality on the real weights (benchmarks/bench_fast.py measures).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn

from bernini import attention, fp8
from bernini.cases import Case, load_case_file
from bernini.cli import build_parser, runtime_from
from bernini.config import FAST_PRESET, GenerationSettings, RuntimeConfig
from bernini.models import rope_tables
from bernini.models.transformer import Block, LocalSequence, TransformerConfig, WanTransformer, fuse_projections, patchify, unpatchify
from bernini.pipeline import Renderer

REPO = Path(__file__).resolve().parent.parent
CASE = REPO / "assets" / "testcases" / "v2v" / "v2v_case1.json"
SMALL = GenerationSettings(num_inference_steps=3, max_image_size=64, num_frames=5)
TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
CUDA = torch.cuda.is_available()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten().float(), b.detach().flatten().float(), dim=0))


@pytest.fixture(autouse=True)
def exact_attention():
    """Each test starts and ends on the exact backends (the module keeps its choice process-wide)."""
    saved = dict(attention._state)
    yield
    attention._state.update(saved)


@pytest.fixture(scope="module")
def case() -> Case:
    return load_case_file(CASE)


def render(config: str, case: Case, **runtime: object) -> torch.Tensor:
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", **runtime))  # type: ignore[arg-type]
    latent = renderer.render(case, SMALL).latent
    assert latent is not None
    return latent


def randomized(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# --------------------------------------------------------------------------- fused QKV (lossless)


def test_fused_qkv_equals_diffusers() -> None:
    """Against an independent implementation: diffusers' WanTransformer3DModel with its three separate projections."""
    ref = randomized(WanTransformer3DModel(**TINY), seed=0).eval()
    ours = WanTransformer(TransformerConfig.from_dict(TINY)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    fuse_projections(ours)
    assert all(b.attn1.to_qkv is not None and not hasattr(b.attn1, "to_q") for b in ours.blocks)
    g = torch.Generator().manual_seed(1)
    latent, text, t = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g), torch.tensor([937.0, 500.0])
    cos, sin = rope_tables([(3, 2, 3)], [0.0], 24, "cpu")
    with torch.no_grad():
        expected = ref(latent, t, text, return_dict=False)[0]
        got = unpatchify(ours(ours.embed(patchify(latent, (1, 2, 2))), t, ours.encode_text(text), (cos, sin)), (3, 2, 3), (1, 2, 2))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_weight_is_the_three_projections_stacked() -> None:
    block = randomized(Block(TransformerConfig(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, text_dim=32, freq_dim=32, num_layers=1)), 2)
    q, k, v = (copy.deepcopy(getattr(block.attn1, n)) for n in ("to_q", "to_k", "to_v"))
    block.attn1.fuse_qkv()
    fused = block.attn1.to_qkv
    assert fused.weight.shape == (3 * 48, 48)
    assert torch.equal(fused.weight, torch.cat([q.weight, k.weight, v.weight])) and torch.equal(fused.bias, torch.cat([q.bias, k.bias, v.bias]))
    assert block.attn2.to_q.weight.shape == (48, 48)  # cross-attention keeps its layers (its K/V read the text)


def test_loaded_renderer_fuses_after_loading_and_checkpoint_keys_stay(config: str) -> None:
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa"))
    expert = renderer.experts["high"]
    keys = set(expert.state_dict())
    assert {"blocks.0.attn1.to_qkv.weight", "blocks.0.attn2.to_q.weight"} <= keys and "blocks.0.attn1.to_q.weight" not in keys
    from safetensors.torch import load_file

    folder = Path(config) / "transformer"
    saved: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(file))
    assert "blocks.0.attn1.to_q.weight" in saved and not any("to_qkv" in k for k in saved)  # checkpoints keep their keys
    stacked = torch.cat([saved[f"blocks.1.attn1.to_{p}.weight"] for p in "qkv"]).float()
    assert torch.equal(expert.blocks[1].attn1.to_qkv.weight, stacked)


def test_fused_and_separate_projections_render_the_same(config: str, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    fused = render(config, case)
    monkeypatch.setattr("bernini.models.transformer.Attention.fuse_qkv", lambda self, keep_separate=False: None)
    separate = render(config, case)
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- flags


def runtime_of(*argv: str) -> RuntimeConfig:
    return runtime_from(build_parser("test").parse_args(list(argv)))


def test_exact_path_is_the_default() -> None:
    runtime = runtime_of()
    assert (runtime.fp8_gemm, runtime.fp8_attention, runtime.weights, runtime.lossy) == ("off", "off", "bf16", False)
    assert RuntimeConfig().lossy is False


@pytest.mark.parametrize(
    ("argv", "gemm", "attn"),
    [
        (["--fast"], "auto", "auto"),
        (["--fp8_gemm"], "auto", "off"),  # a bare flag means auto
        (["--fp8_attention"], "off", "auto"),
        (["--fp8_gemm", "torchao"], "torchao", "off"),
        (["--fp8_attention", "sage"], "off", "sage"),
        (["--fast", "--fp8_gemm", "off"], "off", "auto"),  # a named flag overrides the preset
        (["--fast", "--fp8_attention", "cudnn_fp8"], "auto", "cudnn_fp8"),
    ],
)
def test_fast_flags(argv: list[str], gemm: str, attn: str) -> None:
    runtime = runtime_of(*argv)
    assert (runtime.fp8_gemm, runtime.fp8_attention) == (gemm, attn)
    assert runtime.lossy is (gemm != "off" or attn != "off")


def test_fast_preset_is_every_option_in_its_fallback_form() -> None:
    assert FAST_PRESET == {"fp8_gemm": "auto", "fp8_attention": "auto"}


def test_unknown_choices_are_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser("test").parse_args(["--fp8_attention", "fa3_fp8"])
    with pytest.raises(ValueError, match=r"fp8_gemm must be one of off, auto, scaled_mm, torchao, got --fp8_gemm int8"):
        RuntimeConfig(fp8_gemm="int8")
    with pytest.raises(ValueError, match=r"--fp8_gemm torchao.*--weights fp8"):
        RuntimeConfig(fp8_gemm="torchao", weights="fp8")


# --------------------------------------------------------------------------- fallbacks without FP8


def ampere(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A CUDA device of compute capability 8.0 (no FP8 tensor cores), as far as the capability checks can tell."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    return torch.device("cuda")


def test_fp8_gemm_reasons_without_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fp8.gemm_unusable("scaled_mm", torch.device("cpu")) == "needs a CUDA device"
    why = fp8.gemm_unusable("torchao", ampere(monkeypatch))
    assert why is not None and "compute capability >= 8.9" in why and "8.0" in why


def test_fp8_attention_reasons_without_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(attention.available_fp8_backends("cpu").values()) == {"needs a CUDA device"}
    device = ampere(monkeypatch)
    assert attention._why_unusable(attention.FP8_BACKENDS["cudnn_fp8"], device) == "not used on compute capability 8.0"


def test_auto_falls_back_with_a_warning_and_named_options_fail(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert fp8.select_gemm("auto", "cpu") is None
        assert attention.select_fp8_attention("auto", "cpu") is None
    assert "Linear layers stay exact" in caplog.text and "self-attention stays exact" in caplog.text
    assert attention.current_fp8_backend() is None
    with pytest.raises(ValueError, match=r"--fp8_gemm scaled_mm: needs a CUDA device; use --fp8_gemm auto"):
        fp8.select_gemm("scaled_mm", "cpu")
    with pytest.raises(ValueError, match=r"--fp8_attention sage: needs a CUDA device; use --fp8_attention auto"):
        attention.select_fp8_attention("sage", "cpu")
    with pytest.raises(ValueError, match=r"unknown --fp8_attention 'int8'.*cudnn_fp8, sage"):
        attention.select_fp8_attention("int8", "cpu")


def test_fast_on_a_card_without_fp8_renders_the_exact_result(config: str, case: Case) -> None:
    exact = render(config, case)
    fast = render(config, case, fp8_gemm="auto", fp8_attention="auto")
    assert torch.equal(fast, exact)


def test_render_info_says_what_ran(config: str, case: Case) -> None:
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", fp8_gemm="auto", fp8_attention="auto"))
    info = renderer.render(case, dataclasses.replace(SMALL, num_inference_steps=1)).info
    assert info["fp8_gemm"] is None and info["fp8_attention"] is None and info["attention_backend"] == "sdpa"  # asked auto, ran exact


def test_named_option_that_cannot_run_fails_before_loading(config: str) -> None:
    with pytest.raises(ValueError, match=r"--fp8_gemm torchao: needs a CUDA device"):
        Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", fp8_gemm="torchao"))


# --------------------------------------------------------------------------- what each option touches


def test_cross_attention_never_takes_the_8bit_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = attention.attention

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow_fp8: bool = True) -> torch.Tensor:
        calls.append(allow_fp8)
        return real(q, k, v, allow_fp8)

    monkeypatch.setattr("bernini.models.transformer.attention", recording)  # self-attention (LocalSequence) and cross
    block = randomized(Block(TransformerConfig(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, text_dim=32, freq_dim=32, num_layers=1)), 3)
    with torch.no_grad():
        kv = block.attn2.key_value(torch.randn(1, 7, 48))
        block(torch.randn(1, 12, 48), torch.randn(1, 6, 48), kv, rope_tables([(2, 2, 3)], [0.0], 24, "cpu"), LocalSequence())
    assert calls == [True, False]


def test_8bit_kernel_serves_only_cuda_half_types() -> None:
    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the 8-bit kernel ran")

    attention._state.update(fp8_name="sage", fp8_fn=broken)
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(attention.attention(q, k, v), expected)  # CPU float32: the exact path


def test_gemm_policy_keeps_the_edge_blocks_and_the_text_projections() -> None:
    policy = fp8.DEFAULT_POLICY
    assert not policy.selects(0, 40, "ffn.net.2") and not policy.selects(39, 40, "ffn.net.2")
    assert policy.selects(1, 40, "ffn.net.2") and policy.selects(38, 40, "attn1.to_qkv") and policy.selects(20, 40, "attn2.to_q")
    assert not policy.selects(20, 40, "attn2.to_k") and not policy.selects(20, 40, "attn2.to_v")
    assert fp8.GemmPolicy(keep_blocks=()).selects(0, 40, "attn1.to_out.0")


def test_convert_gemms_swaps_the_selected_layers() -> None:
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, text_dim=32, freq_dim=32, num_layers=3)
    block = randomized(Block(cfg), 4)
    block.attn1.fuse_qkv()
    x = torch.randn(1, 12, 48)
    before = block.ffn(x)
    assert fp8.convert_gemms(copy.deepcopy(block), "scaled_mm", index=0, count=3) == 0  # an edge block stays whole
    assert fp8.convert_gemms(block, "scaled_mm", index=1, count=3) == 6  # qkv, out, cross q/out, FFN in/out
    assert type(block.attn2.to_k) is nn.Linear and type(block.attn2.to_v) is nn.Linear
    converted = [block.attn1.to_qkv, block.attn1.to_out[0], block.attn2.to_q, block.attn2.to_out[0], block.ffn.net[0].proj, block.ffn.net[2]]
    assert all(isinstance(m, fp8.FP8Linear) and m.use_scaled_mm for m in converted)
    assert 0 < rel_l2(block.ffn(x), before) < 0.06  # on the CPU the FP8 weights are dequantized: weight rounding only


# --------------------------------------------------------------------------- GPU: each option's error bound


def fp8_card() -> bool:
    return CUDA and torch.cuda.get_device_capability() >= (8, 9)


def realistic_activations(tokens: int, dim: int, seed: int) -> torch.Tensor:
    """LayerNorm-like rows with a few outlier channels, as the blocks' inputs have."""
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(1, tokens, dim, generator=g, device="cuda")
    x[..., :8] *= 8.0
    return x.to(torch.bfloat16)


@pytest.mark.skipif(not fp8_card(), reason="FP8 GEMMs need a CUDA GPU of compute capability >= 8.9")
@pytest.mark.parametrize("backend", fp8.GEMM_BACKENDS)
def test_fp8_gemm_error_bound(backend: str) -> None:
    why = fp8.gemm_unusable(backend, torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(5120, 5120, device="cuda", dtype=torch.bfloat16)
    exact = copy.deepcopy(holder.proj)
    x = realistic_activations(2048, 5120, 1)
    assert fp8.convert_gemms(holder, backend, index=1, count=3, policy=fp8.GemmPolicy(keep_blocks=(), keep_layers=())) == 1
    with torch.no_grad():
        out, reference = holder.proj(x), F.linear(x.double(), exact.weight.double(), exact.bias.double())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert rel_l2(out, reference) < 0.05 and cosine(out, reference) > 0.998
    assert rel_l2(exact(x), reference) < 0.01  # the bf16 GEMM, for scale


@pytest.mark.skipif(not CUDA, reason="8-bit attention needs a CUDA GPU")
@pytest.mark.parametrize("backend", list(attention.FP8_BACKENDS))
def test_fp8_attention_error_bound(backend: str) -> None:
    why = attention._why_unusable(attention.FP8_BACKENDS[backend], torch.device("cuda"), probe=True)
    if why is not None:
        pytest.skip(why)
    attention.select_fp8_attention(backend, "cuda")
    g = torch.Generator("cuda").manual_seed(0)
    norm = nn.RMSNorm(128, device="cuda")  # q and k come out of RMSNorm in the model
    q, k = (norm(torch.randn(1, 4099, 8, 128, generator=g, device="cuda") * 2).to(torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 4099, 8, 128, generator=g, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        out = attention.attention(q, k, v)
        reference = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        exact = attention.attention(q, k, v, allow_fp8=False)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert rel_l2(out, reference) < 0.1 and cosine(out, reference) > 0.995
    assert rel_l2(exact, reference) < 0.01


def small_expert(seed: int) -> WanTransformer:
    """4 blocks at the A14B's head size (128) on the GPU, bf16 (float32 where the model keeps it)."""
    cfg = TransformerConfig(num_attention_heads=8, attention_head_dim=128, ffn_dim=2816, text_dim=256, freq_dim=256, num_layers=4)
    model = WanTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as benchmarks/common.random_expert: 1/sqrt(fan-in) matrices, small biases, norm gains near 1
        for name, p in model.named_parameters():
            data = torch.randn(p.shape, generator=g)
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                p.copy_(1.0 + 0.05 * data)
            else:
                p.copy_(data / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.02 * data)
    for name, p in model.named_parameters():
        p.data = p.data.to("cuda", torch.float32 if any(part in WanTransformer.keep_fp32 for part in name.split(".")) else torch.bfloat16)
    return model.eval().requires_grad_(False)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fused_qkv_on_cuda_is_bf16_noise() -> None:
    """The fused GEMM hands strided q/k/v views to every installed exact backend: same result as separate GEMMs."""
    separate = small_expert(5)
    fused = copy.deepcopy(separate)
    fuse_projections(fused)
    tokens, kv_text = torch.randn(1, 1536, 1024, device="cuda", dtype=torch.bfloat16), torch.randn(1, 64, 256, device="cuda", dtype=torch.bfloat16)
    rope = rope_tables([(4, 16, 24)], [0.0], 128, "cuda")
    t = torch.tensor([700.0], device="cuda")
    for backend, why in attention.available_backends("cuda").items():
        if why is not None:
            continue
        attention.select_backend(backend, "cuda")
        with torch.no_grad():
            a = separate(tokens, t, separate.encode_text(kv_text), rope)
            b = fused(tokens, t, fused.encode_text(kv_text), rope)
        assert rel_l2(b, a) < 1e-2, backend


@pytest.mark.skipif(not fp8_card(), reason="the fast options need a CUDA GPU with FP8 (compute capability >= 8.9)")
@pytest.mark.parametrize("option", ["gemm", "attention", "fast"])
def test_fast_forward_error_bound(option: str) -> None:
    """A 4-block model at head size 128: each option's forward against the exact forward (issue 17: cosine >= 0.995)."""
    exact_model = small_expert(6)
    fast_model = copy.deepcopy(exact_model)
    fuse_projections(exact_model)
    fuse_projections(fast_model)
    if option in ("gemm", "fast"):
        backend = fp8.select_gemm("auto", "cuda")
        assert backend is not None
        converted = sum(fp8.convert_gemms(b, backend, i, len(fast_model.blocks)) for i, b in enumerate(fast_model.blocks))
        assert converted == 2 * 6  # the two middle blocks, six layers each
    g = torch.Generator("cuda").manual_seed(7)
    tokens = torch.randn(1, 3072, 1024, generator=g, device="cuda").to(torch.bfloat16)
    text = torch.randn(1, 128, 256, generator=g, device="cuda").to(torch.bfloat16)
    rope = rope_tables([(4, 24, 32)], [0.0], 128, "cuda")
    t = torch.tensor([800.0], device="cuda")
    attention.select_backend("auto", "cuda")
    with torch.no_grad():
        exact = exact_model(tokens, t, exact_model.encode_text(text), rope)
        if option in ("attention", "fast") and attention.select_fp8_attention("auto", "cuda") is None:
            pytest.skip("no 8-bit attention backend is installed")
        out = fast_model(tokens, t, fast_model.encode_text(text), rope)
    assert out.shape == exact.shape and torch.isfinite(out).all()
    assert cosine(out, exact) >= 0.995 and 0 < rel_l2(out, exact) < 0.1
