"""LoRAs: every key layout merges like the test's own numpy merge, per expert, with offload and fp8; bad ones fail early.

Each test writes random low-rank factors for the tiny checkpoint in one layout (diffusers/PEFT, original
Wan/ComfyUI with .alpha and full .diff/.diff_b deltas, musubi/kohya), merges them itself with numpy in
float64 (its own Wan -> diffusers name table), and compares renders with the LoRA against renders of
that merged checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from bernini import fp8, lora
from bernini.cases import Case, load_case_file
from bernini.cli import build_parser, runtime_from
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.pipeline import Renderer
from bernini.testing import tiny_checkpoints

REPO = Path(__file__).resolve().parent.parent
CASE = REPO / "assets" / "testcases" / "t2v" / "t2v.json"
SMALL = GenerationSettings(num_inference_steps=2, num_frames=5, height=32, width=48)
RUNTIME = dict(device="cpu", dtype="float32", attention="sdpa")
RANK = 4
FP8_RENDER_RTOL = 0.02  # tests/test_fp8.py: relative L2 of an fp8 render against full precision, float32
EXPERT_FILES = {"high": "transformer", "low": "transformer_2"}

# The test's own name table: original Wan module -> diffusers module (bernini uses diffusers' converters).
WAN_TO_DIFFUSERS = {
    **{f"self_attn.{a}": f"attn1.{b}" for a, b in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)},
    **{f"cross_attn.{a}": f"attn2.{b}" for a, b in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)},
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Full-weight deltas of the Wan layout (ComfyUI's .diff/.diff_b): Wan key -> diffusers key.
WAN_FULL = {
    "blocks.0.norm3.diff": "blocks.0.norm2.weight",  # Wan's norm3 is the cross-attention norm
    "blocks.1.cross_attn.k.diff_b": "blocks.1.attn2.to_k.bias",
    "blocks.0.self_attn.norm_q.diff": "blocks.0.attn1.norm_q.weight",
    "blocks.1.modulation.diff": "blocks.1.scale_shift_table",
    "head.head.diff": "proj_out.weight",
    "patch_embedding.diff": "patch_embedding.weight",
}

Arrays = dict[str, np.ndarray]


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's names: the fused self-attention QKV split back (exact: a concatenation)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".to_qkv." in key:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                state[key.replace("to_qkv", name)] = part
        else:
            state[key] = value
    return state


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_checkpoints().diffusers


@pytest.fixture(scope="module")
def case() -> Case:
    return load_case_file(CASE)


@pytest.fixture(scope="module")
def plain(tiny: Path, case: Case) -> torch.Tensor:
    """The render without any LoRA."""
    return render(tiny, case, RuntimeConfig(**RUNTIME))[1]  # type: ignore[arg-type]


def weights_of(root: Path, expert: str) -> Arrays:
    files = sorted((root / EXPERT_FILES[expert]).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def targets(base: Arrays) -> list[tuple[str, str]]:
    """(Wan module, diffusers module) of every block Linear."""
    blocks = sorted({int(k.split(".")[1]) for k in base if k.startswith("blocks.")})
    return [(f"blocks.{i}.{w}", f"blocks.{i}.{d}") for i in blocks for w, d in WAN_TO_DIFFUSERS.items()]


def factors(base: Arrays, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """diffusers module -> (up [out, r], down [r, in]) with a delta about 30% of the weight's size."""
    rng = np.random.default_rng(seed)
    out = {}
    for _, module in targets(base):
        w = base[module + ".weight"]
        up = rng.standard_normal((w.shape[0], RANK)).astype(np.float32)
        down = rng.standard_normal((RANK, w.shape[1])).astype(np.float32) * (0.3 * np.abs(w).mean() / RANK**0.5)
        out[module] = (up, down)
    return out


