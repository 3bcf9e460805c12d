"""`python -m bernini doctor` / make-tiny, and the sizes and activation arithmetic behind the memory plan (A14B numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from bernini import doctor, supported
from bernini.__main__ import main as bernini_main
from bernini.models import TransformerConfig, WanTransformer
from bernini.offload import sizes as memory
from bernini.plan import CasePlan, MediaPlan
from bernini.testing import tiny_checkpoints

REPO = Path(__file__).resolve().parent.parent
A14B_TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
}
UMT5_XXL = {
    "model_type": "umt5", "d_model": 4096, "num_layers": 24, "num_heads": 64, "d_kv": 64, "d_ff": 10240, "vocab_size": 256384,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
}
A14B = memory.ModelSizes(
    expert_params=memory.transformer_params(A14B_TRANSFORMER), experts=2, text_encoder_params=memory.umt5_encoder_params(UMT5_XXL),
    vae_bytes=507_591_892, dim=5120, ffn_dim=13824, num_layers=40,
)
V2V_480P = memory.Workload(tokens=2 * 2 * 21 * 30 * 53, pixels=848 * 480, frames=81)  # source + target, 2 passes batched


@pytest.fixture(scope="session")
def tiny() -> Path:
    return tiny_checkpoints().diffusers


def test_doctor_text_in_a_subprocess(tiny: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bernini", "doctor", "--config", str(tiny)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for fact in ("python", "torch", "CUDA available", "attention on", "auto ->", "encode libx264: yes", "decode h264: yes", "diffusers", "flash-attn", "resolves offline"):
        assert fact in proc.stdout, fact


def test_doctor_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--json", "--config", str(tiny)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"python", "torch", "gpus", "host_free_gb", "attention", "codecs", "packages", "config"} <= set(report)
    assert report["attention"]["auto"] == ("sdpa" if not torch.cuda.is_available() else report["attention"]["auto"])
    assert report["attention"]["backends"]["sdpa"] == "usable"
    assert {"torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "av", "openai", "gradio", "flash-attn"} <= set(report["packages"])
    assert report["codecs"]["encode_libx264"] == "yes" and report["codecs"]["decode_h264"] == "yes"
    config = report["config"]
    assert config["resolves_offline"] and config["base"] == str(tiny) and set(config["experts"]) == {"high", "low"} and config["missing"] == []


def test_doctor_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert bernini_main(["doctor", "--config", "Wan-AI/Wan2.2-T2V-A14B-Diffusers"]) == 0
    out = capsys.readouterr().out
    assert "does NOT resolve offline" in out and "hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers" in out
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").rglob("*.safetensors"))
    import os

    assert "HF_HUB_OFFLINE" not in os.environ, "the offline switch is put back"


def test_make_tiny_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bernini_main(["make-tiny", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "Bernini-R-Diffusers" / "transformer" / "config.json").is_file()
    assert bernini_main([]) == 2 and "doctor" in capsys.readouterr().err


def test_a14b_expert_is_14_29_b_params_and_28_6_gb() -> None:
    assert A14B.expert_params == 14_288_491_584
    assert round(A14B.expert_params * 2 / memory.GB, 1) == 28.6
    assert round(A14B.text_encoder_params * 2 / memory.GB, 1) == 11.4


def test_param_formulas_match_the_real_modules(tiny: Path) -> None:
    from transformers import AutoConfig, UMT5EncoderModel

    cfg = json.loads((tiny / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        dit = WanTransformer(TransformerConfig.from_dict(cfg))
        text = UMT5EncoderModel(AutoConfig.from_pretrained(tiny / "text_encoder"))
    assert memory.transformer_params(cfg) == sum(p.numel() for p in dit.parameters())
    assert memory.umt5_encoder_params(json.loads((tiny / "text_encoder" / "config.json").read_text())) == sum(p.numel() for p in text.parameters())
    sizes = memory.read_sizes(tiny)
    assert sizes.expert_params == memory.transformer_params(cfg) and sizes.vae_bytes > 0 and sizes.vae_base_dim == 8


def test_activation_arithmetic() -> None:
    """The text K/V of every block for both prompts, and a forward linear in its tokens (its factors are checked
    against the model code's allocations in tests/test_memory_12gb.py)."""
    assert memory.text_kv_bytes(A14B, 2) == 40 * 2 * 2 * 512 * 5120 * 2
    assert memory.forward_bytes(20_000, A14B, 2) == 2 * memory.forward_bytes(10_000, A14B, 2) > 0


def plan(tokens: tuple[int, ...], width: int = 848, height: int = 480, frames: int = 81) -> CasePlan:
    src = MediaPlan("s.mp4", "video", frames, width, height, (21, 30, 53))
    return CasePlan("c", "v2v", "v2v", frames, width, height, 16.0, (21, 30, 53), "o.mp4", (src,), len(tokens), tokens, 40)


def test_workload_batches_equal_length_passes() -> None:
    plans = [plan((66780, 66780)), plan((33390, 66780, 66780, 100000), 640, 352, 49)]
    load = memory.workload_of(plans, batch_passes=True)
    assert (load.tokens, load.pixels, load.frames, load.single_tokens) == (133560, 848 * 480, 81, 100000)
    assert memory.workload_of(plans, batch_passes=False).tokens == 100000


# --------------------------------------------------------------------------- dependencies vs the supported range


def declared(name: str) -> supported.Supported:
    """The entry pyproject.toml declares for `name` (the one source the doctor reads)."""
    return next(entry for entry in supported.supported_ranges() if entry.name == name)


def test_each_version_is_judged_against_the_declared_range() -> None:
    assert supported.judge(declared("av"), "19.0.2").line() == "PyAV 19.0.2: supported"
    old = supported.judge(declared("diffusers"), "0.34")
    assert old.line() == "diffusers 0.34: too old, pip install 'diffusers>=0.35.2'" and not old.ok
    new = supported.judge(declared("gradio"), "7.0.1")
    assert new.status == "too new" and new.fix == "pip install 'gradio<7,>=6.31'" and not new.ok
    assert supported.judge(declared("torch"), "2.13.0+cpu").status == "supported"  # local builds count
    assert supported.judge(declared("torch"), "2.15.0.dev20261201").status == "supported"  # so do nightlies
    assert supported.judge(declared("transformers"), "4.56.2").status == "too old"
    missing = supported.judge(declared("transformers"), None)
    assert missing.status == "missing" and missing.fix == "pip install 'transformers>=4.57.3'" and not missing.ok
    optional = supported.judge(declared("flash-attn-4"), None)
    assert optional.ok and optional.line() == "flash-attn-4: not installed (optional, for fast: pip install 'flash-attn-4')"


def test_installed_metadata_gives_the_same_ranges_as_pyproject() -> None:
    # What pip writes into an installed bernini's METADATA (Requires-Dist), parsed back.
    entry = supported.from_metadata(Requirement('gradio<7,>=6.31; extra == "demo"'))
    assert (entry.name, str(entry.requirement.specifier), entry.extra) == ("gradio", "<7,>=6.31", "demo")
    assert entry == declared("gradio")
    assert supported.from_metadata(Requirement("av>=14.1")) == declared("av")


def test_doctor_reports_every_dependency_and_names_the_fix(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = supported.installed_version
    fake = {"diffusers": "0.34.0", "gradio": None}
    monkeypatch.setattr(supported, "installed_version", lambda name: fake[name] if name in fake else real(name))
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "diffusers 0.34.0: too old, pip install 'diffusers>=0.35.2'" in out
    assert "gradio: not installed (optional, for demo: pip install 'gradio<7,>=6.31')" in out
    (tally,) = [line for line in out.splitlines() if "outside the supported range:" in line]
    assert "diffusers" in tally.split(":")[-1].strip().split(", ") and "gradio" not in tally  # optional and absent is fine
    assert f"PyAV {av_version()}: supported" in out
    assert doctor.main(["--json"]) == 0
    deps = json.loads(capsys.readouterr().out)["dependencies"]
    assert not deps["all_supported"] and deps["source"].endswith("pyproject.toml")
    names = [entry["name"] for entry in deps["packages"]]
    assert {"torch", "diffusers", "transformers", "accelerate", "huggingface-hub", "av", "gradio"} <= set(names)


def av_version() -> str:
    import av

    return av.__version__
