"""Guidance passes of zero weight are not run, and the result still equals the full formula.

The expected pass sets below are derived by hand from each mode's formula (the docstring of
bernini.guidance.active_passes states the rule); the expected values come from a float64 numpy
evaluation of the full formula in which the skipped passes hold large random values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bernini.cases import load_case_file
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.guidance import APGSettings, GuidanceScales, active_passes, combine, get_mode, new_state
from bernini.pipeline import Renderer
from bernini.sampling import SamplingPlan, plan_steps
from bernini.testing import tiny_checkpoints

B, T, TOKENS_PER_FRAME, C = 1, 3, 4, 32
L = T * TOKENS_PER_FRAME
CASES = Path(__file__).resolve().parent.parent / "assets" / "testcases"

NOCLIP = APGSettings(eta=1.0, norm_threshold=(0.0,), momentum=0.0)
PROJECT = APGSettings(eta=0.5, norm_threshold=(0.0,), momentum=0.0)
CLIP = APGSettings(eta=1.0, norm_threshold=(0.5,), momentum=0.0)
DEFAULT_APG = APGSettings()
MOMENTUM = APGSettings(eta=1.0, norm_threshold=(0.0,), momentum=-0.5)
IMG_LINEAR_TXT_CLIPPED = APGSettings(eta=1.0, norm_threshold=(0.0, 0.5), momentum=0.0)


def S(vid: float, img: float, txt: float) -> GuidanceScales:
    return GuidanceScales(vid=vid, img=img, txt=txt)


# (mode, scales, apg, passes that must run): derived from the formulas, one comment per row.
CASES_TABLE: list[tuple[str, GuidanceScales, APGSettings, set[str]]] = [
    # rv2v = e0 + v(eV - e0) + i(eVIu - eV) + t(eVIc - eVIu): coefficients 1-v, v-i, i-t, t
    ("rv2v", S(1, 1, 1), DEFAULT_APG, {"VI·c"}),
    ("rv2v", S(1, 4.5, 4), DEFAULT_APG, {"V·u", "VI·u", "VI·c"}),  # the official low phase: 1.25 x 0.8 = 1
    ("rv2v", S(2, 2, 3), DEFAULT_APG, {"none·u", "VI·u", "VI·c"}),
    ("rv2v", S(1, 1, 0), DEFAULT_APG, {"VI·u"}),
    # v2v = eVIu + t(eVIc - eVIu)
    ("v2v", S(3, 3, 1), DEFAULT_APG, {"VI·c"}),
    ("v2v", S(3, 3, 0), DEFAULT_APG, {"VI·u"}),
    # v2v_chain = e0 + v(eV - e0) + t(eVIc - eV): coefficients 1-v, v-t, t
    ("v2v_chain", S(1, 9, 1), DEFAULT_APG, {"VI·c"}),
    ("v2v_chain", S(1, 9, 3), DEFAULT_APG, {"V·u", "VI·c"}),
    ("v2v_chain", S(2, 9, 0), DEFAULT_APG, {"none·u", "V·u"}),
    # t2v = e_u + t(e_c - e_u)
    ("t2v", S(5, 5, 1), DEFAULT_APG, {"none·c"}),
    ("t2v", S(5, 5, 0), DEFAULT_APG, {"none·u"}),
    # t2v_apg = x_u + t N(x_c - x_u; x_c): N is the identity only with eta 1 and no clipping
    ("t2v_apg", S(5, 5, 1), NOCLIP, {"none·c"}),
    ("t2v_apg", S(5, 5, 1), PROJECT, {"none·u", "none·c"}),  # eta 0.5: the projection onto x_c keeps x_u in
    ("t2v_apg", S(5, 5, 1), CLIP, {"none·u", "none·c"}),  # the clip depends on |x_c - x_u|
    ("t2v_apg", S(5, 5, 0), DEFAULT_APG, {"none·u"}),  # t = 0 removes the whole term, projection or not
    ("t2v_apg", S(5, 5, 0), MOMENTUM, {"none·u", "none·c"}),  # momentum: later steps read this difference
    # v2v_apg = x_u + t N(x_c - x_u; x_c) with x = VI
    ("v2v_apg", S(5, 5, 1), NOCLIP, {"VI·c"}),
    ("v2v_apg", S(5, 5, 1), DEFAULT_APG, {"VI·u", "VI·c"}),
    ("v2v_apg", S(5, 5, 0), PROJECT, {"VI·u"}),
    # r2v_apg = x0 + i N(xIu - x0; xIu) + t N(xIc - xIu; xIc), thresholds 0 for img, 1 for txt
    ("r2v_apg", S(5, 1, 1), NOCLIP, {"I·c"}),
    ("r2v_apg", S(5, 1, 4), IMG_LINEAR_TXT_CLIPPED, {"I·u", "I·c"}),  # x0's coefficient 1 - i = 0
    ("r2v_apg", S(5, 4.5, 0), DEFAULT_APG, {"none·u", "I·u"}),
    ("r2v_apg", S(5, 0, 0), PROJECT, {"none·u"}),
]


def ref_term(d: np.ndarray, base: np.ndarray, eta: float, threshold: float) -> np.ndarray:
    """N(d; base) in float64 per frame, after momentum: clip each frame's norm, scale the part along base by eta."""
    out = np.empty_like(d)
    dv, bv, ov = (a.reshape(B, T, -1) for a in (d, base, out))
    for b in range(B):
        for t in range(T):
            vec = dv[b, t].copy()
            norm = np.linalg.norm(vec)
            if threshold > 0 and norm > threshold:
                vec *= threshold / norm
            unit = bv[b, t] / max(np.linalg.norm(bv[b, t]), 1e-12)
            par = np.dot(vec, unit) * unit
            ov[b, t] = (vec - par) + eta * par
    return out


