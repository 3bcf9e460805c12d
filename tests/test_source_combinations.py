"""Any media with any task, as the official renderer allows: rendered like the independent reference, with warnings.

The official CLI reads `video`, `image` and `images` whatever the task (the task only picks the system
prompt) and joins every source in the order videos, image, images. Each combination below renders on the
tiny checkpoint and is compared with tests/official_reference.py, as test_fidelity.py does; the plan says
(log, dry run, sidecar) when a task's expected input is absent or the mode's passes ignore some media.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import official_reference as ref
import pytest
from test_fidelity import errors, reference_inputs, render_ours, run_reference, target_latent_shape

from bernini import main as entry
from bernini.cases import BatchSpec, Case, collect_cases, load_case_file
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.pipeline import Renderer
from bernini.plan import plan_all
from bernini.testing import tiny_checkpoints

MEDIA = Path(__file__).resolve().parent.parent / "assets" / "testcases" / "media"
VIDEO, IMAGE = str(MEDIA / "source.mp4"), str(MEDIA / "image.png")
REFS = [str(MEDIA / "ref1.jpg"), str(MEDIA / "ref2.jpg")]
# Relative L2 and max-abs (relative to max |reference|). Observed ~5e-7 (float32 RoPE against float64);
# a swapped source order (the image after the first reference) gives 1.6e-4, so 1e-5 tells them apart.
TOLERANCE = 1e-5
# Three steps at shift 5 run the high expert twice and the low one once (switch and omega scaling included).
SMALL = {"num_inference_steps": 3, "max_image_size": 64, "num_frames": 5, "height": 32, "width": 48}

# (name, case keys, guidance mode or None for the task's default)
COMBINATIONS = [
    ("i2i_refs", {"task_type": "i2i", "image": IMAGE, "images": REFS}, None),  # reference-guided image editing (v2v)
    ("i2i_refs_r2v_apg", {"task_type": "i2i", "image": IMAGE, "images": REFS}, "r2v_apg"),
    ("t2v_refs", {"task_type": "t2v", "images": REFS}, None),  # t2v_apg: the references are unseen (warned)
    ("t2v_refs_r2v_apg", {"task_type": "t2v", "images": REFS}, "r2v_apg"),
    ("t2i_refs", {"task_type": "t2i", "images": REFS}, None),
    ("t2i_refs_rv2v", {"task_type": "t2i", "images": REFS}, "rv2v"),
    ("v2v_image_refs", {"task_type": "v2v", "video": VIDEO, "image": IMAGE, "images": REFS}, None),  # v2v_apg: all five sources
    ("v2v_image_refs_rv2v", {"task_type": "v2v", "video": VIDEO, "image": IMAGE, "images": REFS}, "rv2v"),
    ("v2v_image_refs_v2v_chain", {"task_type": "v2v", "video": VIDEO, "image": IMAGE, "images": REFS}, "v2v_chain"),
    ("r2v_with_image", {"task_type": "r2v", "image": IMAGE, "images": REFS}, None),  # the image sets the size, as upstream
    ("i2v_no_image", {"task_type": "i2v"}, None),  # renders from text, like t2v
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer.from_pretrained(str(tiny_checkpoints().diffusers), runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa"))


@pytest.fixture(scope="module")
def official() -> ref.OfficialExperts:
    return ref.load_official(tiny_checkpoints().diffusers)


def case_file(folder: Path, name: str, keys: dict, mode: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"prompt": f"{name}: a paper boat on a stream, image0 and image1 on the bank", **keys}
    if mode:
        data["guidance_mode"] = mode
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def assert_matches_reference(renderer: Renderer, official: ref.OfficialExperts, case: Case, settings: GenerationSettings,
                             monkeypatch: pytest.MonkeyPatch, reference_settings: GenerationSettings | None = None) -> None:
    ours, out, _steps = render_ours(renderer, case, settings, monkeypatch)
    ref_settings = reference_settings or settings
    inputs = reference_inputs(renderer, case, ref_settings, {})
    shape = target_latent_shape(case, ref_settings, inputs)
    assert tuple(ours.shape) == (1, *shape)
    result = run_reference(official, out.plan.guidance_mode, inputs, shape, ref_settings)
    rel_l2, max_rel = errors(ours, result.latent)
    assert rel_l2 <= TOLERANCE and max_rel <= TOLERANCE, f"{case.name}: rel L2 {rel_l2:.3g}, max rel {max_rel:.3g}"


@pytest.mark.parametrize(("name", "keys", "mode"), COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_combination_renders_like_the_official_reference(name: str, keys: dict, mode: str | None, renderer: Renderer, official: ref.OfficialExperts,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = load_case_file(case_file(tmp_path, name, keys, mode))
    assert_matches_reference(renderer, official, case, GenerationSettings(**SMALL, seed=len(name)), monkeypatch)


def test_image_task_with_a_video_renders_like_upstream_with_one_frame(renderer: Renderer, official: ref.OfficialExperts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """i2i with a video (and refs): one frame, its video read as one frame, as upstream with --num_frames 1."""
    case = load_case_file(case_file(tmp_path, "i2i_video", {"task_type": "i2i", "video": VIDEO, "images": REFS[:1]}, None))
    settings = GenerationSettings(**SMALL, seed=5)  # num_frames 9: an image task renders 1 anyway
    assert_matches_reference(renderer, official, case, settings, monkeypatch, reference_settings=replace(settings, num_frames=1))


def planned(tmp_path: Path, name: str, keys: dict, mode: str | None = None) -> tuple[tuple[str, ...], dict]:
    path = case_file(tmp_path / "cases", name, keys, mode)
    cases, errs = collect_cases(BatchSpec(case=[str(path)], output_dir=str(tmp_path / "out")))
    plans = plan_all(cases, GenerationSettings(**SMALL), errs)
    assert errs == [], errs
    return plans[0][1].warnings, plans[0][1].to_dict()


def test_warnings_say_what_renders(tmp_path: Path) -> None:
    warnings, _ = planned(tmp_path, "i2v", {"task_type": "i2v"})
    assert len(warnings) == 1 and "task 'i2v' expects a source image under 'image'" in warnings[0] and "text alone like t2v" in warnings[0]
    warnings, _ = planned(tmp_path, "rv2v", {"task_type": "rv2v", "video": VIDEO})
    assert len(warnings) == 1 and "at least 1 reference image(s) under 'images' (the case has 0)" in warnings[0] and "1 video(s)" in warnings[0]
    warnings, _ = planned(tmp_path, "ads2v", {"task_type": "ads2v", "video": VIDEO})
    assert len(warnings) == 1 and "2 source video(s) under 'video' (the case has 1)" in warnings[0]
    warnings, _ = planned(tmp_path, "t2v_refs", {"task_type": "t2v", "images": REFS})
    assert len(warnings) == 1 and "'t2v_apg' (none·u, none·c) never shows the model the case's images #1, images #2" in warnings[0]
    assert "r2v_apg" in warnings[0].split("modes that use all of its media:")[1]
    warnings, _ = planned(tmp_path, "r2v_video", {"task_type": "r2v", "video": VIDEO, "images": REFS}, "r2v_apg")
    assert len(warnings) == 1 and "the case's video (it still sets the output's size and frame count)" in warnings[0]
    warnings, _ = planned(tmp_path, "t2v_image", {"task_type": "t2v", "image": IMAGE})
    assert len(warnings) == 1 and "the case's image (it still sets the output's size)" in warnings[0]
    warnings, plan = planned(tmp_path, "v2v_all", {"task_type": "v2v", "video": VIDEO, "image": IMAGE, "images": REFS})
    assert warnings == () and [s["kind"] for s in plan["sources"]] == ["video", "image", "image", "image"]  # videos, image, images


def test_bundled_cases_have_no_warnings(tmp_path: Path) -> None:
    cases, errs = collect_cases(BatchSpec(case=[str(MEDIA.parent)], output_dir=str(tmp_path)))
    plans = plan_all(cases, GenerationSettings(**SMALL), errs)
    assert errs == [] and len(plans) == 8 and all(p.warnings == () for _, p in plans)


def test_dry_run_prints_and_sidecar_records_the_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = case_file(tmp_path / "cases", "t2v_refs", {"task_type": "t2v", "images": REFS}, None)
    args = ["--config", str(tiny_checkpoints().diffusers), "--case", str(case), "--output_dir", str(tmp_path / "out"),
            "--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]
    assert entry.main([*args, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING t2v_refs: guidance mode 't2v_apg'" in out and "never shows the model the case's images #1, images #2" in err
    assert entry.main(args) == 0
    sidecar = json.loads((tmp_path / "out" / "t2v_refs.mp4.json").read_text())
    assert len(sidecar["plan"]["warnings"]) == 1 and "never shows the model" in sidecar["plan"]["warnings"][0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"][0]["plan"]["warnings"] == sidecar["plan"]["warnings"]
