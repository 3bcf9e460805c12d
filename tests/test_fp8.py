"""FP8 weight storage: round-trip error bounds, half the bytes, converted on load, tiny renders within tolerance.

Tolerances (measured on the tiny checkpoint, v2v_case1, 4 steps, CPU): the final latent with fp8 weights
differs from the same run with full-precision weights by a relative L2 error of 0.30% in float32 and
0.98% in bfloat16 (which adds its own rounding). The tests allow 2% and 3%: FP8 is lossy, so they also
check that the result is not identical. Offloading fp8 weights is still lossless (bit-identical).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bernini import fp8, offload
from bernini.cases import Case, load_case_file
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.models.transformer import Block, TransformerConfig
from bernini.pipeline import Renderer

REPO = Path(__file__).resolve().parent.parent
CASE = REPO / "assets" / "testcases" / "v2v" / "v2v_case1.json"
SMALL = GenerationSettings(num_inference_steps=4, max_image_size=64, num_frames=5)
RENDER_RTOL = {"float32": 0.02, "bfloat16": 0.03}  # relative L2 of the final latent vs full-precision weights
E4M3_REL = 2.0**-4  # half an ulp of a 3-bit mantissa: the worst relative rounding of a normal value
E4M3_SUBNORMAL_ABS = 2.0**-10  # half the subnormal spacing (2^-9), in units of the row scale


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.fixture(scope="module")
def case() -> Case:
    return load_case_file(CASE)


def render(config: str, case: Case, **runtime: object) -> torch.Tensor:
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", attention="sdpa", **runtime))  # type: ignore[arg-type]
    latent = renderer.render(case, SMALL).latent
    assert latent is not None
    return latent


# --------------------------------------------------------------------------- quantization


def test_round_trip_error_is_bounded_per_element() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512) * torch.logspace(-3, 1, 256)[:, None]  # rows of very different magnitudes
    q, scale = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (256,)
    back = fp8.dequantize(q, scale, torch.float32)
    bound = torch.maximum(w.abs() * E4M3_REL, scale[:, None] * E4M3_SUBNORMAL_ABS) * (1 + 1e-5)
    assert ((back - w).abs() <= bound).all()
    assert rel_l2(back, w) < 0.03  # about 2.6% for Gaussian rows
    amax = w.abs().amax(dim=1)
    assert torch.allclose(back.abs().amax(dim=1), amax, rtol=1e-6)  # each row's largest value maps to 448 exactly


def test_zero_and_tiny_rows_stay_finite() -> None:
    w = torch.zeros(4, 16)
    w[1] = 1e-30
    q, scale = fp8.quantize(w)
    back = fp8.dequantize(q, scale, torch.float32)
    assert torch.isfinite(back).all() and back.abs().max() < 1e-20


def test_fp8_linear_matches_linear_within_fp8_error() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(512, 256)
    x = torch.randn(8, 512)
    quantized = fp8.FP8Linear.from_linear(linear)
    assert torch.equal(quantized.bias, linear.bias)  # biases keep their dtype and values
    assert rel_l2(quantized(x), linear(x)) < 0.04
    exact = nn.functional.linear(x, fp8.dequantize(quantized.weight, quantized.weight_scale, torch.float32), linear.bias)
    assert torch.allclose(quantized(x), exact, rtol=1e-5, atol=1e-5)  # scaling the output equals dequantizing the weight


def test_quantize_linears_swaps_every_block_linear() -> None:
    cfg = TransformerConfig(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, text_dim=32, freq_dim=32, num_layers=1)
    block = Block(cfg)
    assert fp8.quantize_linears(block) == 10  # q/k/v/out of self- and cross-attention, FFN in and out
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert block.attn1.to_q.weight.dtype == torch.float8_e4m3fn and block.ffn.net[2].weight.dtype == torch.float8_e4m3fn


def test_quantized_weights_take_about_half_of_bf16() -> None:
    linear = nn.Linear(1024, 1024, dtype=torch.bfloat16)
    before = fp8.linear_weight_bytes(linear)
    holder = nn.Sequential(linear)
    fp8.quantize_linears(holder)
    after = fp8.linear_weight_bytes(holder)
    assert before == 1024 * 1024 * 2 and after / before == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- loading and rendering


def test_conversion_happens_block_by_block_on_load(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block is quantized right after it loads, while the later blocks are still unloaded (meta)."""
    loading: list[nn.ModuleList] = []
    seen: list[tuple[int, bool]] = []
    real_quantize, real_load = fp8.quantize_linears, offload.load_blockwise

    def load_blockwise(model: nn.Module, *args: object, **kwargs: object) -> None:
        loading.append(model.blocks)
        real_load(model, *args, **kwargs)  # type: ignore[arg-type]

    def quantize_linears(module: nn.Module, use_scaled_mm: bool = False) -> int:
        blocks = list(loading[-1])
        index = blocks.index(module)
        seen.append((index, all(p.is_meta for b in blocks[index + 1 :] for p in b.parameters())))
        return real_quantize(module, use_scaled_mm)

    monkeypatch.setattr(offload, "load_blockwise", load_blockwise)
    monkeypatch.setattr(fp8, "quantize_linears", quantize_linears)
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", weights="fp8"))
    assert seen == [(0, True), (1, True), (0, True), (1, True)]  # two experts of two blocks
    assert renderer.experts["high"].blocks[0].attn2.to_k.weight.dtype == torch.float8_e4m3fn
    assert renderer.experts["high"].proj_out.weight.dtype == torch.float32  # only block Linears are converted


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_render_is_close_to_full_precision(config: str, case: Case, dtype: str) -> None:
    full = render(config, case, dtype=dtype)
    quantized = render(config, case, dtype=dtype, weights="fp8")
    error = rel_l2(quantized, full)
    assert 0 < error < RENDER_RTOL[dtype]


@pytest.mark.parametrize("mode", ["expert", "block"])
def test_offloading_fp8_weights_is_lossless(config: str, case: Case, mode: str) -> None:
    assert torch.equal(render(config, case, dtype="float32", weights="fp8", offload=mode), render(config, case, dtype="float32", weights="fp8"))


# --------------------------------------------------------------------------- CUDA only


def scaled_mm_device() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not scaled_mm_device(), reason="torch._scaled_mm needs a CUDA GPU of compute capability >= 8.9")
def test_scaled_mm_path_agrees_with_dequantized_path() -> None:
    assert fp8.scaled_mm_supported(torch.device("cuda"))
    torch.manual_seed(0)
    linear = nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)
    fast = fp8.FP8Linear.from_linear(linear, use_scaled_mm=True)
    slow = fp8.FP8Linear.from_linear(linear, use_scaled_mm=False)
    out = fast(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 300, 512)
    assert rel_l2(out, slow(x)) < 0.05  # the activations are quantized per token too
    assert rel_l2(out, linear(x)) < 0.06


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp8_render_is_close(config: str, case: Case) -> None:
    def run(weights: str) -> torch.Tensor:
        r = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cuda", dtype="bfloat16", attention="sdpa", weights=weights, offload="none"))
        return r.render(case, SMALL).latent

    assert rel_l2(run("fp8"), run("bf16")) < 0.05
