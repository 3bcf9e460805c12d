"""The Python API on the tiny checkpoint: load once, render cases given as dicts, the same outputs as the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from bernini import main as entry
from bernini import media
from bernini.cases import CaseError
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.engine import Engine
from bernini.pipeline import Renderer

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "testcases"
TINY = ["--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]
RUNTIME = RuntimeConfig(device="cpu", dtype="float32")
SETTINGS = GenerationSettings(num_inference_steps=2, height=32, width=48, max_image_size=64, num_frames=5)  # the values of TINY
CASES = [ASSETS / "t2i" / "t2i.json", ASSETS / "v2v" / "v2v_case1.json", ASSETS / "rv2v" / "rv2v_case1.json"]  # three tasks
SAME_IN_SIDECAR = ("fingerprint", "prompt_used", "seed", "effective", "settings", "plan", "guidance_per_expert", "expert_steps", "runtime", "checkpoint", "case")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(config: str) -> Engine:
    return Engine.load(config, runtime=RUNTIME, settings=SETTINGS)


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_one_load_renders_three_tasks_exactly_as_the_cli(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    frames: dict[str, np.ndarray] = {}
    latents: dict[str, torch.Tensor] = {}
    write, render = media.write_media, Renderer.render

    def keep_frames(pixels: np.ndarray, path: Path, fps: float) -> Path:
        frames[Path(path).name] = np.array(pixels)
        return write(pixels, path, fps)

    def keep_latent(self: Renderer, case: Any, settings: Any, **kwargs: Any) -> Any:
        result = render(self, case, settings, **kwargs)
        latents[case.name] = result.latent
        return result

    with monkeypatch.context() as m:  # what the CLI renders and writes, recorded on the way
        m.setattr(media, "write_media", keep_frames)
        m.setattr(Renderer, "render", keep_latent)
        assert entry.main(["--config", config, "--case", *map(str, CASES), "--output_dir", str(out), *TINY]) == 0
    capsys.readouterr()
    cli = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".mp4")}
    cli_sidecars = {p.name: json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "summary.json"}
    assert sorted(cli) == ["rv2v_case1.mp4", "t2i.png", "v2v_case1.mp4"]

    loads: list[int] = []
    real_load = Renderer.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Renderer, "load", classmethod(lambda cls, *a, **k: (loads.append(1), real_load(cls, *a, **k))[1]))
    api = Engine.load(config, runtime=RUNTIME, settings=SETTINGS)
    for path in CASES:
        name = next(n for n in cli if n.startswith(path.stem + "."))
        # The case file's own dict, its media relative to its folder; written where the CLI wrote it.
        result = api.render(json.loads(path.read_text()), output=out / name, write=True, base=path.parent)
        assert result is not None and result.output == out / name and result.sidecar == out / f"{name}.json"
        assert np.array_equal(result.frames, frames[name]), name  # the same pixels went to the encoder
        assert torch.equal(result.latent, latents[path.stem]), name
        assert result.record.status == "ok" and result.record.output == str(out / name) and result.record.plan == result.plan.to_dict()
        sidecar = json.loads(result.sidecar.read_text())
        for key in SAME_IN_SIDECAR:
            want, got = cli_sidecars[f"{name}.json"][key], sidecar[key]
            if key == "case":  # how each names the case: the CLI by its file, the API by the dict
                want, got = ({k: v for k, v in d.items() if k not in ("name", "source")} for d in (want, got))
            assert got == want, f"{name}: {key}"
        if name.endswith(".png"):
            assert result.output.read_bytes() == cli[name]  # PNG is lossless and deterministic
        else:  # x264 may pick other modes between identical calls: tiny differences only
            mine = decoded(result.output)
            with open(tmp_path / "cli.mp4", "wb") as f:
                f.write(cli[name])
            theirs = decoded(tmp_path / "cli.mp4")
            assert mine.shape == theirs.shape and np.abs(mine.astype(int) - theirs).max() <= 16, name
    assert loads == [1], "the engine loads its models once for every render"


def test_settings_as_overrides_and_media_relative_to_base(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    t2i = {"task_type": "t2i", "prompt": "a red cat"}
    default = engine.render(t2i)
    seven = engine.render(t2i, {"seed": 7})
    whole = engine.render(t2i, GenerationSettings(**{**SETTINGS.to_dict(), "seed": 7}))
    assert default is not None and seven is not None and whole is not None
    assert torch.equal(seven.latent, whole.latent) and not torch.equal(seven.latent, default.latent)
    assert default.output is None and default.sidecar is None and not any(tmp_path.iterdir()), "write=False writes nothing"
    assert default.frames.shape == (1, 32, 48, 3) and default.frames.dtype == np.float32 and 0 <= default.frames.min() <= default.frames.max() <= 1
    with pytest.raises(ValueError, match="unknown generation setting 'steps'; GenerationSettings has: "):
        engine.render(t2i, {"steps": 3})
    v2v = {"task_type": "v2v", "prompt": "make it snow", "video": "source.mp4"}
    assert engine.render(v2v, base=ASSETS / "media").plan.frames == 5  # type: ignore[union-attr]
    with pytest.raises(CaseError, match=r"^case: key 'video': file 'source.mp4' not found"):
        engine.render(v2v)  # relative to the working directory by default
    with pytest.raises(CaseError, match=r"^case: key 'output': .*must end in .mp4"):
        engine.render(v2v, base=ASSETS / "media", output=tmp_path / "x.png", write=True)


def test_a_step_callback_may_stop_the_render_and_nothing_is_written(engine: Engine, tmp_path: Path) -> None:
    seen: list[int] = []

    def stop(event: Any) -> None:
        seen.append(event.index)
        raise RuntimeError("stopped by the caller")

    with pytest.raises(RuntimeError, match="stopped by the caller"):
        engine.render({"task_type": "t2v", "prompt": "a boat"}, output=tmp_path / "boat.mp4", write=True, on_step=stop)
    assert seen == [0] and not any(tmp_path.iterdir())


def test_render_from_a_worker_thread_as_a_server_does(engine: Engine, tmp_path: Path) -> None:
    results: list[Any] = []
    steps: list[str] = []
    worker = threading.Thread(target=lambda: results.append(
        engine.render({"task_type": "t2i", "prompt": "a lamp"}, None, output=tmp_path / "lamp.png", write=True, on_step=lambda e: steps.append(e.expert))))
    worker.start()
    worker.join(120)
    (result,) = results
    assert steps == ["high", "low"] and result.output.is_file() and media.verify_media(result.output, 1, 48, 32)
    assert json.loads(result.sidecar.read_text())["fingerprint"]


def test_import_bernini_stays_light_and_exports_the_engine() -> None:
    code = "import sys, bernini; assert 'torch' not in sys.modules, 'import bernini pulled in torch'; from bernini.engine import Engine; assert bernini.Engine is Engine"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
