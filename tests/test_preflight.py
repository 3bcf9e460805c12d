"""Checkpoint preflight: each broken checkpoint is refused from headers alone, before the text encoder loads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from bernini import main as entry
from bernini import weights
from bernini.pipeline import Renderer, resolve_sources
from bernini.testing import TinyCheckpoints, tiny_checkpoints

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "testcases"
TINY = ["--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny() -> TinyCheckpoints:
    return tiny_checkpoints()


@pytest.fixture
def diffusers(tiny: TinyCheckpoints, tmp_path: Path) -> Path:
    """A private copy of Bernini-R-Diffusers to break."""
    return Path(shutil.copytree(tiny.diffusers, tmp_path / "Bernini-R-Diffusers"))


@pytest.fixture
def separate(tiny: TinyCheckpoints, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny.separate, tmp_path / "Bernini-R"))


def shard_of(folder: Path, key: str) -> Path:
    index = json.loads(next(folder.glob("*.index.json")).read_text())
    return folder / index["weight_map"][key]


def rewrite(folder: Path, key: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Edit the shard holding `key` (change mutates its tensors) and keep the index in step."""
    shard = shard_of(folder, key)
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = next(folder.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {k: shard.name for k in tensors}
    index_path.write_text(json.dumps(index))


def refuse_reading_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """safe_open handles whose get_tensor fails: the preflight may read headers only."""
    from safetensors import safe_open

    class HeadersOnly:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self) -> HeadersOnly:
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.handle.keys()

        def get_slice(self, key: str) -> Any:
            return self.handle.get_slice(key)

        def get_tensor(self, key: str) -> None:
            raise AssertionError(f"preflight read the tensor {key}")

    monkeypatch.setattr("bernini.weights.check.safe_open", HeadersOnly)
    monkeypatch.setattr("bernini.weights.locate.safe_open", HeadersOnly)


def preflight_error(config: Path, high: Path | None = None, low: Path | None = None) -> str:
    with pytest.raises(weights.CheckpointError) as caught:
        weights.preflight(resolve_sources(str(config), str(high) if high else None, str(low) if low else None))
    return str(caught.value)


def test_good_checkpoints_pass_from_headers_only(tiny: TinyCheckpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_reading_tensors(monkeypatch)
    weights.preflight(resolve_sources(str(tiny.diffusers)))
    weights.preflight(resolve_sources(str(tiny.wan_base), str(tiny.separate_high), str(tiny.separate_low)))


def test_truncated_shard(diffusers: Path) -> None:
    shard = diffusers / "transformer_2" / "diffusion_pytorch_model-00003-of-00008.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    message = preflight_error(diffusers)
    assert str(shard) in message and "truncated" in message and "re-download" in message


def test_truncated_text_encoder_shard(diffusers: Path) -> None:
    shard = next((diffusers / "text_encoder").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert str(shard) in preflight_error(diffusers)


def test_missing_key(diffusers: Path) -> None:
    key = "blocks.1.ffn.net.2.weight"
    rewrite(diffusers / "transformer", key, lambda t: t.pop(key))
    message = preflight_error(diffusers)
    assert "high-noise expert" in message and "lacks 1 of the" in message and key in message and "config.json" in message


def test_unexpected_key(diffusers: Path) -> None:
    key = "blocks.0.ffn.net.2.weight"
    rewrite(diffusers / "transformer_2", key, lambda t: t.update({"blocks.0.lora_up.weight": torch.zeros(4, 4)}))
    message = preflight_error(diffusers)
    assert "low-noise expert" in message and "has 1 keys the model does not use" in message and "blocks.0.lora_up.weight" in message


def test_wrong_shape_against_the_config(diffusers: Path) -> None:
    config = diffusers / "transformer" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "ffn_dim": data["ffn_dim"] * 2}))
    message = preflight_error(diffusers)
    assert "has shape" in message and str(config) in message and "ffn" in message and "different models" in message


def test_wrong_dtype(diffusers: Path) -> None:
    key = "blocks.0.attn1.to_q.weight"
    rewrite(diffusers / "transformer", key, lambda t: t.update({key: t[key].to(torch.int8)}))
    message = preflight_error(diffusers)
    assert key in message and "stored as I8" in message and "F16/BF16/F32/F64" in message


