"""Batches on the tiny checkpoint: summary and exit codes, failures, safe writes, resume, logs, --pe_only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from media_files import encode_audio_only, small_clip
from PIL import Image

from bernini import driver, media, runner
from bernini import main as entry
from bernini.cases import load_case_file
from bernini.models import WanTransformer
from bernini.pipeline import Renderer

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "testcases"
TINY = ["--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]
SIDECAR_KEYS = {
    "sidecar_version", "created", "output", "fingerprint", "case", "prompt_used", "prompt_enhancer", "seed", "effective", "settings", "plan",
    "timings", "model_load_seconds", "guidance_per_expert", "expert_steps", "attention_backend", "dtype", "device", "runtime", "versions", "checkpoint",
}


pytestmark = pytest.mark.usefixtures("one_thread", "cached_load")


def refuse_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Renderer, "load", classmethod(refuse))
    for target in ("bernini.models.text_encoder.TextEncoder.load", "bernini.models.vae.VAE.load", "bernini.pipeline.load_expert"):
        monkeypatch.setattr(target, refuse)


def run(config: str, *args: str | Path, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    code = entry.main(["--config", config, *map(str, args), *TINY])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def summary_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text())


def statuses(summary: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in summary["cases"]}


def write_case(folder: Path, name: str, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def nan_forward(self: WanTransformer, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.full((tokens.shape[0], tokens.shape[1], self.cfg.patch_features), float("nan"))


def poison(monkeypatch: pytest.MonkeyPatch, name: str, forward: Callable[..., torch.Tensor] = nan_forward) -> None:
    """Make the transformer return NaN only while case `name` renders."""
    real = Renderer.render

    def render(self: Renderer, case: Any, settings: Any, **kwargs: Any) -> Any:
        if case.name != name:
            return real(self, case, settings, **kwargs)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(WanTransformer, "forward", forward)
            return real(self, case, settings, **kwargs)

    monkeypatch.setattr(Renderer, "render", render)


def decoded(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(Image.open(path).convert("RGB"))
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """20 cases: the 8 bundled ones, 4 valid variations, 1 NaN case and 7 invalid ones."""
    root = tmp_path / "cases"
    shutil.copytree(ASSETS, root)
    m = root / "media"
    (m / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
    (m / "empty.mp4").write_bytes(b"")
    small_clip(m / "portrait.mp4", rotation=90, step=25)
    encode_audio_only(m / "voice.m4a")
    var, bad = root / "variations", root / "broken"
    write_case(var, "v2v_plain_cfg", {"task_type": "v2v", "prompt": "make it snow", "video": "../media/source.mp4", "guidance_mode": "v2v"})
    write_case(var, "portrait", {"task_type": "v2v", "prompt": "make it rain", "video": "../media/portrait.mp4"})
    write_case(var, "i2v", {"task_type": "i2v", "prompt": "the scene comes alive", "image": "../media/image.png"})
    write_case(var, "t2v", {"task_type": "t2v", "prompt": "a second t2v case with the same stem as the bundled one"})
    write_case(var, "nan_case", {"task_type": "t2v", "prompt": "this one diverges"})
    write_case(bad, "corrupt_video", {"task_type": "v2v", "prompt": "p", "video": "../media/corrupt.mp4"})
    write_case(bad, "empty_video", {"task_type": "v2v", "prompt": "p", "video": "../media/empty.mp4"})
    write_case(bad, "audio_only", {"task_type": "v2v", "prompt": "p", "video": "../media/voice.m4a"})
    write_case(bad, "missing_image", {"task_type": "r2v", "prompt": "p", "images": ["../media/ref1.jpg", "../media/missing.jpg"]})
    write_case(bad, "bad_key", {"task_type": "t2v", "prompt": "p", "num_frames": 33})
    clash = str(tmp_path / "out" / "clash.mp4")
    write_case(bad, "clash_a", {"task_type": "t2v", "prompt": "a", "output": clash})
    write_case(bad, "clash_b", {"task_type": "t2v", "prompt": "b", "output": clash})
    return root


def test_mixed_batch_of_20(config: str, mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    poison(monkeypatch, "nan_case")
    released: list[int] = []
    real_release = driver.release_memory
    monkeypatch.setattr(driver, "release_memory", lambda: (released.append(1), real_release())[1])
    out = tmp_path / "out"
    code, stdout, err = run(config, "--case", mixed, "--output_dir", out, capsys=capsys)
    assert code == 1, err[-3000:]
    summary = summary_of(out)
    assert stdout.strip().splitlines()[-1] == str(out / "summary.json")
    assert len(summary["cases"]) == 20 and summary["complete"] and summary["exit_code"] == 1
    assert summary["counts"] == {"ok": 12, "failed": 1, "invalid": 7}
    assert summary["timings"]["load"] > 0 and summary["settings"]["seed"] == 42
    status = statuses(summary)
    assert status["nan_case"] == "failed" and status["t2v/t2v"] == "ok" and status["variations/t2v"] == "ok"
    cases = {c["name"]: c for c in summary["cases"]}
    nan = cases["nan_case"]
    assert "step 1/2" in nan["error"] and "non-finite" in nan["error"] and "'high' expert" in nan["error"] and "float32" in nan["error"]
    assert not Path(nan["output"]).exists() and not any(out.glob(".*tmp*"))
    assert released, "memory is released after a failed case"
    invalid = {Path(c["source"]).stem: c["error"] for c in summary["cases"] if c["status"] == "invalid"}
    assert "key 'video'" in invalid["corrupt_video"] and "could not be decoded" in invalid["corrupt_video"]
    assert "key 'video'" in invalid["empty_video"] and "empty (0 bytes)" in invalid["empty_video"]
    assert "key 'video'" in invalid["audio_only"] and "no video stream" in invalid["audio_only"]
    assert "key 'images'" in invalid["missing_image"] and "missing.jpg" in invalid["missing_image"]
    assert "key 'num_frames': unknown key" in invalid["bad_key"]
    assert "clash_b.json" in invalid["clash_a"] and "clash_a.json" in invalid["clash_b"]
    for record in summary["cases"]:
        if record["status"] == "ok":
            assert Path(record["output"]).is_file() and Path(record["output"] + ".json").is_file()
            assert {"text_encode", "vae_encode", "denoise_high", "denoise_low", "decode", "write", "total"} <= set(record["timings"])
    portrait = json.loads(Path(cases["portrait"]["output"] + ".json").read_text())
    assert (portrait["effective"]["width"], portrait["effective"]["height"]) == (32, 64)


def test_all_good_sidecar_and_same_seed_same_frames(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rendered: dict[str, np.ndarray] = {}
    real_write = media.write_media

    def keep(frames: np.ndarray, path: Path, fps: float) -> Path:
        rendered[f"{path.parent.name}/{path.name}"] = np.array(frames)
        return real_write(frames, path, fps)

    monkeypatch.setattr(media, "write_media", keep)
    args = ["--case", ASSETS / "t2i", ASSETS / "t2v", ASSETS / "v2v" / "v2v_case1.json"]
    assert run(config, *args, "--output_dir", tmp_path / "a", capsys=capsys)[0] == 0
    assert run(config, *args, "--output_dir", tmp_path / "b", capsys=capsys)[0] == 0
    for name in ("t2i.png", "t2v.mp4", "v2v_case1.mp4"):
        assert np.array_equal(rendered[f"a/{name}"], rendered[f"b/{name}"]), name  # the render itself is exact
        first, second = decoded(tmp_path / "a" / name), decoded(tmp_path / "b" / name)
        assert first.shape == second.shape
        if name.endswith(".png"):
            assert np.array_equal(first, second)  # lossless
        else:  # x264 may pick other modes between identical calls: tiny differences only
            diff = np.abs(first.astype(int) - second)
            assert diff.max() <= 16 and diff.mean() < 1.0, name
    side = json.loads((tmp_path / "a" / "t2v.mp4.json").read_text())
    assert SIDECAR_KEYS <= set(side)
    assert side["seed"] == 42 and side["settings"]["seed"] == 42
    assert side["effective"] == {"task_type": "t2v", "guidance_mode": "t2v_apg", "width": 48, "height": 32, "frames": 5, "fps": 16.0, "steps": 2}
    assert set(side["guidance_per_expert"]) == {"high", "low"} and side["guidance_per_expert"]["low"]["txt"] == pytest.approx(4.0 * 0.8)
    assert {"text_encode", "vae_encode", "denoise_high", "denoise_low", "decode", "write", "total"} <= set(side["timings"])
    assert side["attention_backend"] == "sdpa" and side["runtime"]["dtype"] == "float32"
    assert {"bernini", "python", "torch", "diffusers", "transformers", "av"} <= set(side["versions"])
    assert side["checkpoint"]["base"] and side["checkpoint"]["files"]["files"]
    assert side["case"]["prompt"] and side["case"]["task_type"] == "t2v"


def test_all_invalid_exits_2_in_a_subprocess(tmp_path: Path) -> None:
    case = write_case(tmp_path, "bad", {"task_type": "t2v"})
    proc = subprocess.run([sys.executable, "infer_single_gpu.py", "--case", str(case), "--output_dir", str(tmp_path / "out"), *TINY],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{case}: key 'prompt': required" in proc.stderr
    summary = summary_of(tmp_path / "out")
    assert statuses(summary) == {str(case): "invalid"} and summary["exit_code"] == 2


def test_fail_fast_leaves_the_rest_not_run(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases"
    for name in ("a_first", "b_second", "c_third"):
        write_case(cases, name, {"task_type": "t2v", "prompt": name})
    poison(monkeypatch, "a_first")
    code, _out, _err = run(config, "--case", cases, "--output_dir", tmp_path / "out", "--fail-fast", capsys=capsys)
    assert code == 1
    assert statuses(summary_of(tmp_path / "out")) == {"a_first": "failed", "b_second": "not_run", "c_third": "not_run"}
    poison(monkeypatch, "a_first")
    code, _out, _err = run(config, "--case", cases, "--output_dir", tmp_path / "keep", capsys=capsys)
    assert code == 1 and statuses(summary_of(tmp_path / "keep")) == {"a_first": "failed", "b_second": "ok", "c_third": "ok"}


def test_crash_while_writing_leaves_nothing(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def crash(pixels: np.ndarray, file: Path, fps: float) -> None:
        file.write_bytes(b"\x00" * 1000)  # half a file, then the process "dies"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("bernini.media.write.encode_mp4", crash)  # looked up by write_media
    out = tmp_path / "out"
    code, _o, _e = run(config, "--case", ASSETS / "t2v", ASSETS / "t2i", "--output_dir", out, capsys=capsys)
    assert code == 1
    record = {c["name"]: c for c in summary_of(out)["cases"]}
    assert record["t2v"]["status"] == "failed" and "could not be written" in record["t2v"]["error"] and "disk full" in record["t2v"]["error"]
    assert record["t2i"]["status"] == "ok"
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "t2i.png", "t2i.png.json"]


def test_out_of_memory_case_fails_and_the_next_runs(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def oom(self: WanTransformer, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    poison(monkeypatch, "t2i", oom)
    code, _o, _e = run(config, "--case", ASSETS / "t2i", ASSETS / "t2v", "--output_dir", tmp_path, capsys=capsys)
    cases = {c["name"]: c for c in summary_of(tmp_path)["cases"]}
    assert code == 1 and cases["t2v"]["status"] == "ok"
    assert cases["t2i"]["status"] == "failed" and "out of GPU memory" in cases["t2i"]["error"] and "--offload" in cases["t2i"]["error"]


def test_model_load_failure_runs_nothing(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("no CUDA device is available (simulated)")

    monkeypatch.setattr(Renderer, "load", classmethod(broken))
    code, _o, _e = run(config, "--case", ASSETS / "t2v", "--output_dir", tmp_path, capsys=capsys)
    record = summary_of(tmp_path)["cases"][0]
    assert code == 2 and record["status"] == "not_run" and "no CUDA device" in record["error"]


def test_resume_skips_complete_and_redoes_truncated_or_changed(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached_load: list[int], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--case", ASSETS / "t2i", ASSETS / "t2v", ASSETS / "v2v" / "v2v_case1.json", "--output_dir", tmp_path, "--skip-existing"]
    assert run(config, *args, capsys=capsys)[0] == 0
    assert set(statuses(summary_of(tmp_path)).values()) == {"ok"}
    video = tmp_path / "t2v.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    image = tmp_path / "t2i.png"
    image.write_bytes(image.read_bytes()[:-200])
    assert run(config, *args, capsys=capsys)[0] == 0
    assert statuses(summary_of(tmp_path)) == {"t2i": "ok", "t2v": "ok", "v2v_case1": "skipped"}
    assert media.verify_media(video, 5, 48, 32)
    loads = len(cached_load)
    assert run(config, *args, capsys=capsys)[0] == 0
    assert set(statuses(summary_of(tmp_path)).values()) == {"skipped"} and len(cached_load) == loads, "all complete: nothing loads"
    assert run(config, *args, "--seed", "7", capsys=capsys)[0] == 0
    assert set(statuses(summary_of(tmp_path)).values()) == {"ok"}
    assert json.loads((tmp_path / "t2v.mp4.json").read_text())["seed"] == 7


def test_dry_run_loads_nothing(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    refuse_loading(monkeypatch)
    code, out, _err = run(config, "--case", ASSETS, "--output_dir", tmp_path, "--dry-run", capsys=capsys)
    assert code == 0
    assert "8 case(s) ready, 0 invalid" in out and "memory plan: none on the CPU" in out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_summary_path_option(config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "reports" / "run.json"
    code, out, _e = run(config, "--case", ASSETS / "t2i", "--output_dir", tmp_path / "out", "--summary", target, capsys=capsys)
    assert code == 0 and out.strip().splitlines()[-1] == str(target)
    assert json.loads(target.read_text())["counts"] == {"ok": 1}


def test_json_logs_in_a_subprocess(config: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bernini", "run", "--config", config, "--case", str(ASSETS / "t2v"), str(ASSETS / "t2i"),
         "--output_dir", str(tmp_path), "--log-format", "json", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is one JSON object
    steps = [e for e in events if e.get("event") == "step"]
    assert len(steps) == 4 and all({"case", "step", "steps", "expert", "eta_s"} <= set(e) for e in steps)
    assert {e["case"] for e in steps} == {"t2v", "t2i"} and {e["expert"] for e in steps} == {"high", "low"}
    assert any(e.get("event") == "load" for e in events) and any(e.get("event") == "case_end" for e in events)
    assert proc.stdout.strip() == str(tmp_path / "summary.json")


def test_pe_only_writes_enhanced_case_files(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    refuse_loading(monkeypatch)
    seen: list[str] = []

    def fake_enhancer(args: Any) -> Callable[[Any], tuple[str, dict[str, Any]]]:
        def enhance(case: Any) -> tuple[str, dict[str, Any]]:
            seen.append(case.name)
            return f"ENHANCED {case.prompt}", {"status": "enhanced"}

        return enhance

    monkeypatch.setattr(entry, "make_enhancer", fake_enhancer)
    code, out, _err = run(config, "--case", ASSETS, "--output_dir", tmp_path, "--pe_only", capsys=capsys)
    assert code == 0 and len(seen) == 8
    paths = [Path(line) for line in out.strip().splitlines()]
    assert sorted(p.name for p in paths) == sorted(f"{n}.json" for n in seen)
    assert all(p.parent == (tmp_path / "enhanced").resolve() for p in paths)
    for path in paths:
        original = load_case_file(next(ASSETS.rglob(path.name)))
        enhanced = load_case_file(path)  # a valid case file again
        assert enhanced.prompt == f"ENHANCED {original.prompt}" and enhanced.task_type == original.task_type
        assert enhanced.media() == original.media() and all(Path(v).is_absolute() for v in json.loads(path.read_text()).get("images", []))


def test_terminal_progress_bars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bernini.cases import BatchSpec, collect_cases
    from bernini.cli import TqdmProgress, wants_progress_bars
    from bernini.config import GenerationSettings
    from bernini.sampling import StepEvent

    assert not wants_progress_bars("text") and not wants_progress_bars("json")  # captured stderr is no terminal
    cases, errors = collect_cases(BatchSpec(case=[str(ASSETS / "t2v")], output_dir=str(tmp_path)))
    (case, plan), = runner.plan_all(cases, GenerationSettings(num_inference_steps=2), errors)
    bars = TqdmProgress()
    bars.case_started(1, 1, case, plan)
    for i, expert in enumerate(("high", "low")):
        bars.step(1, 1, case, StepEvent(i, 2, expert, 900.0 - 400 * i, 0.5))
    bars.case_finished(1, 1, runner.CaseRecord(case.name, case.source, "ok"))
    bars.close()
    err = capsys.readouterr().err
    assert "batch" in err and "1/1" in err and "low expert" in err and "step" in err
