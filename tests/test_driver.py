"""The batch driver: SIGTERM/SIGINT end a batch cleanly, the tally line, the dry run on a machine without CUDA."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bernini import main as entry
from bernini.pipeline import Renderer

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "testcases"
TINY = ["--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]


def write_cases(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / f"{name}.json").write_text(json.dumps({"task_type": "t2v", "prompt": f"{name}: a lighthouse in a storm"}))
    return folder


class Batch:
    """A batch command in a subprocess, its stderr read line by line as it comes."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=1):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        self.stop()
        pytest.fail(f"no line with {text!r} within {seconds} s: {''.join(self.err)[-3000:]}")

    def finish(self, seconds: float) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=seconds)  # stdout holds one line or two: its pipe cannot fill up
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the batch did not end within {seconds} s of the signal")
        self.reader.join(30)  # the last stderr lines
        assert self.proc.stdout is not None
        return self.proc.returncode, self.proc.stdout.read(), "".join(self.err)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this test started
            self.proc.wait()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_render_ends_the_batch_cleanly(config: str, tmp_path: Path, signum: int, code: int) -> None:
    name = signal.Signals(signum).name
    cases = write_cases(tmp_path / "cases", "a_first", "b_second", "c_third")
    out = tmp_path / "out"
    batch = Batch([sys.executable, "infer_single_gpu.py", "--config", config, "--case", str(cases), "--output_dir", str(out), "--num_inference_steps", "40", *TINY])
    batch.wait_for("[2/3] b_second step 1/40", 240)  # the first case is done, the second one is rendering
    batch.proc.send_signal(signum)
    returncode, stdout, stderr = batch.finish(120)
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("interrupted by")] == [f"interrupted by {name}: 1 ok, 0 failed, 0 skipped, 2 not run"]
    assert stdout.strip().splitlines()[-1] == str(out / "summary.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["exit_code"] == code and summary["interrupted"] == name
    assert summary["counts"] == {"ok": 1, "not_run": 2}
    status = {c["name"]: (c["status"], c.get("error")) for c in summary["cases"]}
    assert status == {"a_first": ("ok", None), "b_second": ("not_run", f"interrupted by {name}"), "c_third": ("not_run", f"interrupted by {name}")}
    assert sorted(p.name for p in out.iterdir()) == ["a_first.mp4", "a_first.mp4.json", "summary.json"]  # no partial or temporary file


def test_sigterm_to_torchrun_stops_both_ranks_of_a_group_at_the_same_step(config: str, tmp_path: Path) -> None:
    cases = write_cases(tmp_path / "cases", "a_first", "b_second", "c_third")
    out = tmp_path / "out"
    batch = Batch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "infer_multi_gpu.py", "--ulysses", "2",
                   "--config", config, "--case", str(cases), "--output_dir", str(out), "--num_inference_steps", "40", *TINY])
    batch.wait_for("[2/3] b_second step 1/40", 300)
    batch.proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
    _returncode, stdout, stderr = batch.finish(120)  # torchrun's own exit code and report are its business
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["exit_code"] == 143 and summary["interrupted"] == "SIGTERM", stderr[-3000:]
    assert summary["counts"] == {"ok": 1, "not_run": 2}  # the two ranks left b_second together: no hang, no failure
    assert sorted(p.name for p in out.iterdir()) == ["a_first.mp4", "a_first.mp4.json", "summary.json"]
    assert stderr.count("interrupted by SIGTERM: 1 ok, 0 failed, 0 skipped, 2 not run") == 1  # rank 0 says it once
    assert not any("bernini/" in line and line.lstrip().startswith("File ") for line in stderr.splitlines()), "a worker printed a traceback"
    assert stdout.strip().splitlines()[-1] == str(out / "summary.json")


def test_the_tally_line_ends_every_run(config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = write_cases(tmp_path / "cases", "one", "two")
    (cases / "broken.json").write_text(json.dumps({"task_type": "t2v"}))  # no prompt: invalid
    args = ["--config", config, "--case", str(cases), "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "2", *TINY]
    assert entry.main(args) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[-1] == "2 ok, 0 failed, 0 skipped, 1 invalid" and out.splitlines()[-1] == str(tmp_path / "out" / "summary.json")
    assert entry.main([*args, "--skip-existing"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "0 ok, 0 failed, 2 skipped, 1 invalid"


def test_dry_run_for_cuda_on_a_machine_without_cuda_says_so(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Renderer, "load", classmethod(refuse))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = [f for f in TINY if f not in ("--device", "cpu")]
    code = entry.main(["--config", config, "--case", str(ASSETS / "t2v"), str(ASSETS / "t2i"), "--output_dir", str(tmp_path), "--dry-run", "--device", "cuda", *flags])
    out = capsys.readouterr().out
    assert code == 0  # the cases are valid; this machine just cannot run them
    assert "2 case(s) valid, 0 invalid" in out and "case(s) ready" not in out and "unknown" not in out
    assert "not ready to run here: --device cuda but this machine has no CUDA device, so no memory plan was made" in out
    assert not any(tmp_path.iterdir())