def full_deltas(base: Arrays, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {wan: (rng.standard_normal(base[key].shape) * 0.05).astype(np.float32) for wan, key in WAN_FULL.items()}


# --------------------------------------------------------------------------- the three layouts, and the test's merge


def write_peft(path: Path, f: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float) -> None:
    tensors = {}
    for module, (up, down) in f.items():
        tensors[f"transformer.{module}.lora_A.weight"] = down
        tensors[f"transformer.{module}.lora_B.weight"] = up
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": alpha, "transformer.r": RANK})}
    save_file(tensors, str(path), metadata=metadata)


def write_wan(path: Path, f: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, full: Arrays, base: Arrays) -> None:
    wan_of = {d: w for w, d in targets(base)}
    tensors = {}
    for module, (up, down) in f.items():
        name = f"diffusion_model.{wan_of[module]}"
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    tensors.update({f"diffusion_model.{k}": v for k, v in full.items()})
    save_file(tensors, str(path))


def write_musubi(path: Path, f: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, base: Arrays) -> None:
    wan_of = {d: w for w, d in targets(base)}
    tensors = {}
    for module, (up, down) in f.items():
        name = "lora_unet_" + wan_of[module].replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path))


def merged(base: Arrays, f: dict[str, tuple[np.ndarray, np.ndarray]], factor: float, full: Arrays | None = None, full_scale: float = 1.0) -> Arrays:
    """W + factor * up @ down, plus full_scale * each full delta, in float64, stored as float32."""
    out = {k: v.astype(np.float64) for k, v in base.items()}
    for module, (up, down) in f.items():
        out[module + ".weight"] += factor * (up.astype(np.float64) @ down.astype(np.float64))
    for wan, delta in (full or {}).items():
        out[WAN_FULL[wan]] += full_scale * delta.astype(np.float64)
    return {k: v.astype(np.float32) for k, v in out.items()}


def checkpoint_with(root: Path, tiny: Path, experts: dict[str, Arrays]) -> Path:
    """A copy of the tiny checkpoint whose expert weights are the given arrays."""
    shutil.copytree(tiny, root, dirs_exist_ok=True)
    for expert, arrays in experts.items():
        folder = root / EXPERT_FILES[expert]
        for old in folder.glob("*.safetensors*"):
            old.unlink()
        save_file(arrays, str(folder / "diffusion_pytorch_model.safetensors"))
    return root


def runtime_for(*flags: str) -> RuntimeConfig:
    """Through the CLI's own flags, as a user would pass them."""
    return runtime_from(build_parser("test").parse_args(["--device", "cpu", "--dtype", "float32", "--attention", "sdpa", *flags]))


def render(config: Path, case: Case, runtime: RuntimeConfig) -> tuple[Renderer, torch.Tensor]:
    renderer = Renderer.from_pretrained(str(config), runtime=runtime)
    latent = renderer.render(case, SMALL).latent
    assert latent is not None
    return renderer, latent


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --------------------------------------------------------------------------- each layout equals the numpy merge


LAYOUTS = ["peft", "wan", "musubi"]


