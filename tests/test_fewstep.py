"""Few-step schedules: --solver, --switch_step, per-expert ω, presets, and the Euler grid's last step that cannot move."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bernini.cases import CaseError, load_case_file
from bernini.cli import build_parser, runtime_from, settings_from
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.pipeline import Renderer
from bernini.plan import format_run, plan_case
from bernini.presets import PRESETS
from bernini.sampling import EulerFlowScheduler
from bernini.testing import tiny_checkpoints

CASES = Path(__file__).resolve().parent.parent / "assets" / "testcases"
T2V = CASES / "t2v" / "t2v.json"
RUNTIME = RuntimeConfig(device="cpu", dtype="float32", attention="sdpa")
SMALL = GenerationSettings(num_inference_steps=4, num_frames=5, height=32, width=48, guidance_mode="t2v")


def parse(*flags: str) -> GenerationSettings:
    return settings_from(build_parser("test").parse_args(list(flags)))


def shifted(sigma: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigma / (1 + (shift - 1) * sigma)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer.from_pretrained(str(tiny_checkpoints().diffusers), runtime=RUNTIME)


def rows_per_render(renderer: Renderer, settings: GenerationSettings, case_file: Path = T2V) -> tuple[torch.Tensor, dict, int]:
    """Latent, render info and the number of guidance passes the experts computed."""
    rows: list[int] = []
    saved = {}
    for name, model in renderer.experts.items():
        saved[name] = model.forward
        model.forward = lambda tokens, *a, _f=model.forward, **k: (rows.append(tokens.shape[0]), _f(tokens, *a, **k))[1]
    try:
        out = renderer.render(load_case_file(case_file), settings)
    finally:
        for name, model in renderer.experts.items():
            model.forward = saved[name]
    return out.latent, out.info, sum(rows)


# --------------------------------------------------------------------------- flags


def test_solver_euler_is_the_official_no_use_unipc_scheduler() -> None:
    assert parse("--solver", "euler") == parse("--no-use_unipc")
    assert parse("--solver", "euler").solver == "euler" and parse().solver == "unipc"
    with pytest.raises(ValueError, match="--solver unipc contradicts --no-use_unipc"):
        parse("--solver", "unipc", "--no-use_unipc")


def test_switch_step_must_fit_the_steps() -> None:
    assert parse("--num_inference_steps", "4", "--switch_step", "4").switch_step == 4
    with pytest.raises(ValueError, match="switch_step must be an integer from 0 to num_inference_steps \\(4\\), got --switch_step 5"):
        parse("--num_inference_steps", "4", "--switch_step", "5")


def test_presets_set_their_numbers_and_explicit_flags_win() -> None:
    lightning = parse("--preset", "lightning-4step")
    assert (lightning.num_inference_steps, lightning.solver, lightning.flow_shift, lightning.guidance_mode) == (5, "euler", 5.0, "t2v")
    assert (lightning.omega_txt, lightning.omega_txt_low, lightning.omega_vid_low, lightning.preset) == (1.0, 1.0, 1.0, "lightning-4step")
    assert parse("--num_inference_steps", "9", "--preset", "lightning-4step").num_inference_steps == 9
    assert parse("--preset", "lightning-4step", "--flow_shift", "3").flow_shift == 3.0
    args = build_parser("test").parse_args(["--preset", "lightning-4step", "--lora_low", "mine.safetensors"])
    assert args.lora_high == ["lightx2v/Wan2.2-Lightning/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors"]
    assert args.lora_low == ["lightx2v/Wan2.2-Lightning/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/low_noise_model.safetensors", "mine.safetensors"]


def test_a_preset_lora_missing_from_the_cache_says_how_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = build_parser("test").parse_args(["--preset", "lightning-4step"])
    with pytest.raises(ValueError, match="hf download lightx2v/Wan2.2-Lightning Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1/high_noise_model.safetensors"):
        runtime_from(args)


def test_a_preset_is_refused_for_tasks_it_was_not_published_for() -> None:
    settings = dataclasses.replace(parse("--preset", "lightning-4step"), num_frames=5, height=32, width=48)
    with pytest.raises(CaseError, match="published for t2v only, not v2v"):
        plan_case(load_case_file(CASES / "v2v" / "v2v_case1.json"), settings)
    assert PRESETS["lightning-4step"].tasks == ("t2v",)


# --------------------------------------------------------------------------- the Lightning grid


def test_five_official_euler_steps_are_lightnings_four_moves() -> None:
    """Lightning's Euler: shifted linspace(1000, 0, steps + 1) / 1000, high while t >= 875 (its text2video.py)."""
    lightning_sigmas = shifted(np.linspace(1.0, 0.0, 5), 5.0)
    lightning_t = lightning_sigmas[:-1] * 1000
    ours = EulerFlowScheduler(5.0)
    ours.set_timesteps(5)
    np.testing.assert_allclose(ours.sigmas.numpy()[:5], lightning_sigmas, rtol=1e-6)
    assert float(ours.sigmas[5]) == 0.0 == float(ours.sigmas[4])  # the 5th step goes from 0 to 0
    assert [t >= 875 for t in lightning_t] == [int(t) >= 875 for t in ours.timesteps[:4]] == [True, True, False, False]


def test_the_lightning_preset_plan_runs_one_pass_a_step_and_nothing_at_sigma_zero() -> None:
    settings = dataclasses.replace(parse("--preset", "lightning-4step"), num_frames=5, height=32, width=48)
    plan = plan_case(load_case_file(T2V), settings)
    assert [format_run(r) for r in plan.passes] == ["steps 1-2 high ω 1/1/1: none·c", "steps 3-4 low ω 1/1/1: none·c", "step 5 low ω 1/1/1: nothing (dt 0)"]


