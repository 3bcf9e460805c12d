"""Tests for bernini.testing: the tiny checkpoints load with the standard libraries and are deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bernini import testing
from bernini.testing import TinyCheckpoints


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    """One set written through the CLI entry point."""
    root = tmp_path_factory.mktemp("cli") / "tiny"
    assert testing.main(["make-tiny", str(root), "--seed", "0"]) == 0
    return testing.layout_for(root)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    """A second set with the same seed, built through the cache helper."""
    return testing.tiny_checkpoints(tmp_path_factory.mktemp("cache"))


def relative_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_cli_prints_the_written_folders(built: TinyCheckpoints, capsys: pytest.CaptureFixture[str]) -> None:
    root = built.root.parent / "again"
    testing.main(["make-tiny", str(root)])
    printed = capsys.readouterr().out.split()
    assert printed == [str(path) for path in testing.layout_for(root).paths()]


def test_make_tiny_writes_every_folder(built: TinyCheckpoints) -> None:
    for pipeline in (built.diffusers, built.wan_base):
        for name in ("transformer", "transformer_2", "text_encoder", "tokenizer", "vae", "scheduler"):
            assert (pipeline / name).is_dir(), pipeline / name
        for expert in ("transformer", "transformer_2"):
            folder = pipeline / expert
            assert (folder / "config.json").is_file()
            index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
            shards = sorted(set(index["weight_map"].values()))
            assert len(shards) > 1, "experts must be sharded like the real checkpoints"
            assert all((folder / shard).is_file() for shard in shards)
        assert (pipeline / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((built.diffusers / "config.json").read_text()) == testing.BERNINI_RENDERER_CONFIG
    assert not (built.wan_base / "config.json").exists()
    model_index = json.loads((built.wan_base / "model_index.json").read_text())
    assert model_index["_class_name"] == "WanPipeline"
    assert model_index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    for folder in (built.separate_high, built.separate_low):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index) == {"metadata", "weight_map"}
        assert index["metadata"]["total_size"] > 0
        assert len(set(index["weight_map"].values())) > 1


def test_shared_components_are_identical_copies(built: TinyCheckpoints) -> None:
    for name in ("tokenizer", "text_encoder", "vae", "scheduler"):
        left, right = built.diffusers / name, built.wan_base / name
        assert relative_files(left) == relative_files(right)
        for rel in relative_files(left):
            assert (left / rel).read_bytes() == (right / rel).read_bytes(), rel


def test_transformers_load_with_diffusers(built: TinyCheckpoints) -> None:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(built.diffusers / "transformer")
    for key, value in testing.TINY_TRANSFORMER_CONFIG.items():
        expected = list(value) if isinstance(value, list) else value
        actual = model.config[key]
        assert (list(actual) if isinstance(actual, (list, tuple)) else actual) == expected, key
    hidden = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    out = model(hidden, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3, "random weights must give a non-trivial output"


def test_experts_differ(built: TinyCheckpoints) -> None:
    high = read_state(built.diffusers / "transformer")
    low = read_state(built.diffusers / "transformer_2")
    base_high = read_state(built.wan_base / "transformer")
    assert high.keys() == low.keys() == base_high.keys()
    for key in high:
        assert not torch.equal(high[key], low[key]), key
        assert not torch.equal(high[key], base_high[key]), key
        # Every parameter is randomised, including those diffusers initialises to 0 or 1.
        assert high[key].std() > 0 or high[key].numel() == 1, key


def test_separate_checkpoints_hold_the_same_weights_plus_decoys(built: TinyCheckpoints) -> None:
    for folder, diffusers_folder, prefix in (
        (built.separate_high, "transformer", "diff_dec.transformer."),
        (built.separate_low, "transformer_2", "diff_dec.transformer_2."),
    ):
        reference = read_state(built.diffusers / diffusers_folder)
        stored = read_state(folder)
        for key, value in reference.items():
            ema = stored[f"ema.{prefix}{key}"]
            assert ema.dtype == torch.float32
            assert torch.equal(ema, value), key
            assert not torch.equal(stored[f"{prefix}{key}"], value), f"decoy {key} must differ"
        assert any(key.startswith("ema.diff_dec.text_encoder.") for key in stored)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(stored)


def test_text_encoder_and_tokenizer_load(built: TinyCheckpoints) -> None:
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(built.diffusers / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(built.diffusers / "text_encoder")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    assert encoder.config.vocab_size == len(tokenizer)
    assert encoder.dtype == torch.float32
    prompts = ["A cat walks on the grass, realistic style.", testing.WAN_NEGATIVE_PROMPT]
    batch = tokenizer(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 512)
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        length = int(mask.sum())
        assert ids[length - 1] == 1, "T5 appends </s>"
        assert (ids[length:] == 0).all(), "padding uses <pad> = 0"
        assert (ids[: length - 1] != 2).all(), "corpus text must not hit <unk>"
    unseen = tokenizer("你好世界 zebra").input_ids
    assert unseen.count(2) <= 2, "unknown runs collapse into one <unk>"
    hidden = encoder(batch.input_ids[:, :40], attention_mask=batch.attention_mask[:, :40]).last_hidden_state
    assert hidden.shape == (2, 40, 32) and torch.isfinite(hidden).all()


def test_vae_and_scheduler_load(built: TinyCheckpoints) -> None:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    vae = AutoencoderKLWan.from_pretrained(built.diffusers / "vae")
    assert vae.config.z_dim == 16 and vae.config.base_dim == 8
    assert len(vae.config.latents_mean) == 16 and vae.config.latents_std[0] == pytest.approx(2.8184)
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, 2, 2, 2)
    assert decoded.shape == video.shape
    scheduler = UniPCMultistepScheduler.from_pretrained(built.diffusers / "scheduler")
    for key, value in testing.WAN22_SCHEDULER_CONFIG.items():
        assert scheduler.config[key] == value, key
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) == 4


def test_wan_base_runs_as_a_diffusers_pipeline(built: TinyCheckpoints) -> None:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(built.wan_base)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        prompt="a cat walks",
        negative_prompt=testing.WAN_NEGATIVE_PROMPT,
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 5, 16, 16, 3)


def test_same_seed_gives_byte_identical_files(built: TinyCheckpoints, cached: TinyCheckpoints) -> None:
    for left, right in zip(built.paths(), cached.paths()):
        assert relative_files(left) == relative_files(right)
        for rel in relative_files(left):
            assert (left / rel).read_bytes() == (right / rel).read_bytes(), rel


def test_other_seed_gives_other_weights() -> None:
    first = testing.build_transformer(testing.generator_for(0, testing.SEED_HIGH)).state_dict()
    second = testing.build_transformer(testing.generator_for(1, testing.SEED_HIGH)).state_dict()
    assert not torch.equal(first["proj_out.weight"], second["proj_out.weight"])


def test_cache_is_reused_when_complete(cached: TinyCheckpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(root: Path, seed: int = 0) -> TinyCheckpoints:
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(testing, "make_tiny_checkpoints", fail)
    assert testing.tiny_checkpoints(cached.root) == cached
    monkeypatch.setenv("BERNINI_TINY_DIR", str(cached.root))
    assert testing.tiny_checkpoints() == cached


def fake_build(root: Path, seed: int = 0) -> TinyCheckpoints:
    """Stand-in for the real builder: just the folders, so the marker logic is tested quickly."""
    layout = testing.layout_for(root)
    for path in layout.paths():
        path.mkdir(parents=True)
        (path / "built").write_text(str(seed))
    return layout


def test_half_built_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testing, "make_tiny_checkpoints", fake_build)
    layout = testing.layout_for(tmp_path)
    layout.diffusers.mkdir()
    (layout.diffusers / "stale").write_text("half-written")
    result = testing.tiny_checkpoints(tmp_path)
    assert result == layout
    assert (tmp_path / testing.MARKER_NAME).is_file()
    assert not (layout.diffusers / "stale").exists()
    assert all((path / "built").is_file() for path in layout.paths())
    assert not list(tmp_path.glob(".staging-*"))


def test_marker_from_another_version_triggers_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testing, "make_tiny_checkpoints", fake_build)
    testing.tiny_checkpoints(tmp_path)
    (tmp_path / testing.MARKER_NAME).write_text('{"format": 0}\n')
    (testing.layout_for(tmp_path).separate / "built").unlink()
    testing.tiny_checkpoints(tmp_path)
    assert (testing.layout_for(tmp_path).separate / "built").is_file()


def test_refuses_to_overwrite(built: TinyCheckpoints) -> None:
    with pytest.raises(FileExistsError):
        testing.make_tiny_checkpoints(built.root)