def lora_file(layout: str, path: Path, base: Arrays, seed: int) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]], float, Arrays | None]:
    """Write one layout; returns the file, its factors, alpha / rank and its full deltas."""
    f = factors(base, seed)
    if layout == "peft":
        write_peft(path, f, alpha=8.0)
        return path, f, 8.0 / RANK, None
    if layout == "wan":
        full = full_deltas(base, seed + 1)
        write_wan(path, f, alpha=2.0, full=full, base=base)
        return path, f, 2.0 / RANK, full
    write_musubi(path, f, alpha=1.0, base=base)
    return path, f, 1.0 / RANK, None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_equals_the_numpy_merge(layout: str, tiny: Path, case: Case, plain: torch.Tensor, tmp_path: Path) -> None:
    scale = 0.7
    high, low = weights_of(tiny, "high"), weights_of(tiny, "low")
    file, f, factor, full = lora_file(layout, tmp_path / f"{layout}.safetensors", high, seed=1)
    experts = {name: merged(w, f, scale * factor, full, full_scale=scale) for name, w in (("high", high), ("low", low))}
    reference = checkpoint_with(tmp_path / "merged", tiny, experts)
    _, expected = render(reference, case, RuntimeConfig(**RUNTIME))  # type: ignore[arg-type]
    _, got = render(tiny, case, runtime_for("--lora", f"{file}:{scale}"))
    assert rel_err(got, expected) < 1e-5
    assert rel_err(plain, expected) > 1e-3  # the LoRA really changes the render


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_high_leaves_the_low_expert_bit_identical(layout: str, tiny: Path, case: Case, tmp_path: Path) -> None:
    high = weights_of(tiny, "high")
    file, f, factor, full = lora_file(layout, tmp_path / f"{layout}.safetensors", high, seed=2)
    with_lora = Renderer.from_pretrained(str(tiny), runtime=runtime_for("--lora_high", str(file)))
    plain = Renderer.from_pretrained(str(tiny), runtime=RuntimeConfig(**RUNTIME))  # type: ignore[arg-type]
    for key, value in checkpoint_state(plain.experts["low"]).items():
        assert torch.equal(checkpoint_state(with_lora.experts["low"])[key], value), key
    expected = merged(high, f, factor, full)
    got = checkpoint_state(with_lora.experts["high"])
    worst = max(float(np.abs(got[k].numpy() - v).max() / max(np.abs(v).max(), 1e-12)) for k, v in expected.items())
    assert worst < 1e-6
    reference = checkpoint_with(tmp_path / "merged", tiny, {"high": expected})
    _, want = render(reference, case, RuntimeConfig(**RUNTIME))  # type: ignore[arg-type]
    assert rel_err(with_lora.render(case, SMALL).latent, want) < 1e-5


def test_several_loras_add_up(tiny: Path, case: Case, tmp_path: Path) -> None:
    high, low = weights_of(tiny, "high"), weights_of(tiny, "low")
    a, fa, factor_a, _ = lora_file("peft", tmp_path / "a.safetensors", high, seed=3)
    b, fb, factor_b, _ = lora_file("musubi", tmp_path / "b.safetensors", high, seed=4)
    both_high = merged(merged(high, fa, 0.5 * factor_a), fb, factor_b)
    only_a_low = merged(low, fa, 0.5 * factor_a)
    reference = checkpoint_with(tmp_path / "merged", tiny, {"high": both_high, "low": only_a_low})
    _, expected = render(reference, case, RuntimeConfig(**RUNTIME))  # type: ignore[arg-type]
    _, got = render(tiny, case, runtime_for("--lora", f"{a}:0.5", "--lora_high", str(b)))
    assert rel_err(got, expected) < 1e-5


# --------------------------------------------------------------------------- memory plans and fp8


def test_lora_with_block_offload_is_the_resident_render(tiny: Path, case: Case, tmp_path: Path) -> None:
    high, low = weights_of(tiny, "high"), weights_of(tiny, "low")
    file, f, factor, full = lora_file("wan", tmp_path / "wan.safetensors", high, seed=5)
    _, resident = render(tiny, case, runtime_for("--lora", str(file), "--offload", "none"))
    _, streamed = render(tiny, case, runtime_for("--lora", str(file), "--offload", "block"))
    assert torch.equal(streamed, resident)  # offloading is lossless, and the blockwise loader merged the same weights
    reference = checkpoint_with(tmp_path / "merged", tiny, {"high": merged(high, f, factor, full), "low": merged(low, f, factor, full)})
    _, expected = render(reference, case, RuntimeConfig(**RUNTIME))  # type: ignore[arg-type]
    assert rel_err(streamed, expected) < 1e-5


