"""Tests for bernini.weights: locating checkpoints and loading them into meta-device modules."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from bernini import weights
from bernini.models import WanTransformer
from bernini.testing import TINY_TRANSFORMER_CONFIG, TinyCheckpoints, tiny_checkpoints
from bernini.weights import (
    WeightsError,
    checkpoint_identity,
    find_expert_tensors,
    find_safetensors,
    load_weights,
    resolve_model_dir,
    select_expert_keys,
)


@pytest.fixture(scope="module")
def tiny() -> TinyCheckpoints:
    return tiny_checkpoints()


@pytest.fixture(scope="module")
def reference(tiny: TinyCheckpoints) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts diffusers itself loads, per expert."""
    return {
        "high": WanTransformer3DModel.from_pretrained(tiny.diffusers / "transformer").state_dict(),
        "low": WanTransformer3DModel.from_pretrained(tiny.diffusers / "transformer_2").state_dict(),
    }


def empty_model(**overrides: object) -> WanTransformer3DModel:
    with init_empty_weights():
        return WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides})


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert not state[key].is_meta, key
        assert torch.equal(state[key].float(), value.float()), key


def copy_folder(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def drop_key(folder: Path, key: str) -> None:
    """Delete one tensor from a copied shard set, index included."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"].pop(key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


# --------------------------------------------------------------------------- loading


def test_load_diffusers_folder_float32(tiny: TinyCheckpoints, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    model = empty_model()
    report = load_weights(model, find_safetensors(tiny.diffusers / "transformer"), device="cpu", dtype=torch.float32)
    assert_same_state(model, reference["high"])
    assert report.loaded == len(reference["high"]) and not report.missing and not report.unexpected
    assert "transformer" in report.source


def test_keep_fp32_is_diffusers_list() -> None:
    # The one list (beside the model) is diffusers' own, less rope, whose frequencies are not stored.
    assert set(WanTransformer.keep_fp32) == set(WanTransformer3DModel._keep_in_fp32_modules) - {"rope"}


def test_default_dtype_is_bf16_with_fp32_modules(tiny: TinyCheckpoints, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    model = empty_model()
    load_weights(model, find_safetensors(tiny.diffusers / "transformer"), device="cpu")
    kept = 0
    for key, value in model.state_dict().items():
        if any(part in WanTransformer.keep_fp32 for part in key.split(".")):
            kept += 1
            assert value.dtype == torch.float32, key
            assert torch.equal(value, reference["high"][key]), key
        else:
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, reference["high"][key].to(torch.bfloat16)), key
    assert kept >= 5  # scale_shift_table, time_embedder.*, norm2.* are all present
    assert model.rope.freqs_cos.device.type == "cpu" and model.rope.freqs_cos.dtype == torch.float32


def test_load_separate_high_prefers_ema(tiny: TinyCheckpoints, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    model = empty_model()
    tensors = find_expert_tensors(tiny.separate_high, "high")
    assert all(file_key.startswith("ema.diff_dec.transformer.") for _, file_key in tensors.values())
    report = load_weights(model, tensors, device="cpu", dtype=torch.float32)
    assert_same_state(model, reference["high"])
    assert not report.missing and not report.unexpected


def test_load_separate_low(tiny: TinyCheckpoints, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    model = empty_model()
    load_weights(model, find_expert_tensors(tiny.separate_low, "low"), device="cpu", dtype=torch.float32)
    assert_same_state(model, reference["low"])


def test_load_from_index_json_path(tiny: TinyCheckpoints, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    files = find_safetensors(tiny.separate_high / "model.safetensors.index.json")
    selected = select_expert_keys(files, "high")
    model = empty_model()
    load_weights(model, {key: (files[file_key], file_key) for key, file_key in selected.items()}, device="cpu", dtype=torch.float32)
    assert_same_state(model, reference["high"])


@pytest.mark.parametrize(("root", "expert", "folder"), [("diffusers", "low", "transformer_2"), ("separate", "high", "bernini_renderer_high")])
def test_repo_root_descends_to_the_expert(tiny: TinyCheckpoints, root: str, expert: str, folder: str) -> None:
    tensors = find_expert_tensors(getattr(tiny, root), expert)
    assert {file.parent.name for file, _ in tensors.values()} == {folder}


def test_loaded_model_matches_diffusers_forward(tiny: TinyCheckpoints) -> None:
    model = empty_model()
    load_weights(model, find_expert_tensors(tiny.separate_low, "low"), device="cpu", dtype=torch.float32)
    expected_model = WanTransformer3DModel.from_pretrained(tiny.diffusers / "transformer_2")
    hidden = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(hidden, timestep=torch.tensor([300]), encoder_hidden_states=text, return_dict=False)[0]
        want = expected_model(hidden, timestep=torch.tensor([300]), encoder_hidden_states=text, return_dict=False)[0]
    ours, theirs = model.state_dict(), expected_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # the loaded weights: exact
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())  # in memory of their own, not the file's
    # Two implementations of one forward: their float32 sums run in different orders, and CPU GEMMs
    # also round by where each copy of the weights sits (diffusers keeps views of the mapped file).
    # Seen 5e-7 apart on values of unit scale; 1e-5 leaves 20x for other CPUs and thread counts.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_expert_folder_is_refused(tiny: TinyCheckpoints) -> None:
    with pytest.raises(WeightsError, match="bernini_renderer_low.*no high-noise expert"):
        find_expert_tensors(tiny.separate_low, "high")


def test_missing_key_strict_then_fallback(tiny: TinyCheckpoints, tmp_path: Path, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    folder = copy_folder(tiny.separate_high, tmp_path)
    dropped = "blocks.1.attn2.to_k.weight"
    drop_key(folder, f"ema.diff_dec.transformer.{dropped}")
    drop_key(folder, f"diff_dec.transformer.{dropped}")
    primary = find_expert_tensors(folder, "high")
    with pytest.raises(WeightsError, match=r"lacks 1 of the 69 weights.*blocks\.1\.attn2\.to_k\.weight.*[Ww]rong architecture"):
        load_weights(empty_model(), primary, device="cpu")

    relaxed = empty_model()
    report = load_weights(relaxed, primary, device="cpu", strict=False)
    assert report.missing == (dropped,)

    base = find_expert_tensors(tiny.wan_base, "high")
    model = empty_model()
    report = load_weights(model, [primary, base], device="cpu", dtype=torch.float32)
    assert report.missing == () and report.loaded_per_source == (68, 1)
    assert "fallback" in report.source
    base_value = load_file(str(base[dropped][0]))[dropped]
    state = model.state_dict()
    assert torch.equal(state[dropped], base_value)
    assert not torch.equal(state[dropped], reference["high"][dropped])
    assert torch.equal(state["blocks.1.attn2.to_q.weight"], reference["high"]["blocks.1.attn2.to_q.weight"])


def test_shape_mismatch_is_a_weights_error(tiny: TinyCheckpoints) -> None:
    with pytest.raises(WeightsError, match="shape.*config does not match"):
        load_weights(empty_model(ffn_dim=96), find_safetensors(tiny.diffusers / "transformer"), device="cpu")


def test_unexpected_keys_are_reported(tiny: TinyCheckpoints, caplog: pytest.LogCaptureFixture) -> None:
    files = find_safetensors(tiny.diffusers / "transformer")
    caplog.set_level(logging.WARNING, logger="bernini.weights")
    report = load_weights(empty_model(num_layers=1), files, device="cpu", strict=True)
    assert report.unexpected and all(key.startswith("blocks.1.") for key in report.unexpected)
    assert "unused by the module" in caplog.text


def test_meta_buffers_need_init_empty_weights(tiny: TinyCheckpoints) -> None:
    with torch.device("meta"):
        model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    with pytest.raises(WeightsError, match=r"rope\.freqs_cos.*init_empty_weights"):
        load_weights(model, find_safetensors(tiny.diffusers / "transformer"), device="cpu")


def test_tied_parameters_stay_tied(tiny: TinyCheckpoints) -> None:
    from transformers import UMT5EncoderModel

    directory = tiny.diffusers / "text_encoder"
    expected = UMT5EncoderModel.from_pretrained(directory)
    with init_empty_weights():
        model = UMT5EncoderModel(expected.config)
    report = load_weights(model, find_safetensors(directory), device="cpu", dtype=torch.float32)
    assert not report.missing
    assert model.encoder.embed_tokens.weight is model.shared.weight
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# --------------------------------------------------------------------------- expert key selection


def test_bare_prefix_does_not_capture_other_namespaces() -> None:
    keys = ["transformer_2.blocks.0.x", "ema.diff_dec.text_encoder.y", "blocks.0.x"]
    assert select_expert_keys(keys, "high") == {"blocks.0.x": "blocks.0.x"}
    assert select_expert_keys(keys, "low") == {"blocks.0.x": "transformer_2.blocks.0.x"}
    assert select_expert_keys(["transformer_2.a"], "high") == {}


def test_prefix_order_and_ema_preference() -> None:
    keys = ["diff_dec.transformer.a", "ema.diff_dec.transformer.a", "diff_dec.transformer.b", "transformer.a", "ema.diff_dec.transformer_2.a"]
    assert select_expert_keys(keys, "high") == {"a": "ema.diff_dec.transformer.a", "b": "diff_dec.transformer.b"}
    assert select_expert_keys(keys, "low") == {"a": "ema.diff_dec.transformer_2.a"}
    assert select_expert_keys(["transformer.a", "transformer_2.a"], "high") == {"a": "transformer.a"}
    assert select_expert_keys(["ema.a", "a"], "high") == {"a": "ema.a"}
    with pytest.raises(WeightsError, match="unknown expert"):
        select_expert_keys(keys, "middle")


# --------------------------------------------------------------------------- locating and refusing


def test_truncated_shard_names_the_file(tiny: TinyCheckpoints, tmp_path: Path) -> None:
    folder = copy_folder(tiny.diffusers / "transformer", tmp_path)
    shard = folder / "diffusion_pytorch_model-00002-of-00008.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model-00002-of-00008\.safetensors.*re-download"):
        find_safetensors(folder)


def test_single_truncated_file(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64)}, str(file))
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        find_safetensors(file)


def test_missing_shard_is_named(tiny: TinyCheckpoints, tmp_path: Path) -> None:
    folder = copy_folder(tiny.separate_low, tmp_path)
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model-00003-of-00003\.safetensors.*missing"):
        find_safetensors(folder)


def test_pickles_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(WeightsError, match=r"pytorch_model\.bin.*only \.safetensors.*arbitrary code"):
        find_safetensors(tmp_path)
    with pytest.raises(WeightsError, match="safetensors"):
        find_safetensors(tmp_path / "pytorch_model.bin")


def test_repo_root_without_weights_points_at_subfolders(tiny: TinyCheckpoints) -> None:
    with pytest.raises(WeightsError, match="transformer, transformer_2"):
        find_safetensors(tiny.diffusers)


def test_unindexed_folder_is_scanned(tiny: TinyCheckpoints, tmp_path: Path) -> None:
    folder = copy_folder(tiny.separate_high, tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    expected = {key: folder / path.name for key, path in find_safetensors(tiny.separate_high).items()}
    assert find_safetensors(folder) == expected


def test_local_directory_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_missing_local_path(tmp_path: Path) -> None:
    for text in (str(tmp_path / "nope"), "./nope/x", "a/b/c"):
        with pytest.raises(WeightsError, match="does not exist"):
            resolve_model_dir(text)


def test_uncached_repo_offline_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as caught:
        resolve_model_dir("some-org/some-repo", subfolders=["transformer"])
    message = str(caught.value)
    assert "hf download some-org/some-repo --local-dir some-repo" in message
    assert "--config some-repo" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(WeightsError, match="hf download some-org/some-repo"):
        find_safetensors("some-org/some-repo")


def fake_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """Lay out a repo the way huggingface_hub caches it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_cached_repo_resolves_offline(tiny: TinyCheckpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = fake_hub_snapshot(tmp_path / "cache", "ByteDance/Bernini-R")
    shutil.copytree(tiny.separate_high, snapshot / "bernini_renderer_high")
    assert resolve_model_dir("ByteDance/Bernini-R", subfolders=["bernini_renderer_high"]) == snapshot
    tensors = find_expert_tensors("ByteDance/Bernini-R", "high")
    assert len(tensors) == 69
    with pytest.raises(WeightsError, match="lacks bernini_renderer_low"):
        resolve_model_dir("ByteDance/Bernini-R", subfolders=["bernini_renderer_low"])


def test_hub_import_is_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, bernini.weights; print('huggingface_hub' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- identity


def test_checkpoint_identity(tiny: TinyCheckpoints, tmp_path: Path) -> None:
    folder = copy_folder(tiny.separate_high, tmp_path)
    first = checkpoint_identity([folder])
    names = [entry["name"] for entry in first["files"]]
    assert "bernini_renderer_high/model.safetensors.index.json" in names
    assert all(entry["size"] > 0 and entry["mtime"] > 0 for entry in first["files"])
    assert len(first["json_sha256"]) == 16
    json.dumps(first)  # sidecars are json
    assert checkpoint_identity([folder]) == first
    single = checkpoint_identity([folder / "model-00001-of-00003.safetensors"])
    assert {entry["name"] for entry in single["files"]} == {
        "bernini_renderer_high/model-00001-of-00003.safetensors",
        "bernini_renderer_high/model.safetensors.index.json",
    }
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text() + " ")
    assert checkpoint_identity([folder])["json_sha256"] != first["json_sha256"]
    with pytest.raises(WeightsError, match="does not exist"):
        checkpoint_identity([tmp_path / "gone"])


def test_weights_error_is_a_value_error() -> None:
    assert issubclass(weights.WeightsError, ValueError)