def test_garbage_safetensors(diffusers: Path) -> None:
    shard = diffusers / "transformer" / "diffusion_pytorch_model-00005-of-00008.safetensors"
    shard.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not a header at all}" + bytes(200))
    message = preflight_error(diffusers)
    assert str(shard) in message and "not a readable safetensors file" in message


def test_pickles(separate: Path, tiny: TinyCheckpoints, tmp_path: Path) -> None:
    high = separate / "bernini_renderer_high"
    for shard in high.glob("*.safetensors*"):
        shard.unlink()
    torch.save({"ema.diff_dec.transformer.proj_out.weight": torch.zeros(2)}, high / "pytorch_model.bin")
    message = preflight_error(tiny.wan_base, high, separate / "bernini_renderer_low")
    assert "pytorch_model.bin" in message and "only .safetensors" in message and "arbitrary code" in message
    # A pickle renamed .safetensors is named for what it is.
    disguised = separate / "bernini_renderer_low" / "model-00002-of-00003.safetensors"
    torch.save({"x": torch.zeros(2)}, disguised)
    message = preflight_error(tiny.wan_base, tiny.separate_high, separate / "bernini_renderer_low")
    assert str(disguised) in message and "holds a pickle" in message and "OUT.safetensors" in message


def test_swapped_experts(tiny: TinyCheckpoints) -> None:
    message = preflight_error(tiny.wan_base, tiny.separate_low, tiny.separate_high)
    assert "holds no high-noise expert weights" in message and "look swapped" in message and str(tiny.separate_low) in message


@pytest.mark.parametrize("config", ["transformer/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"])
def test_invalid_component_config_is_named(config: str, diffusers: Path) -> None:
    (diffusers / config).write_text('{"num_layers": 2,, }')
    message = preflight_error(diffusers)
    assert str(diffusers / config) in message and "not valid JSON" in message


def test_unusable_transformer_config_is_named(diffusers: Path) -> None:
    config = diffusers / "transformer_2" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "image_dim": 1280}))  # an I2V model's config
    message = preflight_error(diffusers)
    assert str(config) in message and "not Bernini-R experts" in message


def test_invalid_renderer_config_is_named(diffusers: Path) -> None:
    (diffusers / "config.json").write_text("{")
    with pytest.raises(ValueError, match=rf"{diffusers / 'config.json'}: cannot read the renderer config"):
        resolve_sources(str(diffusers))
    (diffusers / "config.json").write_text(json.dumps({"model_type": "bernini_renderer", "switch_dit_boundary": 8.75}))
    with pytest.raises(ValueError, match=rf"{diffusers / 'config.json'}: invalid renderer config: switch_dit_boundary"):
        resolve_sources(str(diffusers))


def test_a_broken_expert_stops_the_run_before_the_text_encoder_loads(diffusers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loaded: list[str] = []
    for target in ("bernini.models.text_encoder.TextEncoder.load", "bernini.models.vae.VAE.load", "bernini.pipeline.load_expert"):
        monkeypatch.setattr(target, lambda *a, _name=target, **k: loaded.append(_name))
    shard = diffusers / "transformer_2" / "diffusion_pytorch_model-00001-of-00008.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    out = tmp_path / "out"
    code = entry.main(["--config", str(diffusers), "--case", str(ASSETS / "t2v"), "--output_dir", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and loaded == []
    record = json.loads((out / "summary.json").read_text())["cases"][0]
    assert record["status"] == "not_run" and "CheckpointError" in record["error"] and str(shard) in record["error"]
    assert "Traceback" not in err and sorted(p.name for p in out.iterdir()) == ["summary.json"]
    code = entry.main(["--config", str(diffusers), "--case", str(ASSETS / "t2v"), "--output_dir", str(out), "--dry-run", *TINY])
    printed = capsys.readouterr().out
    assert code == 2 and f"checkpoint: {shard}" in printed and loaded == []


def test_renderer_load_runs_the_preflight_first(diffusers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = diffusers / "transformer" / "config.json"
    config.write_text("[]")
    monkeypatch.setattr("bernini.models.text_encoder.TextEncoder.load", lambda *a, **k: pytest.fail("the text encoder loaded first"))
    with pytest.raises(weights.CheckpointError, match=rf"{config} must hold a JSON object"):
        Renderer.from_pretrained(str(diffusers))