def test_lora_with_fp8_weights_is_merged_before_conversion(tiny: Path, case: Case, tmp_path: Path) -> None:
    high, low = weights_of(tiny, "high"), weights_of(tiny, "low")
    file, f, factor, _ = lora_file("peft", tmp_path / "peft.safetensors", high, seed=6)
    merged_high, merged_low = merged(high, f, factor), merged(low, f, factor)
    reference = checkpoint_with(tmp_path / "merged", tiny, {"high": merged_high, "low": merged_low})
    _, full_precision = render(reference, case, RuntimeConfig(**RUNTIME))  # type: ignore[arg-type]
    quantized, got = render(tiny, case, runtime_for("--lora", str(file), "--weights", "fp8"))
    assert 0 < rel_l2(got, full_precision) < FP8_RENDER_RTOL
    fused = quantized.experts["high"].blocks[0].attn1.to_qkv  # self-attention's Q, K, V rows in one Linear
    assert isinstance(fused, fp8.FP8Linear)
    want_w, want_s = fp8.quantize(torch.from_numpy(merged_high["blocks.0.attn1.to_q.weight"]))
    base_w, _ = fp8.quantize(torch.from_numpy(high["blocks.0.attn1.to_q.weight"]))
    rows = want_w.shape[0]  # scales are per output row, so the Q rows of the fused weight quantize on their own
    weight, scale = fused.weight[:rows], fused.weight_scale[:rows]
    same = (weight.view(torch.uint8) == want_w.view(torch.uint8)).float().mean()
    assert same > 0.99 and torch.allclose(scale, want_s, rtol=1e-6)  # the merged weight was quantized
    assert (weight.view(torch.uint8) == base_w.view(torch.uint8)).float().mean() < 0.5  # not the base weight


# --------------------------------------------------------------------------- LoRAs that cannot be merged fail before any model loads


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from bernini import pipeline

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model started loading")

    monkeypatch.setattr(pipeline.TextEncoder, "load", refuse)
    monkeypatch.setattr(pipeline.VAE, "load", refuse)
    monkeypatch.setattr(pipeline, "load_expert", refuse)