def ref_step(mode_name: str, e: dict[str, np.ndarray], x_t: np.ndarray, sigma: float, s: GuidanceScales, apg: APGSettings, buffers: dict[str, np.ndarray]) -> np.ndarray:
    """The full formula of each mode in float64 (every pass used), as written in the official renderer."""
    if mode_name == "rv2v":
        return e["none·u"] + s.vid * (e["V·u"] - e["none·u"]) + s.img * (e["VI·u"] - e["V·u"]) + s.txt * (e["VI·c"] - e["VI·u"])
    if mode_name == "v2v":
        return e["VI·u"] + s.txt * (e["VI·c"] - e["VI·u"])
    if mode_name == "v2v_chain":
        return e["none·u"] + s.vid * (e["V·u"] - e["none·u"]) + s.txt * (e["VI·c"] - e["V·u"])
    if mode_name == "t2v":
        return e["none·u"] + s.txt * (e["none·c"] - e["none·u"])
    x = {k: x_t - sigma * v for k, v in e.items()}
    thresholds = list(apg.norm_threshold)

    def term(name: str, plus: str, minus: str, index: int) -> np.ndarray:
        d = x[plus] - x[minus]
        if name in buffers:
            d = d + apg.momentum * buffers[name]
        buffers[name] = d
        return ref_term(d, x[plus], apg.eta, thresholds[min(index, len(thresholds) - 1)])

    if mode_name in ("t2v_apg", "v2v_apg"):
        vis = "none" if mode_name == "t2v_apg" else "VI"
        guided = x[f"{vis}·u"] + s.txt * term("txt", f"{vis}·c", f"{vis}·u", 0)
    else:
        guided = x["none·u"] + s.img * term("img", "I·u", "none·u", 0) + s.txt * term("txt", "I·c", "I·u", 1)
    return (x_t - guided) / sigma


