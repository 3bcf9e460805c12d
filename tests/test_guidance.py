"""Tests for bernini.guidance against an independent float64 numpy re-computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bernini.guidance import (
    GUIDANCE_MODES,
    APGSettings,
    GuidancePass,
    GuidanceScales,
    combine,
    get_mode,
    new_state,
    required_visuals,
)

B, T, TOKENS_PER_FRAME, C = 1, 3, 4, 64
L = T * TOKENS_PER_FRAME
SCALES = GuidanceScales(vid=1.25, img=4.5, txt=4.0)
NON_APG_TOL = 1e-6
APG_TOL = 1e-6

EXPECTED_PASSES: dict[str, set[tuple[str, str]]] = {
    "rv2v": {("none", "u"), ("V", "u"), ("VI", "u"), ("VI", "c")},
    "v2v": {("VI", "u"), ("VI", "c")},
    "v2v_chain": {("none", "u"), ("V", "u"), ("VI", "c")},
    "t2v": {("none", "u"), ("none", "c")},
    "t2v_apg": {("none", "u"), ("none", "c")},
    "v2v_apg": {("VI", "u"), ("VI", "c")},
    "r2v_apg": {("none", "u"), ("I", "u"), ("I", "c")},
}


def make_inputs(
    mode_name: str, dtype: torch.dtype, seed: int
) -> tuple[dict[GuidancePass, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    preds = {
        GuidancePass(*pair): torch.randn(B, L, C, generator=gen).to(dtype)
        for pair in sorted(EXPECTED_PASSES[mode_name])
    }
    x_t = torch.randn(B, L, C, generator=gen, dtype=torch.float32)
    return preds, x_t


def as64(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float64).numpy()


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float) -> None:
    assert actual.dtype == torch.float32
    assert tuple(actual.shape) == expected.shape
    err = np.max(np.abs(as64(actual) - expected))
    assert err <= tol * np.max(np.abs(expected)), f"max abs error {err}"


def ref_non_apg(mode_name: str, e: dict[tuple[str, str], np.ndarray], s: GuidanceScales) -> np.ndarray:
    if mode_name == "rv2v":
        return (
            e["none", "u"]
            + s.vid * (e["V", "u"] - e["none", "u"])
            + s.img * (e["VI", "u"] - e["V", "u"])
            + s.txt * (e["VI", "c"] - e["VI", "u"])
        )
    if mode_name == "v2v":
        return e["VI", "u"] + s.txt * (e["VI", "c"] - e["VI", "u"])
    if mode_name == "v2v_chain":
        return (
            e["none", "u"]
            + s.vid * (e["V", "u"] - e["none", "u"])
            + s.txt * (e["VI", "c"] - e["V", "u"])
        )
    if mode_name == "t2v":
        return e["none", "u"] + s.txt * (e["none", "c"] - e["none", "u"])
    raise AssertionError(mode_name)


class RefTerm:
    """Reference N(d; base) with its own momentum buffer, looping over batch and frames."""

    def __init__(self) -> None:
        self.running: np.ndarray | None = None
        self.clipped_frames = 0

    def __call__(
        self, d: np.ndarray, base: np.ndarray, eta: float, thr: float, momentum: float
    ) -> np.ndarray:
        running = d.copy() if self.running is None else d + momentum * self.running
        self.running = running
        out = np.empty_like(d)
        dv = running.reshape(d.shape[0], T, -1)
        bv = base.reshape(d.shape[0], T, -1)
        ov = out.reshape(d.shape[0], T, -1)
        for b in range(d.shape[0]):
            for t in range(T):
                vec = dv[b, t].copy()
                norm = float(np.sqrt(np.sum(vec * vec)))
                if thr > 0 and norm > thr:
                    vec = vec * (thr / norm)
                    self.clipped_frames += 1
                unit = bv[b, t] / max(float(np.sqrt(np.sum(bv[b, t] ** 2))), 1e-12)
                par = float(np.dot(vec, unit)) * unit
                ov[b, t] = (vec - par) + eta * par
        return out


def ref_apg_step(
    mode_name: str,
    e: dict[tuple[str, str], np.ndarray],
    x_t: np.ndarray,
    sigma: float,
    s: GuidanceScales,
    apg: APGSettings,
    terms: dict[str, RefTerm],
) -> np.ndarray:
    x = {k: x_t - sigma * v for k, v in e.items()}
    thr = list(apg.norm_threshold)
    if mode_name in ("t2v_apg", "v2v_apg"):
        vis = "none" if mode_name == "t2v_apg" else "VI"
        xu, xc = x[vis, "u"], x[vis, "c"]
        guided = xu + s.txt * terms["txt"](xc - xu, xc, apg.eta, thr[0], apg.momentum)
    else:
        x_none, x_i, x_it = x["none", "u"], x["I", "u"], x["I", "c"]
        thr_txt = thr[1] if len(thr) > 1 else thr[0]
        guided = (
            x_none
            + s.img * terms["img"](x_i - x_none, x_i, apg.eta, thr[0], apg.momentum)
            + s.txt * terms["txt"](x_it - x_i, x_it, apg.eta, thr_txt, apg.momentum)
        )
    return (x_t - guided) / sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode_name", ["rv2v", "v2v", "v2v_chain", "t2v"])
def test_non_apg_modes_match_reference(mode_name: str, dtype: torch.dtype) -> None:
    mode = get_mode(mode_name)
    preds, x_t = make_inputs(mode_name, dtype, seed=1)
    out = combine(mode, preds, x_t, 0.7, T, SCALES, APGSettings(), new_state(mode))
    expected = ref_non_apg(mode_name, {tuple(k): as64(v) for k, v in preds.items()}, SCALES)
    assert_close(out, expected, NON_APG_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.0, -0.5])
@pytest.mark.parametrize("threshold", [0.5, 1e4])
@pytest.mark.parametrize("mode_name", ["t2v_apg", "v2v_apg", "r2v_apg"])
def test_apg_modes_match_reference_over_two_steps(
    mode_name: str, threshold: float, momentum: float, dtype: torch.dtype
) -> None:
    mode = get_mode(mode_name)
    apg = APGSettings(eta=0.5, norm_threshold=(threshold, threshold * 2), momentum=momentum)
    state = new_state(mode)
    terms = {"img": RefTerm(), "txt": RefTerm()}
    for step, sigma in enumerate((0.9, 0.6)):
        preds, x_t = make_inputs(mode_name, dtype, seed=10 + step)
        out = combine(mode, preds, x_t, sigma, T, SCALES, apg, state)
        e = {tuple(k): as64(v) for k, v in preds.items()}
        expected = ref_apg_step(mode_name, e, as64(x_t), sigma, SCALES, apg, terms)
        assert_close(out, expected, APG_TOL)
    clipped = sum(term.clipped_frames for term in terms.values())
    assert (clipped > 0) == (threshold < 1.0)


def test_r2v_apg_reuses_single_threshold() -> None:
    mode = get_mode("r2v_apg")
    apg = APGSettings(eta=0.3, norm_threshold=(2.0,), momentum=0.0)
    preds, x_t = make_inputs("r2v_apg", torch.float32, seed=3)
    out = combine(mode, preds, x_t, 0.5, T, SCALES, apg, new_state(mode))
    e = {tuple(k): as64(v) for k, v in preds.items()}
    terms = {"img": RefTerm(), "txt": RefTerm()}
    expected = ref_apg_step("r2v_apg", e, as64(x_t), 0.5, SCALES, apg, terms)
    assert_close(out, expected, APG_TOL)
    assert terms["txt"].clipped_frames > 0


def test_state_reset_drops_momentum() -> None:
    mode = get_mode("t2v_apg")
    apg = APGSettings(eta=0.5, norm_threshold=(0.5,), momentum=-0.5)
    first, x_first = make_inputs("t2v_apg", torch.float32, seed=20)
    second, x_second = make_inputs("t2v_apg", torch.float32, seed=21)
    state = new_state(mode)
    combine(mode, first, x_first, 0.8, T, SCALES, apg, state)
    carried = combine(mode, second, x_second, 0.8, T, SCALES, apg, state)
    state.reset()
    after_reset = combine(mode, second, x_second, 0.8, T, SCALES, apg, state)
    fresh = combine(mode, second, x_second, 0.8, T, SCALES, apg, new_state(mode))
    assert torch.equal(after_reset, fresh)
    assert not torch.allclose(carried, fresh)


def test_v2v_apg_unit_weights_reduce_to_conditional_prediction() -> None:
    mode = get_mode("v2v_apg")
    ones = GuidanceScales(vid=1.0, img=1.0, txt=1.0)
    apg = APGSettings(eta=1.0, norm_threshold=(0.0,), momentum=0.0)
    preds, x_t = make_inputs("v2v_apg", torch.float32, seed=4)
    out = combine(mode, preds, x_t, 0.4, T, ones, apg, new_state(mode))
    torch.testing.assert_close(out, preds[GuidancePass("VI", "c")], rtol=1e-5, atol=1e-5)


def test_pass_tables() -> None:
    assert set(GUIDANCE_MODES) == set(EXPECTED_PASSES)
    counts = {name: len(mode.passes) for name, mode in GUIDANCE_MODES.items()}
    assert counts == {
        "rv2v": 4, "v2v": 2, "v2v_chain": 3, "t2v": 2, "t2v_apg": 2, "v2v_apg": 2, "r2v_apg": 3,
    }
    for name, mode in GUIDANCE_MODES.items():
        assert mode.name == name
        assert {tuple(c) for c in mode.passes} == EXPECTED_PASSES[name]
        assert mode.uses_apg == name.endswith("_apg")
        assert required_visuals(mode) == {visual for visual, _ in EXPECTED_PASSES[name]}


def test_scaled() -> None:
    scaled = GuidanceScales(vid=1.25, img=4.5, txt=4.0).scaled(0.8)
    assert (scaled.vid, scaled.img, scaled.txt) == pytest.approx((1.0, 3.6, 3.2))


def test_unknown_mode_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="'nope'.*rv2v.*r2v_apg"):
        get_mode("nope")


@pytest.mark.parametrize("name", ["vae_txt_vit_wapg", "rv2v_wapg"])
def test_planner_modes_are_rejected_with_explanation(name: str) -> None:
    with pytest.raises(ValueError, match="planner.*not supported by the renderer"):
        get_mode(name)


def test_missing_pass_is_named() -> None:
    mode = get_mode("rv2v")
    preds, x_t = make_inputs("rv2v", torch.float32, seed=5)
    del preds[GuidancePass("V", "u")]
    with pytest.raises(ValueError, match=r"missing prediction\(s\) V·u;"):
        combine(mode, preds, x_t, 0.5, T, SCALES, APGSettings(), new_state(mode))


@pytest.mark.parametrize("mode_name", ["t2v_apg", "v2v_apg", "r2v_apg"])
def test_apg_rejects_zero_sigma(mode_name: str) -> None:
    mode = get_mode(mode_name)
    preds, x_t = make_inputs(mode_name, torch.float32, seed=6)
    with pytest.raises(ValueError, match="sigma=0.*UniPC"):
        combine(mode, preds, x_t, 0.0, T, SCALES, APGSettings(), new_state(mode))


def test_non_apg_accepts_zero_sigma() -> None:
    mode = get_mode("t2v")
    preds, x_t = make_inputs("t2v", torch.float32, seed=7)
    out = combine(mode, preds, x_t, 0.0, T, SCALES, APGSettings(), new_state(mode))
    assert out.shape == (B, L, C)


def test_state_of_other_mode_is_rejected() -> None:
    mode = get_mode("v2v_apg")
    preds, x_t = make_inputs("v2v_apg", torch.float32, seed=8)
    with pytest.raises(ValueError, match="t2v_apg"):
        combine(mode, preds, x_t, 0.5, T, SCALES, APGSettings(), new_state("t2v_apg"))


def test_frames_must_divide_tokens() -> None:
    mode = get_mode("t2v_apg")
    preds, x_t = make_inputs("t2v_apg", torch.float32, seed=9)
    with pytest.raises(ValueError, match="frames=5"):
        combine(mode, preds, x_t, 0.5, 5, SCALES, APGSettings(), new_state(mode))


def test_empty_threshold_tuple_is_rejected() -> None:
    with pytest.raises(ValueError, match="norm_threshold"):
        APGSettings(norm_threshold=())
