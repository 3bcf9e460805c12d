"""Issue 14 on the tiny checkpoint: inputs that used to destroy data, run too long or end in a traceback.

Each test drives the real entry point (bernini.main.main) and asserts the exit code, the message's key
words, the summary, which files exist afterwards and that inputs and foreign files keep their bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from openai_stub import StubServer, answer, http_error

from bernini import main as entry
from bernini import media
from bernini.cases import BatchSpec, collect_cases
from bernini.pipeline import Renderer

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "testcases"
TINY = ["--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]


pytestmark = pytest.mark.usefixtures("one_thread", "cached_load")


@pytest.fixture(autouse=True)
def clean_pe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("BERNINI_PE_API_KEY", "OPENAI_API_KEY", "BERNINI_PE_BASE_URL", "OPENAI_BASE_URL", "BERNINI_PE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BERNINI_PE_CACHE", str(tmp_path / "pe-cache"))


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every model load; the list stays empty when validation stops the run first."""
    loads: list[str] = []

    def refuse(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            loads.append(name)
            raise AssertionError(f"{name} was loaded")

        return fail

    monkeypatch.setattr(Renderer, "load", classmethod(refuse("Renderer.load")))
    for target in ("bernini.models.text_encoder.TextEncoder.load", "bernini.models.vae.VAE.load", "bernini.pipeline.load_expert"):
        monkeypatch.setattr(target, refuse(target))
    return loads


def run(config: str, capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = entry.main(["--config", config, *map(str, args), *TINY])
    out, err = capsys.readouterr()
    return code, out, err


def write_case(folder: Path, name: str, data: dict[str, Any] | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def summary_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def cases_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(c["source"]).stem if c["status"] == "invalid" else c["name"]: c for c in summary["cases"]}


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "media"
    shutil.copytree(ASSETS / "media", folder)
    return folder


# ------------------------------------------------------------------ outputs that would destroy data


def test_output_that_is_an_input_is_refused_before_loading(config: str, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loads = count_loads(monkeypatch)
    os.link(media_dir / "source_b.mp4", media_dir / "hardlink.mp4")
    cases = tmp_path / "cases"
    write_case(cases, "own_video", {"task_type": "v2v", "prompt": "p", "video": "../media/source.mp4", "output": str(media_dir / "source.mp4")})
    write_case(cases, "own_image", {"task_type": "i2i", "prompt": "p", "image": "../media/image.png", "output": str(media_dir / "image.png")})
    write_case(cases, "other_case_input", {"task_type": "t2v", "prompt": "p", "output": str(media_dir / "source_b.mp4")})
    write_case(cases, "uses_b", {"task_type": "v2v", "prompt": "p", "video": "../media/source_b.mp4", "output": str(tmp_path / "fine.mp4")})
    write_case(cases, "hard_link", {"task_type": "t2v", "prompt": "p", "output": str(media_dir / "hardlink.mp4")})
    sidecar_case = write_case(cases, "clip.mp4", {"task_type": "t2v", "prompt": "p", "output": str(cases / "clip.mp4")})  # its sidecar = itself
    before_media, before_cases = snapshot(media_dir), snapshot(cases)
    out = tmp_path / "out"
    code, _out, err = run(config, capsys, "--case", cases, "--output_dir", out, "--dry-run")
    assert code == 1, err  # uses_b is fine; the five others are refused
    invalid = cases_of_err(err)
    assert "would overwrite the input" in invalid["own_video"] and "'video' of" in invalid["own_video"] and "name another output" in invalid["own_video"]
    assert "would overwrite the input" in invalid["own_image"] and "'image' of" in invalid["own_image"]
    assert "source_b.mp4" in invalid["other_case_input"] and "uses_b.json" in invalid["other_case_input"]
    assert "hardlink.mp4" in invalid["hard_link"] and "would overwrite the input" in invalid["hard_link"]
    assert "its sidecar clip.mp4.json" in invalid["clip.mp4"] and f"the case file {sidecar_case}" in invalid["clip.mp4"]
    code, _out, err = run(config, capsys, "--case", cases / "own_video.json", cases / "own_image.json", "--output_dir", out)
    assert code == 2 and loads == []
    summary = summary_of(out / "summary.json")
    assert summary["counts"] == {"invalid": 2} and all("would overwrite the input" in c["error"] for c in summary["cases"])
    assert snapshot(media_dir) == before_media and snapshot(cases) == before_cases
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def cases_of_err(err: str) -> dict[str, str]:
    """'invalid case <file>: message' log lines by case file stem."""
    found = {}
    for line in err.splitlines():
        if "invalid case " in line:
            message = line.split("invalid case ", 1)[1]
            found[Path(message.split(": ", 1)[0]).name.removesuffix(".json")] = message
    return found


def test_foreign_files_at_outputs_are_refused_and_overwrite_replaces_them(config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "t2v.mp4").write_bytes(b"my holiday video, not rendered by bernini")
    (out / "t2i.png.json").write_text('{"my": "notes"}')
    before = snapshot(out)
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", ASSETS / "t2i", "--output_dir", out)
    assert code == 2, err
    invalid = cases_of_err(err)
    assert f"{out / 't2v.mp4'} exists and bernini did not write it" in invalid["t2v"] and "--overwrite" in invalid["t2v"] and "another output" in invalid["t2v"]
    assert f"{out / 't2i.png.json'} exists and is not a bernini sidecar" in invalid["t2i"] and "--overwrite" in invalid["t2i"]
    after = snapshot(out)
    assert {k: after[k] for k in before} == before and set(after) == {*before, "summary.json"}
    assert cases_of(summary_of(out / "summary.json"))["t2v"]["status"] == "invalid"

    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", ASSETS / "t2i", "--output_dir", out, "--overwrite")
    assert code == 0, err
    assert media.verify_media(out / "t2v.mp4", 5, 48, 32) and media.verify_media(out / "t2i.png", 1, 48, 32)
    assert json.loads((out / "t2i.png.json").read_text())["sidecar_version"] >= 1
    # Our own outputs are redone (no --overwrite needed) or resumed, as before.
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", ASSETS / "t2i", "--output_dir", out)
    assert code == 0 and {c["status"] for c in summary_of(out / "summary.json")["cases"]} == {"ok"}, err
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", ASSETS / "t2i", "--output_dir", out, "--skip-existing")
    assert code == 0 and {c["status"] for c in summary_of(out / "summary.json")["cases"]} == {"skipped"}


def test_confine_outputs_and_relative_outputs(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / "outs").mkdir()
    (work / "outs" / "link").symlink_to(elsewhere, target_is_directory=True)
    cases = tmp_path / "cases"
    write_case(cases, "escape", {"task_type": "t2v", "prompt": "p", "output": "../../escaped.mp4"})
    write_case(cases, "via_link", {"task_type": "t2v", "prompt": "p", "output": "outs/link/x.mp4"})
    write_case(cases, "inside", {"task_type": "t2v", "prompt": "p", "output": "outs/inside.mp4"})
    code, out, err = run(config, capsys, "--case", cases, "--output_dir", "outs", "--confine_outputs")
    assert code == 1, err
    invalid = cases_of_err(err)
    for name in ("escape", "via_link"):
        assert "is outside --output_dir" in invalid[name] and "--confine_outputs is on" in invalid[name] and str(work) in invalid[name]
    assert str(tmp_path / "escaped.mp4") in invalid["escape"]
    assert media.verify_media(work / "outs" / "inside.mp4", 5, 48, 32)
    assert not (tmp_path / "escaped.mp4").exists() and list(elsewhere.iterdir()) == []
    # Without confinement: explicit relative outputs resolve against the working directory, as upstream,
    # and the dry run shows every absolute output path.
    code, out, err = run(config, capsys, "--case", cases, "--output_dir", "outs", "--dry-run")
    assert code == 0, err
    rows = {line.split()[0]: line for line in [row for row in out.splitlines()[1:] if not row.startswith(" ")][:3]}  # not 'passes:' lines
    assert rows["escape"].endswith(str(tmp_path / "escaped.mp4")) and rows["inside"].endswith(str(work / "outs" / "inside.mp4"))
    assert rows["via_link"].endswith(str(elsewhere / "x.mp4"))
    assert f"escape: output {tmp_path / 'escaped.mp4'}" in err


def test_rerun_of_a_folder_with_its_outputs_inside_skips_them(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases"
    shutil.copytree(ASSETS / "t2v", cases / "t2v")
    shutil.copytree(ASSETS / "t2i", cases / "t2i")
    write_case(cases, "beside", {"task_type": "t2v", "prompt": "its output and sidecar lie in the case folder", "output": str(cases / "beside.mp4")})
    monkeypatch.chdir(cases)  # the default --output_dir, outputs/, is inside the case folder
    code = entry.main(["--config", config, "--case", ".", *TINY])
    assert code == 0, capsys.readouterr().err
    assert (cases / "outputs" / "t2v.mp4.json").is_file() and (cases / "beside.mp4.json").is_file()
    capsys.readouterr()
    code = entry.main(["--config", config, "--case", ".", "--skip-existing", *TINY])
    _out, err = capsys.readouterr()
    assert code == 0, err
    summary = summary_of(tmp_path / "cases" / "summary.json")  # the common folder of beside.mp4 and outputs/
    assert {c["name"]: c["status"] for c in summary["cases"]} == {"t2v": "skipped", "t2i": "skipped", "beside": "skipped"}
    assert "skipped 4 of bernini's own files" in err  # 3 sidecars and summary.json (outputs/ holds two of them)


# ------------------------------------------------------------------ checked at preparation


def test_summary_and_output_dir_destinations_are_checked_first(config: str, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loads = count_loads(monkeypatch)
    (tmp_path / "a_folder").mkdir()
    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    foreign = tmp_path / "report.json"
    foreign.write_text('{"quarter": 3}')
    before = snapshot(media_dir)
    case = write_case(tmp_path / "cases", "v", {"task_type": "v2v", "prompt": "p", "video": str(media_dir / "source.mp4")})
    out = tmp_path / "out"
    attempts = [
        (["--summary", tmp_path / "a_folder"], "is a folder; pass --summary with a file name"),
        (["--summary", regular / "summary.json"], f"{regular} is a file, so the folder"),
        (["--output_dir", regular], f"--output_dir {regular} is a file, not a folder"),
        (["--summary", media_dir / "source.mp4"], "would overwrite"),
        (["--summary", foreign], "exists and is not a bernini summary; pass --overwrite"),
    ]
    for extra, message in attempts:
        code, _o, err = run(config, capsys, "--case", case, "--output_dir", out, *extra)
        assert code == 2 and message in err, (extra, err[-2000:])
        assert "Traceback" not in err
    assert loads == [] and not out.exists()
    assert snapshot(media_dir) == before and regular.read_text() == "mine" and foreign.read_text() == '{"quarter": 3}'
    code, _o, err = run(config, capsys, "--case", case, "--output_dir", out, "--summary", foreign, "--overwrite", "--dry-run")
    assert code == 0, err


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_video_frame_counts_that_give_one_frame_are_refused(frames: int, config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loads = count_loads(monkeypatch)
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), str(ASSETS / "v2v" / "v2v_case1.json"), "--output_dir", str(tmp_path), *TINY, "--num_frames", str(frames)])
    err = capsys.readouterr().err
    assert code == 2 and loads == []
    invalid = cases_of(summary_of(tmp_path / "summary.json"))
    for name in ("t2v", "v2v_case1"):
        message = invalid[name]["error"]
        assert f"--num_frames {frames} gives 1 frame" in message and "renders a video" in message and "nearest valid value: 5" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert "Traceback" not in err


def test_frame_rules(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loads = count_loads(monkeypatch)
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), "--output_dir", str(tmp_path), *TINY, "--num_frames", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "num_frames must be >= 1 and at most 1001" in err and "got --num_frames 100000; nearest valid value: 1001" in err
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), str(ASSETS / "t2i"), "--output_dir", str(tmp_path), "--dry-run", *TINY, "--num_frames", "80"])
    out, err = capsys.readouterr()
    assert code == 0 and "num_frames 80 coerced to 4k+1: 81" in err
    rows = [line for line in out.splitlines()[1:] if not line.startswith(" ")][:2]  # the table's rows, not their 'passes:' lines
    frames = {line.split()[0]: int(line.split()[4]) for line in rows}
    assert frames == {"t2v": 81, "t2i": 1}
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), "--output_dir", str(tmp_path), "--dry-run", *TINY, "--num_frames", "4"])
    assert code == 0 and int(capsys.readouterr().out.splitlines()[1].split()[4]) == 5
    assert loads == [] and not any(tmp_path.iterdir())