def bad_loras(base: Arrays, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the words the error must contain)."""
    rng = np.random.default_rng(0)
    small = {f"diffusion_model.blocks.{i}.self_attn.q.lora_{s}.weight": rng.standard_normal(shape).astype(np.float32)
             for i in range(2) for s, shape in (("down", (RANK, 64)), ("up", (64, RANK)))}  # dim 64, not 48
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((RANK, 48), np.float32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((48, RANK), np.float32)}
    kohya_flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.zeros((RANK, 48), np.float32),
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": np.zeros((144, RANK), np.float32),
                  "lora_unet_double_blocks_0_img_attn_qkv.alpha": np.array(4.0, np.float32)}
    f = factors(base, 7)
    beyond = {f"diffusion_model.blocks.{i}.ffn.0.lora_{s}.weight": (f["blocks.0.ffn.net.0.proj"][0] if s == "up" else f["blocks.0.ffn.net.0.proj"][1])
              for i in (0, 7) for s in ("down", "up")}  # the tiny model has blocks 0 and 1
    out = {}
    for name, tensors, words in (
        ("other_architecture", small, "another architecture.*2 of its 2 weights.*\\[64, 64\\] vs \\[48, 48\\]"),
        ("flux_diffusers", flux, "all 1 weights it changes match no weight.*single_transformer_blocks"),
        ("flux_kohya", kohya_flux, "not a Wan DiT LoRA in the musubi layout"),
        ("no_match", beyond, "1 of the 2 weights it changes match no weight.*blocks.7.ffn.net.0.proj.weight"),
    ):
        save_file(tensors, str(folder / f"{name}.safetensors"))
        out[name] = (folder / f"{name}.safetensors", words)
    return out


@pytest.mark.parametrize("name", ["other_architecture", "flux_diffusers", "flux_kohya", "no_match"])
def test_unmergeable_loras_fail_before_any_model_loads(name: str, tiny: Path, tmp_path: Path, no_model_loads: None) -> None:
    file, words = bad_loras(weights_of(tiny, "high"), tmp_path)[name]
    with pytest.raises(ValueError, match=words) as error:
        Renderer.from_pretrained(str(tiny), runtime=runtime_for("--lora", str(file)))
    assert str(file) in str(error.value)


def test_cli_refuses_a_bad_lora_with_exit_2_before_loading(tiny: Path, tmp_path: Path, no_model_loads: None, capsys: pytest.CaptureFixture[str]) -> None:
    from bernini.main import main

    file, _ = bad_loras(weights_of(tiny, "high"), tmp_path)["other_architecture"]
    args = ["--config", str(tiny), "--case", str(REPO / "assets" / "testcases" / "t2v"), "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--lora", str(file)]
    assert main(args) == 2
    assert main([*args, "--dry-run"]) == 2
    missing = main(["--config", str(tiny), "--case", str(REPO / "assets" / "testcases" / "t2v"), "--device", "cpu", "--lora", str(tmp_path / "absent.safetensors")])
    assert missing == 2


def test_lora_on_a_one_expert_model(tiny: Path, tmp_path: Path, no_model_loads: None) -> None:
    file, _, _, _ = lora_file("peft", tmp_path / "peft.safetensors", weights_of(tiny, "high"), seed=8)
    refs = lora.resolve([("lora", str(file)), ("lora_low", str(file))])
    configs = {"high": tiny / "transformer" / "config.json"}
    with pytest.raises(ValueError, match="for the 'low' expert, but this model has only high"):
        lora.prepare(refs[2:], configs)
    assert list(lora.prepare(refs[:2], configs)) == ["high"]  # --lora: the expert it has


# --------------------------------------------------------------------------- specs, hub ids, records


def test_spec_parsing() -> None:
    assert lora.parse_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert lora.parse_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert lora.parse_spec("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    assert lora.parse_spec("org/repo/f.safetensors:-1") == ("org/repo/f.safetensors", -1.0)
    with pytest.raises(ValueError, match="not a finite number"):
        lora.parse_spec("a.safetensors:nan")


def test_hub_ids_resolve_offline_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Path) -> None:
    snapshot = tmp_path / "hub" / "models--acme--wan-loras" / "snapshots" / "0123abcd"
    (snapshot / "style").mkdir(parents=True)
    lora_file("peft", snapshot / "style" / "ink.safetensors", weights_of(tiny, "high"), seed=9)
    (tmp_path / "hub" / "models--acme--wan-loras" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--wan-loras" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = lora.locate("acme/wan-loras/style/ink.safetensors")
    assert found.resolve() == (snapshot / "style" / "ink.safetensors").resolve()
    assert lora.locate("acme/wan-loras").resolve() == found.resolve()  # the repo's only .safetensors
    with pytest.raises(ValueError, match="hf download acme/other f.safetensors"):
        lora.locate("acme/other/f.safetensors")


def test_pickles_and_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        lora.locate(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="is a folder"):
        lora.locate(str(tmp_path))


def test_sidecar_and_summary_record_each_lora(tiny: Path, tmp_path: Path) -> None:
    from bernini.main import main

    file, _, _, _ = lora_file("peft", tmp_path / "style.safetensors", weights_of(tiny, "high"), seed=10)
    out = tmp_path / "out"
    flags = ["--config", str(tiny), "--case", str(REPO / "assets" / "testcases" / "t2v" / "t2v.json"), "--device", "cpu", "--dtype", "float32",
             "--num_inference_steps", "2", "--height", "32", "--width", "48", "--num_frames", "5", "--output_dir", str(out)]
    assert main([*flags, "--lora_low", f"{file}:0.25"]) == 0
    sidecar = json.loads((out / "t2v.mp4.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    want = [{"source": f"{file}", "file": str(file.resolve()), "sha256": digest, "scale": 0.25, "expert": "low"}]
    assert sidecar["runtime"]["loras"] == want and summary["runtime"]["loras"] == want
    first = sidecar["fingerprint"]
    assert main([*flags, "--skip-existing"]) == 0  # without the LoRA the output is not the same: redone
    assert json.loads((out / "t2v.mp4.json").read_text())["fingerprint"] != first


def test_dry_run_lists_the_loras(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_loads: None) -> None:
    from bernini.main import main

    file, _, _, _ = lora_file("musubi", tmp_path / "m.safetensors", weights_of(tiny, "high"), seed=11)
    code = main(["--config", str(tiny), "--case", str(REPO / "assets" / "testcases" / "t2v"), "--device", "cpu", "--output_dir", str(tmp_path), "--lora_high", f"{file}:0.5", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"LoRA high: {file} x 0.5 (20 weights, sha256 {hashlib.sha256(file.read_bytes()).hexdigest()[:12]}" in out
    assert "passes: steps 1-17 high" in out



# --------------------------------------------------------------------------- the demo's LoRA picker


def test_demo_picker_loads_the_experts_again_only_for_a_new_set(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("gradio", reason="the demo needs gradio (requirements.txt)")
    from bernini import demo
    from bernini.driver import Session
    from bernini.engine import Engine
    from bernini.parallel import LocalPeers
    from bernini.pipeline import resolve_sources

    folder = tmp_path / "loras"
    folder.mkdir()
    lora_file("peft", folder / "ink.safetensors", weights_of(tiny, "high"), seed=12)
    sources = resolve_sources(str(tiny))
    runtime = RuntimeConfig(**RUNTIME)  # type: ignore[arg-type]
    renderer = Renderer.load(sources, runtime)
    runner = demo.JobRunner(Session(Engine(renderer, sources)), LocalPeers())
    loads: list[tuple[lora.LoraRef, ...]] = []

    def switch(refs: tuple[lora.LoraRef, ...]) -> None:  # what serve_single does, minus freeing memory
        loads.append(refs)
        fresh = Renderer.load(sources, RuntimeConfig(**RUNTIME, loras=refs))  # type: ignore[arg-type]
        runner.session = Session(Engine(fresh, sources))

    settings = GenerationSettings(num_inference_steps=2, num_frames=5, height=32, width=48)
    service = demo.DemoService(runner, settings, tmp_path / "saved", lora_dir=folder, switch_loras=switch)
    assert service.lora_files() == ["ink.safetensors"]
    request = demo.DemoRequest("t2v", "a boat", loras=(("ink.safetensors", 0.5, "lora_high"),))
    first = service.generate(request)
    second = service.generate(request)
    assert len(loads) == 1 and [(r.scale, r.expert) for r in loads[0]] == [(0.5, "high")]
    recorded = json.loads(first.sidecar.read_text())["runtime"]["loras"]
    assert recorded == json.loads(second.sidecar.read_text())["runtime"]["loras"] and recorded[0]["expert"] == "high"
    service.generate(demo.DemoRequest("t2v", "a boat"))  # nothing picked: the plain experts again
    assert loads[-1] == ()
    with pytest.raises(ValueError, match="is not a .safetensors file of"):
        service.prepare(demo.DemoRequest("t2v", "a boat", loras=(("../elsewhere.safetensors", 1.0, "lora"),)))
    no_folder = demo.DemoService(runner, settings, tmp_path / "saved")
    with pytest.raises(ValueError, match="start the demo with --lora_dir"):
        no_folder.prepare(request)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", ["none", "block"])
def test_cuda_merge_equals_the_cpu_merge(tiny: Path, tmp_path: Path, offload: str) -> None:
    """On the GPU the merge runs where the tensor is read (straight onto the device, or block by block before packing)."""
    file, f, factor, full = lora_file("wan", tmp_path / "wan.safetensors", weights_of(tiny, "high"), seed=13)
    expected = merged(weights_of(tiny, "high"), f, factor, full)
    gpu = Renderer.from_pretrained(str(tiny), runtime=runtime_for("--lora", str(file), "--offload", offload, "--device", "cuda", "--no-compile"))
    model = gpu.experts["high"]
    store = gpu.store
    store("high")  # on the device as the plan places it
    got = {k: v.detach().float().cpu() for k, v in checkpoint_state(model).items()}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], torch.from_numpy(value), rtol=1e-5, atol=1e-6)