def random_passes(mode_name: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    preds = {str(c): torch.randn(B, L, C, generator=gen) for c in get_mode(mode_name).passes}
    return preds, torch.randn(B, L, C, generator=gen)


@pytest.mark.parametrize(("mode_name", "scales", "apg", "expected"), CASES_TABLE)
def test_passes_of_zero_weight_drop_out_as_derived(mode_name: str, scales: GuidanceScales, apg: APGSettings, expected: set[str]) -> None:
    assert {str(c) for c in active_passes(get_mode(mode_name), scales, apg)} == expected


@pytest.mark.parametrize(("mode_name", "scales", "apg", "expected"), CASES_TABLE)
def test_skipped_passes_do_not_change_the_result(mode_name: str, scales: GuidanceScales, apg: APGSettings, expected: set[str]) -> None:
    """Only the needed passes go in; the float64 full formula sees wild values for the others and agrees."""
    mode = get_mode(mode_name)
    preds, x_t = random_passes(mode_name, seed=len(expected))
    full = {k: v.double().numpy() for k, v in preds.items()}
    for name in full:
        if name not in expected:
            full[name] = full[name] * 1e3 + 7.0  # a skipped pass may hold anything
    given = {c: preds[str(c)] for c in mode.passes if str(c) in expected}
    out = combine(mode, given, x_t, 0.6, T, scales, apg, new_state(mode))
    reference = ref_step(mode_name, full, x_t.double().numpy(), 0.6, scales, apg, {})
    err = np.abs(out.double().numpy() - reference).max() / np.abs(reference).max()
    assert err < 2e-6, f"relative error {err}"


def test_a_needed_pass_cannot_be_left_out() -> None:
    mode = get_mode("rv2v")
    preds, x_t = random_passes("rv2v", seed=1)
    given = {c: preds[str(c)] for c in mode.passes if str(c) != "none·u"}
    with pytest.raises(ValueError, match=r"missing prediction\(s\) none·u"):
        combine(mode, given, x_t, 0.5, T, S(1.25, 4.5, 4.0), APGSettings(), new_state(mode))


@pytest.mark.parametrize(
    ("high_txt", "low_txt", "passes"),
    [
        (0.0, 1.0, [2, 2, 2, 2, 1]),  # txt 0 while high, but the low steps read its momentum; the last one is linear
        (3.0, 0.0, [2, 2, 1, 1, 1]),  # no step after the high ones reads the buffer: the low steps need x_u alone
    ],
)
def test_momentum_keeps_a_term_only_while_a_later_step_reads_it(high_txt: float, low_txt: float, passes: list[int]) -> None:
    """t2v_apg with momentum, eta 1 and no clipping over five steps, against the float64 loop of the full formula."""
    mode = get_mode("t2v_apg")
    apg = APGSettings(eta=1.0, norm_threshold=(0.0,), momentum=-0.5)
    plan = SamplingPlan(mode, S(1, 1, high_txt), 1.0, apg, steps=5, shift=5.0, use_unipc=True, boundary=0.875, low=(None, None, low_txt), switch_step=2)
    sigmas = [0.99, 0.9, 0.8, 0.6, 0.4, 0.0]
    steps = plan_steps(plan, torch.tensor([999, 950, 900, 800, 600]), sigmas, ("high", "low"))
    assert [len(s.passes) for s in steps] == passes
    state, buffers = new_state(mode), {}
    for step, sigma in zip(steps, sigmas, strict=False):
        preds, x_t = random_passes("t2v_apg", seed=100 + step.index)
        given = {c: preds[str(c)] for c in step.passes}
        out = combine(mode, given, x_t, sigma, T, step.scales, apg, state, step.buffers_read_later)
        full = {k: v.double().numpy() for k, v in preds.items()}
        reference = ref_step("t2v_apg", full, x_t.double().numpy(), sigma, step.scales, apg, buffers)
        assert np.abs(out.double().numpy() - reference).max() / np.abs(reference).max() < 2e-6


def test_euler_steps_of_zero_dt_run_nothing_and_unipc_steps_always_run() -> None:
    mode = get_mode("t2v")
    plan = SamplingPlan(mode, S(1, 1, 4), 0.8, APGSettings(), steps=3, shift=5.0, use_unipc=False, boundary=0.875)
    timesteps = torch.tensor([1000.0, 833.0, 0.0])
    steps = plan_steps(plan, timesteps, [1.0, 0.83, 0.0, 0.0], ("high", "low"))
    assert [len(s.passes) for s in steps] == [2, 2, 0]
    unipc = plan_steps(dataclasses.replace(plan, use_unipc=True), timesteps, [1.0, 0.83, 0.0, 0.0], ("high", "low"))
    assert [len(s.passes) for s in unipc] == [2, 2, 2]
    off = plan_steps(dataclasses.replace(plan, skip_zero_passes=False), timesteps, [1.0, 0.83, 0.0, 0.0], ("high", "low"))
    assert [len(s.passes) for s in off] == [2, 2, 2]


# --------------------------------------------------------------------------- whole renders on the tiny checkpoint

RUNTIME = RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", batch_passes=True)
SMALL = GenerationSettings(num_inference_steps=4, max_image_size=64, num_frames=5, height=32, width=48)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer.from_pretrained(str(tiny_checkpoints().diffusers), runtime=RUNTIME)


def counting(renderer: Renderer) -> tuple[list[int], Callable[[], None]]:
    """Count the guidance passes (batch rows) every expert forward computes."""
    rows: list[int] = []
    originals = {}
    for name, model in renderer.experts.items():
        originals[name] = model.forward

        def forward(tokens, *args, _inner=model.forward, **kwargs):
            rows.append(tokens.shape[0])
            return _inner(tokens, *args, **kwargs)

        model.forward = forward

    def restore() -> None:
        for name, model in renderer.experts.items():
            model.forward = originals[name]

    return rows, restore


# (case, settings changes, passes per step when skipping): 4 steps, 2 high + 2 low at shift 5.
RENDERS = [
    ("rv2v/rv2v_case1.json", {"omega_vid": 1.0, "omega_img": 1.0, "omega_txt": 1.0, "omega_scale": 1.0}, [1, 1, 1, 1]),
    ("rv2v/rv2v_case1.json", {}, [4, 4, 3, 3]),  # the official defaults: ω_vid 1.25 x 0.8 = 1 in the low steps
    ("v2v/v2v_case1.json", {"guidance_mode": "v2v", "omega_txt": 1.0, "omega_txt_low": 1.0}, [1, 1, 1, 1]),
    ("rv2v/rv2v_case1.json", {"guidance_mode": "v2v_chain", "omega_vid": 1.0, "omega_txt": 1.0, "omega_scale": 1.0}, [1, 1, 1, 1]),
    ("t2v/t2v.json", {"guidance_mode": "t2v", "omega_txt": 1.0, "omega_scale": 1.0}, [1, 1, 1, 1]),
    ("t2v/t2v.json", {"omega_txt": 1.0, "omega_txt_low": 1.0, "eta": 1.0, "norm_threshold": (0.0,)}, [1, 1, 1, 1]),  # t2v_apg
    ("t2v/t2v.json", {"omega_txt": 1.0, "omega_txt_low": 1.0}, [2, 2, 2, 2]),  # t2v_apg, eta 0.5 and clipping keep x_u
    ("v2v/v2v_case1.json", {"omega_txt_low": 0.0}, [2, 2, 1, 1]),  # v2v_apg, no text guidance in the low steps
    ("r2v/r2v.json", {"omega_img": 1.0, "omega_txt": 1.0, "omega_scale": 1.0, "eta": 1.0, "norm_threshold": (0.0,)}, [1, 1, 1, 1]),
]


@pytest.mark.parametrize(("case_file", "changes", "passes"), RENDERS)
def test_renders_skip_passes_and_equal_the_full_computation(renderer: Renderer, case_file: str, changes: dict, passes: list[int]) -> None:
    case = load_case_file(CASES / case_file)
    settings = dataclasses.replace(SMALL, **changes)
    rows, restore = counting(renderer)
    try:
        skipped = renderer.render(case, settings)
        skipped_rows = sum(rows)
        rows.clear()
        full = renderer.render(case, dataclasses.replace(settings, skip_zero_passes=False))
        full_rows = sum(rows)
    finally:
        restore()
    assert skipped.info["expert_steps"] == {"high": 2, "low": 2}
    assert skipped_rows == sum(passes)
    assert full_rows == 4 * len(get_mode(skipped.plan.guidance_mode).passes)
    torch.testing.assert_close(skipped.latent, full.latent, rtol=1e-5, atol=1e-5)
    assert [p for run in skipped.plan.passes for p in [len(run.passes)] * (run.steps[1] - run.steps[0] + 1)] == passes  # the dry run says so


def test_all_scales_one_is_the_fully_conditioned_forward(renderer: Renderer) -> None:
    """Every ω 1: rv2v, v2v_chain and v2v all telescope to the VI·c pass, so skipping makes them one identical render."""
    case = load_case_file(CASES / "rv2v" / "rv2v_case1.json")
    ones = dataclasses.replace(SMALL, omega_vid=1.0, omega_img=1.0, omega_txt=1.0, omega_scale=1.0)
    latents = {mode: renderer.render(case, dataclasses.replace(ones, guidance_mode=mode)).latent for mode in ("rv2v", "v2v_chain", "v2v")}
    assert torch.equal(latents["rv2v"], latents["v2v"]) and torch.equal(latents["v2v_chain"], latents["v2v"])
    full = renderer.render(case, dataclasses.replace(ones, skip_zero_passes=False)).latent
    assert not torch.equal(full, latents["rv2v"])  # the full formula rounds differently...
    torch.testing.assert_close(full, latents["rv2v"], rtol=1e-5, atol=1e-5)  # ...by float32 rounding only


def test_the_dry_run_plan_names_the_passes() -> None:
    from bernini.plan import format_run, pass_runs
    from bernini.sampling import preview_steps

    runs = pass_runs(preview_steps(dataclasses.replace(SMALL, omega_txt=1.0, omega_txt_low=1.0, guidance_mode="t2v"), get_mode("t2v")))
    assert [format_run(r) for r in runs] == ["steps 1-2 high ω 1.25/4.5/1: none·c", "steps 3-4 low ω 1/3.6/1: none·c"]
