"""The Gradio demo in headless Chromium: t2i and v2v end to end, a bad upload, Stop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("gradio", reason="the demo needs gradio (requirements.txt)")

from processes import end_group, free_port  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "assets" / "testcases" / "media" / "source.mp4"
TINY = ["--num_inference_steps", "2", "--max_image_size", "64", "--num_frames", "5", "--height", "32", "--width", "48", "--device", "cpu", "--dtype", "float32"]
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 45_000  # one tiny render on a busy CPU takes seconds; this bounds a hang



def wait_until_served(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not serve {url} within {seconds} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """gradio_demo.py on the tiny checkpoint (CPU), in its own process group, on a free port."""
    from bernini.testing import tiny_checkpoints

    root = tmp_path_factory.mktemp("demo")
    save_dir, port = root / "results", free_port()
    command = [sys.executable, str(ROOT / "gradio_demo.py"), "--config", str(tiny_checkpoints().diffusers), "--port", str(port), "--save_dir", str(save_dir), *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "GRADIO_TEMP_DIR": str(root / "uploads")}
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, proc, log, 90)
        yield url, save_dir, log
    finally:
        end_group(proc, 20)


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def page(browser: sync_api.Browser, server: tuple[str, Path, Path]) -> Iterator[sync_api.Page]:
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(server[0])
    try:
        yield page
    finally:
        page.close()


def choose_task(page: sync_api.Page, task: str) -> None:
    page.locator("#task input").click()
    page.get_by_role("option", name=re.compile(rf"^{task}:")).click()


def saved(save_dir: Path, status: str) -> tuple[Path, dict]:
    """The file the status line names, and its sidecar."""
    name = re.search(r"saved (\S+)", status)
    assert name, status
    output = save_dir / name.group(1)
    return output, json.loads((save_dir / f"{output.name}.json").read_text())


def test_t2i_in_the_browser(page: sync_api.Page, server: tuple[str, Path, Path]) -> None:
    page.locator("#prompt textarea").fill("a red cat on a sofa")
    page.locator("#generate").click()
    image = page.locator("#result-image img")
    image.wait_for(state="visible")
    assert ".png" in (image.get_attribute("src") or "")
    status = page.locator("#status textarea").input_value()
    output, sidecar = saved(server[1], status)
    assert output.suffix == ".png" and output.is_file() and sidecar["case"]["task_type"] == "t2i"
    sync_api.expect(page.locator("#prompt-used textarea")).to_have_value("a red cat on a sofa")


def test_v2v_in_the_browser(page: sync_api.Page, server: tuple[str, Path, Path]) -> None:
    choose_task(page, "v2v")
    expect = sync_api.expect
    expect(page.locator("#guidance-mode input")).to_have_value("v2v_apg")  # the task's default
    expect(page.locator("#source-video")).to_be_visible()
    expect(page.locator("#source-image")).to_be_hidden()
    expect(page.locator("#height")).to_be_hidden()
    page.locator("#prompt textarea").fill("make it snow")
    page.locator("#source-video input[type=file]").set_input_files(str(SOURCE))
    page.locator("#source-video video").wait_for()  # the upload finished
    page.locator("#generate").click()
    video = page.locator("#result-video video")
    video.wait_for(state="visible")
    assert ".mp4" in (video.get_attribute("src") or "")
    output, sidecar = saved(server[1], page.locator("#status textarea").input_value())
    assert output.suffix == ".mp4" and output.is_file()
    assert sidecar["case"]["task_type"] == "v2v" and sidecar["effective"]["guidance_mode"] == "v2v_apg"


def test_bad_upload_shows_the_error(page: sync_api.Page, server: tuple[str, Path, Path], tmp_path: Path) -> None:
    fake = tmp_path / "holiday.mp4"
    fake.write_text("this is a text file, not a video")
    before = set(server[1].glob("*"))
    choose_task(page, "v2v")
    page.locator("#prompt textarea").fill("make it snow")
    page.locator("#source-video input[type=file]").set_input_files(str(fake))
    page.wait_for_timeout(1000)  # let the upload land
    page.locator("#generate").click()
    page.get_by_text(re.compile(r"request: key 'video': video '.*holiday\.mp4' could not be decoded")).first.wait_for()
    assert set(server[1].glob("*")) == before


def test_missing_video_shows_the_cli_message(page: sync_api.Page) -> None:
    choose_task(page, "v2v")
    page.locator("#prompt textarea").fill("make it snow")
    page.locator("#generate").click()
    page.get_by_text("request: key 'video': task 'v2v' takes exactly 1 video(s), got 0").first.wait_for()


def test_stop_cancels_between_steps(page: sync_api.Page, browser: sync_api.Browser, server: tuple[str, Path, Path]) -> None:
    before = set(server[1].glob("*"))
    choose_task(page, "t2v")
    page.locator("#prompt textarea").fill("a long render")
    for elem, value in (("#steps", "100"), ("#num-frames", "81")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#height input").fill("256")
    page.locator("#width input").fill("256")
    page.locator("#generate").click()
    page.get_by_text(re.compile(r"\d+/100 steps")).first.wait_for()  # the progress bar follows the steps
    other = browser.new_page()  # another visitor's Stop must not end this run
    other.goto(server[0])
    other.locator("#stop").click()
    sync_api.expect(other.locator("#status textarea")).to_have_value("nothing of yours is running")
    other.close()
    assert "cancelled after step" not in server[2].read_text()
    page.locator("#stop").click()
    # "stopping ..." shows until the run ends at the next step boundary and writes its own status; on a
    # fast machine that can happen before the first look, so either message proves the Stop was taken.
    sync_api.expect(page.locator("#status textarea")).to_have_value(
        re.compile(r"stopping after the current step|cancelled after step \d+/100; nothing was saved"))
    log = server[2]
    deadline = time.monotonic() + 20  # a step of this size takes well under a second
    while "cancelled after step" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert re.search(r"t2v_\S+: FAILED: cancelled after step \d+/100; nothing was saved", log.read_text())
    assert set(server[1].glob("*")) == before