def test_image_tasks_render_one_frame_whatever_num_frames(config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2i", "--output_dir", tmp_path, "--num_frames", "2")
    assert code == 0, err
    assert media.verify_media(tmp_path / "t2i.png", 1, 48, 32)


BAD_NUMBERS = [
    (["--omega_txt", "nan"], "omega_txt must be a finite number, got --omega_txt nan", "--omega_txt 4.0"),
    (["--omega_vid", "inf"], "omega_vid must be a finite number, got --omega_vid inf", "--omega_vid 1.25"),
    (["--omega_img=-inf"], "omega_img must be a finite number, got --omega_img -inf", "--omega_img 4.5"),
    (["--omega_scale", "nan"], "omega_scale must be a finite number, got --omega_scale nan", "--omega_scale 0.8"),
    (["--fps", "inf"], "fps must be a finite number, got --fps inf", "--fps 16.0"),
    (["--fps", "0"], "fps must be > 0 (it resamples the source videos and times the output), got --fps 0.0", "--fps 16.0"),
    (["--eta", "nan"], "eta must be a finite number, got --eta nan", "--eta 0.5"),
    (["--momentum", "inf"], "momentum must be a finite number, got --momentum inf", "--momentum 0.0"),
    (["--flow_shift", "0"], "flow_shift must be > 0, got --flow_shift 0.0", "--flow_shift 5.0"),
    (["--seed", str(2**70)], f"seed must be an integer from {-(2**63)} to {2**64 - 1} (torch's seed range), got --seed {2**70}", "--seed 42"),
    ([f"--seed={-(2**63) - 1}"], "(torch's seed range), got --seed -9223372036854775809", "--seed 42"),
    (["--norm_threshold", "1", "2", "3", "4", "5"], "norm_threshold needs 1 to 3 values (the APG modes use the first one or two), got --norm_threshold [1.0, 2.0, 3.0, 4.0, 5.0]", "--norm_threshold 50 50 50"),
    (["--norm_threshold", "50", "nan"], "norm_threshold values must be finite numbers (0 or less turns clipping off), got --norm_threshold nan", "--norm_threshold 50 50 50"),
    (["--num_inference_steps", "-3"], "num_inference_steps must be >= 1 and at most 1000 (an integer), got --num_inference_steps -3", "--num_inference_steps 40"),
    (["--height", "100000"], "height must be >= 16 and at most 4096 pixels (an integer), got --height 100000", "--height 480"),
    (["--device", "gpu0"], "invalid runtime setting: device must be cuda, cuda:N (N = the GPU index) or cpu, got --device gpu0", "--device cuda"),
    (["--max_gpu_memory", "nan"], "invalid runtime setting: max_gpu_memory must be a finite number of GiB > 0, got --max_gpu_memory nan", ""),
]


@pytest.mark.parametrize(("flags", "message", "fix"), BAD_NUMBERS, ids=[" ".join(f[0]) for f in BAD_NUMBERS])
def test_bad_numbers_name_the_flag_rule_and_fix(flags: list[str], message: str, fix: str, config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loads = count_loads(monkeypatch)
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), "--output_dir", str(tmp_path), *TINY, *flags])
    err = capsys.readouterr().err
    assert code == 2 and loads == []
    line = next(line for line in err.splitlines() if " setting: " in line)
    assert message in line and (f"the default is {fix}" in line if fix else True)
    assert "Traceback" not in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("seed", ["18446744073709551615", "-1", "0"])