def test_the_lightning_numbers_render_with_four_forwards(renderer: Renderer) -> None:
    settings = dataclasses.replace(parse("--preset", "lightning-4step"), num_frames=5, height=32, width=48)
    latent, info, rows = rows_per_render(renderer, settings)
    assert info["expert_steps"] == {"high": 2, "low": 3} and rows == 4
    full, _, full_rows = rows_per_render(renderer, dataclasses.replace(settings, skip_zero_passes=False))
    assert full_rows == 10  # u and c in all 5 steps
    torch.testing.assert_close(latent, full, rtol=1e-5, atol=1e-5)


def test_the_euler_step_of_dt_zero_changes_no_bit(renderer: Renderer) -> None:
    """With guidance (both passes needed) only the last step differs: skipping it leaves every bit as it was."""
    settings = dataclasses.replace(SMALL, num_inference_steps=5, use_unipc=False, omega_txt=4.0)
    latent, _, rows = rows_per_render(renderer, settings)
    full, _, full_rows = rows_per_render(renderer, dataclasses.replace(settings, skip_zero_passes=False))
    assert (rows, full_rows) == (8, 10) and torch.equal(latent, full)  # x + 0 * v is x


# --------------------------------------------------------------------------- switch point and per-expert ω


def unipc_split(steps: int, shift: float, boundary: float = 0.875) -> tuple[int, int]:
    """High/low steps of the official UniPC grid (diffusers 0.35.2: flip(1 - linspace(1, 1/1000, N + 1))[:-1])."""
    sigmas = shifted(np.flip(1 - np.linspace(1, 1 / 1000, steps + 1))[:-1], shift)
    high = int(sum(int(s * 1000) >= boundary * 1000 for s in sigmas))
    return high, steps - high


@pytest.mark.parametrize("steps", [2, 4, 6, 8])
def test_few_unipc_steps_follow_the_boundary_rule(renderer: Renderer, steps: int) -> None:
    latent, info, _ = rows_per_render(renderer, dataclasses.replace(SMALL, num_inference_steps=steps))
    high, low = unipc_split(steps, 5.0)
    assert info["expert_steps"] == {k: v for k, v in (("high", high), ("low", low)) if v}
    assert torch.isfinite(latent).all()


@pytest.mark.parametrize(("switch", "split"), [(0, {"low": 4}), (1, {"high": 1, "low": 3}), (3, {"high": 3, "low": 1}), (4, {"high": 4})])
def test_switch_step_sets_the_expert_split(renderer: Renderer, switch: int, split: dict) -> None:
    _, info, _ = rows_per_render(renderer, dataclasses.replace(SMALL, switch_step=switch))
    assert info["expert_steps"] == split


def test_switch_step_needs_two_experts(tmp_path: Path) -> None:
    import json

    config = json.loads((CASES.parent.parent / "configs" / "bernini_renderer_wan21_1p3b" / "config.json").read_text())
    config["wan22_base"] = str(tiny_checkpoints().diffusers)
    (tmp_path / "config.json").write_text(json.dumps(config))
    single = Renderer.from_pretrained(str(tmp_path), runtime=RUNTIME)
    with pytest.raises(ValueError, match="--switch_step needs both experts"):
        single.render(load_case_file(T2V), dataclasses.replace(SMALL, switch_step=2))


def test_low_expert_omegas_replace_the_switch_rule(renderer: Renderer) -> None:
    base = dataclasses.replace(SMALL, guidance_mode="rv2v")
    case = CASES / "rv2v" / "rv2v_case1.json"
    default, info, _ = rows_per_render(renderer, base, case)
    assert info["guidance_per_expert"]["low"] == pytest.approx({"vid": 1.0, "img": 3.6, "txt": 3.2})
    same, _, _ = rows_per_render(renderer, dataclasses.replace(base, omega_vid_low=1.25 * 0.8, omega_img_low=4.5 * 0.8, omega_txt_low=4.0 * 0.8), case)
    assert torch.equal(same, default)  # the rule's own values, given explicitly
    other, info, _ = rows_per_render(renderer, dataclasses.replace(base, omega_txt_low=1.5), case)
    assert info["guidance_per_expert"] == {"high": pytest.approx({"vid": 1.25, "img": 4.5, "txt": 4.0}), "low": pytest.approx({"vid": 1.0, "img": 3.6, "txt": 1.5})}
    assert not torch.allclose(other, default)


# --------------------------------------------------------------------------- the demo's preset list


def test_demo_preset_list_sets_the_page_knobs_and_the_service_takes_them() -> None:
    pytest.importorskip("gradio", reason="the demo needs gradio (requirements.txt)")
    from bernini.demo.page import PRESET_KNOBS, preset_updates
    from bernini.demo.service import settings_with

    updates = dict(zip(PRESET_KNOBS, preset_updates("lightning-4step"), strict=False))
    knobs = {k: u["value"] for k, u in updates.items() if "value" in u}
    assert knobs == {"guidance_mode": "t2v", "num_inference_steps": 5, "flow_shift": 5.0, "use_unipc": False,
                     **{f"omega_{t}{e}": 1.0 for t in ("vid", "img", "txt") for e in ("", "_low")}}
    page = {k: v for k, v in knobs.items() if k != "guidance_mode"}  # the mode is a case key, not a knob
    settings = settings_with(GenerationSettings(), {**page, "preset": "lightning-4step"})
    assert settings == dataclasses.replace(parse("--preset", "lightning-4step"), guidance_mode=None)
    assert all(u == {"__type__": "update"} for u in preset_updates("none")[:-1])
