"""Case validation before any model loads: keys, types, media, paths, output names, --inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from media_files import encode_audio_only, small_clip

from bernini import main as entry
from bernini.cases import BatchSpec, CaseError, collect_cases
from bernini.config import GenerationSettings
from bernini.pipeline import Renderer
from bernini.runner import plan_all

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "testcases"
TINY = ["--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must finish before anything loads: loading is an error in this module."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(Renderer, "load", classmethod(refuse))


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A copy of the bundled media plus broken files, in <tmp>/media."""
    folder = tmp_path / "media"
    shutil.copytree(ASSETS / "media", folder)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    encode_audio_only(folder / "voice.mp4")
    small_clip(folder / "portrait.mp4", rotation=-90)
    return folder


def write_case(folder: Path, name: str, data: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = entry.main([*args, *TINY])
    out, err = capsys.readouterr()
    return code, out, err


V = "../media/source.mp4"
BAD_CASES = [
    ("unknown_key", {"task_type": "t2v", "prompt": "p", "seed": 3}, "seed", "unknown key"),
    ("no_prompt", {"task_type": "t2v"}, "prompt", "required"),
    ("empty_prompt", {"task_type": "t2v", "prompt": "   "}, "prompt", "non-empty string"),
    ("prompt_type", {"task_type": "t2v", "prompt": 5}, "prompt", "non-empty string"),
    ("task_type_type", {"task_type": 3, "prompt": "p"}, "task_type", "must be a string"),
    ("mode_type", {"task_type": "t2v", "prompt": "p", "guidance_mode": 7}, "guidance_mode", "must be a string"),
    ("video_type", {"task_type": "v2v", "prompt": "p", "video": 5}, "video", "must be a path or a list of paths"),
    ("image_type", {"task_type": "i2i", "prompt": "p", "image": ["../media/image.png"]}, "image", "must be one path string"),
    ("images_type", {"task_type": "r2v", "prompt": "p", "images": "../media/ref1.jpg"}, "images", "must be a list of paths"),
    ("output_type", {"task_type": "t2v", "prompt": "p", "output": 9}, "output", "non-empty path string"),
    ("missing_video", {"task_type": "v2v", "prompt": "p", "video": "../media/nope.mp4"}, "video", "not found"),
    ("missing_image", {"task_type": "r2v", "prompt": "p", "images": ["../media/nope.jpg"]}, "images", "not found"),
    ("unknown_task", {"task_type": "x2v", "prompt": "p"}, "task_type", "unknown task_type 'x2v'"),
    ("unknown_mode", {"task_type": "t2v", "prompt": "p", "guidance_mode": "best"}, "guidance_mode", "unknown guidance mode 'best'"),
    ("planner_mode", {"task_type": "rv2v", "prompt": "p", "video": V, "images": ["../media/ref1.jpg"], "guidance_mode": "rv2v_wapg"}, "guidance_mode", "planner"),
    # Media the task does not expect (or lacks) render as upstream, with warnings: tests/test_source_combinations.py.
    ("url", {"task_type": "v2v", "prompt": "p", "video": "https://example.com/a.mp4"}, "video", "URLs are not accepted"),
    ("video_suffix", {"task_type": "t2v", "prompt": "p", "output": "out.avi"}, "output", "must end in .mp4"),
    ("corrupt_video", {"task_type": "v2v", "prompt": "p", "video": "../media/corrupt.mp4"}, "video", "could not be decoded"),
    ("empty_video", {"task_type": "v2v", "prompt": "p", "video": "../media/empty.mp4"}, "video", "is empty (0 bytes)"),
    ("audio_only", {"task_type": "v2v", "prompt": "p", "video": "../media/voice.mp4"}, "video", "has no video stream"),
    ("corrupt_image", {"task_type": "i2i", "prompt": "p", "image": "../media/corrupt.mp4"}, "image", "could not be decoded"),
    ("not_object", [{"prompt": "p"}], None, "must be a JSON object"),
    ("syntax", '{"prompt": "p",, }', None, "not valid JSON"),
]


@pytest.mark.parametrize(("name", "data", "key", "rule"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_case_names_file_key_and_rule(name: str, data: Any, key: str | None, rule: str, media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = write_case(tmp_path / "cases", name, data)
    code, _out, err = run_main(["--config", str(tmp_path / "no-model"), "--case", str(case), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    line = next(line for line in err.splitlines() if str(case) in line)
    assert rule in line
    if key is not None:
        assert f"key {key!r}" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.mp4"))


def test_case_with_inputs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text("[]")
    code, _out, err = run_main(["--case", str(ASSETS / "t2v"), "--inputs", str(inputs)], capsys)
    assert code == 2 and "--case and --inputs cannot be combined" in err


def test_output_with_many_cases_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main(["--case", str(ASSETS), "--output", str(tmp_path / "one.mp4"), "--dry-run"], capsys)
    assert code == 2 and "--output names one file" in err


def test_missing_case_path_is_one_invalid_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(["--case", str(ASSETS / "t2v"), str(tmp_path / "nope.json"), "--output_dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 1
    assert "1 case(s) ready, 1 invalid" in out and "no such case file or folder" in out


def collect(tmp_path: Path, *case_args: Path, **spec: Any) -> tuple[list, list[tuple[str, str]]]:
    cases, errors = collect_cases(BatchSpec(case=[str(c) for c in case_args], output_dir=str(tmp_path / "out"), **spec))
    return cases, errors


def test_media_resolve_against_case_folder_then_cwd(media: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "clips").mkdir(parents=True)
    shutil.copy(media / "source_b.mp4", work / "clips" / "clip.mp4")
    cases = tmp_path / "cases"
    (cases / "clips").mkdir(parents=True)
    shutil.copy(media / "source.mp4", cases / "clips" / "clip.mp4")
    both = write_case(cases, "both", {"task_type": "v2v", "prompt": "p", "video": "clips/clip.mp4"})
    only_cwd = write_case(cases, "cwd", {"task_type": "r2v", "prompt": "p", "images": ["only_here.jpg"]})
    shutil.copy(media / "ref1.jpg", work / "only_here.jpg")
    monkeypatch.chdir(work)
    found, errors = collect(tmp_path, both, only_cwd)
    assert errors == []
    by_name = {c.name: c for c in found}
    assert by_name["both"].videos == ((cases / "clips" / "clip.mp4").resolve(),)  # the case folder wins
    assert by_name["cwd"].images == ((work / "only_here.jpg").resolve(),)


def test_symlinked_media_resolve_to_their_target(media: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.mp4"
    link.symlink_to(media / "source.mp4")
    case = write_case(tmp_path / "cases", "linked", {"task_type": "v2v", "prompt": "p", "video": str(link)})
    found, errors = collect(tmp_path, case)
    assert errors == [] and found[0].videos == ((media / "source.mp4").resolve(),)


def test_rotated_video_is_planned_upright(media: Path, tmp_path: Path) -> None:
    case = write_case(tmp_path / "cases", "portrait", {"task_type": "v2v", "prompt": "p", "video": "../media/portrait.mp4"})
    found, errors = collect(tmp_path, case)
    planned = plan_all(found, GenerationSettings(max_image_size=64), errors)
    assert errors == []
    plan = planned[0][1]
    assert (plan.width, plan.height) == (32, 64)  # stored 64x32, displayed turned a quarter


def test_output_names_from_case_names_and_distinct_across_folders(media: Path, tmp_path: Path) -> None:
    a = write_case(tmp_path / "cases" / "a", "shot", {"task_type": "t2v", "prompt": "p"})
    b = write_case(tmp_path / "cases" / "b", "shot", {"task_type": "t2v", "prompt": "q"})
    c = write_case(tmp_path / "cases", "still", {"task_type": "t2i", "prompt": "p"})
    found, errors = collect(tmp_path, tmp_path / "cases")
    assert errors == []
    outputs = {c.name: c.output for c in found}
    out = (tmp_path / "out").resolve()
    assert outputs == {"a/shot": out / "a" / "shot.mp4", "b/shot": out / "b" / "shot.mp4", "still": out / "still.png"}
    assert {a.stem, b.stem, c.stem} == {"shot", "still"}


def test_explicit_duplicate_outputs_name_both_cases(tmp_path: Path) -> None:
    same = str(tmp_path / "same.mp4")
    one = write_case(tmp_path / "cases", "one", {"task_type": "t2v", "prompt": "p", "output": same})
    two = write_case(tmp_path / "cases", "two", {"task_type": "t2v", "prompt": "q", "output": same})
    found, errors = collect(tmp_path, one, two)
    assert found == [] and len(errors) == 2
    for source, message in errors:
        other = str(two) if source == str(one) else str(one)
        assert "key 'output'" in message and str(source) in message and other in message


def test_derived_output_steps_aside_for_an_explicit_one(tmp_path: Path) -> None:
    auto = write_case(tmp_path / "cases", "clip", {"task_type": "t2v", "prompt": "p"})
    explicit = write_case(tmp_path / "cases", "other", {"task_type": "t2v", "prompt": "q", "output": str(tmp_path / "out" / "clip.mp4")})
    found, errors = collect(tmp_path, auto, explicit)
    assert errors == []
    assert {c.name: c.output.name for c in found} == {"clip": "clip_2.mp4", "other": "clip.mp4"}


def test_single_frame_tasks_write_png(tmp_path: Path) -> None:
    case = write_case(tmp_path / "cases", "pic", {"task_type": "t2i", "prompt": "p", "output": str(tmp_path / "pic.mp4")})
    found, errors = collect(tmp_path, case)
    assert errors == [] and found[0].output == (tmp_path / "pic.png").resolve()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_inputs_list_and_jsonl_honour_per_case_mode(suffix: str, media: Path, tmp_path: Path) -> None:
    items = [
        {"task_type": "v2v", "prompt": "a", "video": "media/source.mp4", "guidance_mode": "v2v"},
        {"task_type": "v2v", "prompt": "b", "video": "media/source.mp4"},
        {"task_type": "t2v", "prompt": "c", "guidance_mode": "t2v"},
    ]
    inputs = tmp_path / f"batch{suffix}"
    inputs.write_text(json.dumps(items) if suffix == ".json" else "\n".join(json.dumps(i) for i in items) + "\n")
    found, errors = collect_cases(BatchSpec(inputs=str(inputs), output_dir=str(tmp_path / "out")))
    planned = plan_all(found, GenerationSettings(max_image_size=64), errors)
    assert errors == []
    assert [p.guidance_mode for _, p in planned] == ["v2v", "v2v_apg", "t2v"]
    assert [c.name for c, _ in planned] == ["batch_0", "batch_1", "batch_2"]


def test_inputs_errors_name_the_line(tmp_path: Path) -> None:
    inputs = tmp_path / "batch.jsonl"
    inputs.write_text('{"task_type": "t2v", "prompt": "ok"}\n{"task_type": "t2v", "promt": "typo"}\n')
    found, errors = collect_cases(BatchSpec(inputs=str(inputs), output_dir=str(tmp_path)))
    assert len(found) == 1
    assert errors[0][0] == f"{inputs}:2" and "key 'promt': unknown key" in errors[0][1]


def test_inputs_not_a_list_is_fatal(tmp_path: Path) -> None:
    inputs = tmp_path / "batch.json"
    inputs.write_text('{"prompt": "p"}')
    with pytest.raises(CaseError, match="JSON list"):
        collect_cases(BatchSpec(inputs=str(inputs)))


def test_dry_run_table_shows_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main(["--case", str(ASSETS), "--output_dir", str(tmp_path), "--dry-run", "--config", str(tmp_path / "absent")], capsys)
    assert code == 0
    header, *rows = out.splitlines()
    for column in ("task", "mode", "size", "frames", "fps", "fwd/step", "output"):
        assert column in header
    assert any(r.startswith("rv2v_case1") and "rv2v" in r and "64x32" in r and str(tmp_path / "rv2v_case1.mp4") in r for r in rows)
    assert "8 case(s) ready, 0 invalid" in out
    assert "memory plan skipped" in out