def test_every_torch_seed_is_accepted(seed: str, config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), "--output_dir", str(tmp_path), "--dry-run", *TINY, "--seed", seed])
    assert code == 0, capsys.readouterr().err


def test_duplicate_keys_are_refused_by_name(tmp_path: Path) -> None:
    case = write_case(tmp_path / "cases", "twice", '{"task_type": "t2v", "prompt": "first", "prompt": "second"}')
    inputs = tmp_path / "batch.json"
    inputs.write_text('[{"task_type": "t2v", "prompt": "ok"}, {"task_type": "t2v", "task_type": "t2i", "prompt": "p"}]')
    lines = tmp_path / "batch.jsonl"
    lines.write_text('{"task_type": "t2v", "prompt": "ok"}\n{"prompt": "a", "output": "x.mp4", "output": "y.mp4"}\n')
    found, errors = collect_cases(BatchSpec(case=[str(case)], output_dir=str(tmp_path / "out")))
    assert found == [] and errors == [(str(case), f"{case}: key 'prompt': appears more than once in this object (JSON would silently keep the last value); keep exactly one")]
    found, errors = collect_cases(BatchSpec(inputs=str(inputs), output_dir=str(tmp_path / "out")))
    assert [c.prompt for c in found] == ["ok"] and errors[0][0] == f"{inputs}[1]" and "key 'task_type': appears more than once" in errors[0][1]
    found, errors = collect_cases(BatchSpec(inputs=str(lines), output_dir=str(tmp_path / "out")))
    assert [c.prompt for c in found] == ["ok"] and errors[0][0] == f"{lines}:2" and "key 'output': appears more than once" in errors[0][1]


