"""The renderer end to end on the tiny checkpoint: both checkpoint layouts, seeds, shift, experts, omega scaling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bernini.cases import load_case_file
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.pipeline import Renderer
from bernini.testing import tiny_checkpoints

CASES = Path(__file__).resolve().parent.parent / "assets" / "testcases"
RUNTIME = RuntimeConfig(device="cpu", dtype="float32", attention="sdpa")
SMALL = GenerationSettings(num_inference_steps=6, max_image_size=64, num_frames=5, height=32, width=48)


@pytest.fixture(scope="module")
def tiny():
    return tiny_checkpoints()


@pytest.fixture(scope="module")
def renderer(tiny) -> Renderer:
    return Renderer.from_pretrained(str(tiny.diffusers), runtime=RUNTIME)


def latent(renderer: Renderer, case_path: Path, settings: GenerationSettings = SMALL):
    out = renderer.render(load_case_file(case_path), settings)
    return out.latent, out


def test_separate_checkpoints_over_the_wan_base_equal_the_diffusers_layout(tiny, renderer) -> None:
    separate = Renderer.from_pretrained(
        str(tiny.wan_base),
        high_noise_ckpt=str(tiny.separate / "bernini_renderer_high"),
        low_noise_ckpt=str(tiny.separate / "bernini_renderer_low"),
        runtime=RUNTIME,
    )
    base_only = Renderer.from_pretrained(str(tiny.wan_base), runtime=RUNTIME)
    for name in ("high", "low"):  # the same weights, bit for bit, whichever layout they came from
        want, have = renderer.experts[name].state_dict(), separate.experts[name].state_dict()
        assert want.keys() == have.keys() and all(torch.equal(have[k], want[k]) for k in want), name
    # Equal weights in equally aligned memory (the loader's own) run the same CPU kernels: equal renders.
    case = CASES / "rv2v" / "rv2v_case1.json"
    expected, _ = latent(renderer, case)
    got, _ = latent(separate, case)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain, _ = latent(base_only, case)
    assert not torch.allclose(plain, expected)  # the base weights really were replaced


def test_same_seed_same_output_other_seed_other_output(renderer) -> None:
    case = CASES / "t2v" / "t2v.json"
    a, _ = latent(renderer, case)
    b, _ = latent(renderer, case)
    c, _ = latent(renderer, case, GenerationSettings(**{**SMALL.to_dict(), "seed": 7}))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(("shift", "high", "low"), [(5.0, 17, 23), (3.0, 12, 28)])
def test_flow_shift_is_honoured_per_call_with_the_official_expert_split(renderer, shift, high, low) -> None:
    settings = GenerationSettings(**{**SMALL.to_dict(), "num_inference_steps": 40, "flow_shift": shift})
    _, out = latent(renderer, CASES / "t2i" / "t2i.json", settings)
    assert out.info["expert_steps"] == {"high": high, "low": low}


def test_omega_values_are_scaled_once_at_the_switch(renderer) -> None:
    _, out = latent(renderer, CASES / "rv2v" / "rv2v_case1.json")
    scales = out.info["guidance_per_expert"]
    assert scales["high"] == pytest.approx({"vid": 1.25, "img": 4.5, "txt": 4.0})
    assert scales["low"] == pytest.approx({"vid": 1.0, "img": 3.6, "txt": 3.2})


def test_single_expert_config_never_switches_or_scales(tiny, tmp_path: Path) -> None:
    config = json.loads((Path(__file__).resolve().parent.parent / "configs" / "bernini_renderer_wan21_1p3b" / "config.json").read_text())
    config["wan22_base"] = str(tiny.diffusers)  # the tiny stands in for the 1.3B base
    (tmp_path / "config.json").write_text(json.dumps(config))
    single = Renderer.from_pretrained(str(tmp_path), runtime=RUNTIME)
    assert list(single.experts) == ["high"]
    _, out = latent(single, CASES / "t2v" / "t2v.json")
    assert out.info["expert_steps"] == {"high": SMALL.num_inference_steps}
    assert out.info["guidance_per_expert"] == {"high": pytest.approx({"vid": 1.25, "img": 4.5, "txt": 4.0})}


def test_system_prompt_is_glued_to_the_cleaned_prompt(renderer) -> None:
    _, out = latent(renderer, CASES / "v2v" / "v2v_case1.json")
    assert out.prompt_used.startswith("You are a helpful assistant specialized in video editing.Add a small snowman")


def test_euler_fallback_runs_plain_cfg_and_refuses_apg_before_loading(renderer) -> None:
    from bernini.cases import CaseError
    from bernini.plan import plan_case

    euler = GenerationSettings(**{**SMALL.to_dict(), "use_unipc": False})
    with pytest.raises(CaseError, match="needs the UniPC scheduler"):
        plan_case(load_case_file(CASES / "t2v" / "t2v.json"), euler)  # t2v_apg by default
    plain = GenerationSettings(**{**euler.to_dict(), "guidance_mode": "t2v"})
    got, out = latent(renderer, CASES / "t2v" / "t2v.json", plain)
    assert torch.isfinite(got).all() and out.info["expert_steps"]["high"] >= 1