# ------------------------------------------------------------------ the prompt enhancer


def test_use_pe_without_a_key_or_with_a_bad_url_fails_before_loading(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    loads = count_loads(monkeypatch)
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", "--output_dir", tmp_path, "--use_pe", "--pe_on_error", "fail")
    assert code == 2 and "--use_pe: no API key: set BERNINI_PE_API_KEY or OPENAI_API_KEY" in err
    monkeypatch.setenv("BERNINI_PE_API_KEY", "sk-sentinel-never-printed")
    monkeypatch.setenv("BERNINI_PE_BASE_URL", "ftp://example.com")
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", "--output_dir", tmp_path, "--use_pe")
    assert code == 2 and "$BERNINI_PE_BASE_URL must be an http(s) URL" in err and "sk-sentinel" not in err
    monkeypatch.delenv("BERNINI_PE_BASE_URL")
    monkeypatch.setenv("BERNINI_PE_CACHE", str(tmp_path / "notes.txt" / "cache"))
    (tmp_path / "notes.txt").write_text("mine")
    code, _o, err = run(config, capsys, "--case", ASSETS / "t2v", "--output_dir", tmp_path, "--use_pe")
    assert code == 2 and "prompt cache" in err and "is a file" in err
    assert loads == [] and "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_enhancer_failure_under_fail_is_a_failed_case(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stub = StubServer().start()
    try:
        monkeypatch.setenv("BERNINI_PE_API_KEY", "sk-sentinel-never-printed")
        monkeypatch.setenv("BERNINI_PE_BASE_URL", stub.base_url)
        stub.push(http_error(400), answer("An enhanced paper boat."))  # 400: not retried, so no backoff wait
        code, _o, err = run(config, capsys, "--case", ASSETS / "t2i", ASSETS / "t2v", "--output_dir", tmp_path, "--use_pe", "--pe_on_error", "fail")
    finally:
        stub.stop()
    assert code == 1, err
    records = cases_of(summary_of(tmp_path / "summary.json"))
    assert records["t2i"]["status"] == "failed" and records["t2v"]["status"] == "ok"
    error = records["t2i"]["error"]
    assert error.startswith("prompt enhancement failed after 1 attempt(s)") and "\n" not in error
    assert "Traceback" not in err and "sk-sentinel" not in err + (tmp_path / "summary.json").read_text()
    assert not (tmp_path / "t2i.png").exists() and media.verify_media(tmp_path / "t2v.mp4", 5, 48, 32)
    assert json.loads((tmp_path / "t2v.mp4.json").read_text())["prompt_enhancer"]["status"] == "enhanced"
