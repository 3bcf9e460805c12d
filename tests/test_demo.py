"""The Gradio demo without a browser: safe binding, served paths, request handling, cancel, torchrun."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

gr = pytest.importorskip("gradio", reason="the demo needs gradio (requirements.txt)")

from processes import end_group, free_port  # noqa: E402

from bernini import demo  # noqa: E402
from bernini.cases import CaseError  # noqa: E402
from bernini.config import RuntimeConfig  # noqa: E402
from bernini.driver import Session  # noqa: E402
from bernini.engine import Engine  # noqa: E402
from bernini.media import verify_media  # noqa: E402
from bernini.parallel import LocalPeers  # noqa: E402
from bernini.pipeline import Renderer, resolve_sources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "assets" / "testcases" / "media"
TINY = ["--num_inference_steps", "2", "--max_image_size", "64", "--num_frames", "5", "--height", "32", "--width", "48", "--device", "cpu", "--dtype", "float32"]
NAME = re.compile(r"^(t2i|v2v)_\d{8}_\d{6}_\d{6}\.(png|mp4)$")



@pytest.fixture(scope="module")
def loaded(config: str) -> tuple[Any, Renderer]:
    sources = resolve_sources(config)
    return sources, Renderer.load(sources, RuntimeConfig(device="cpu", dtype="float32"))


def make_service(config: str, loaded: tuple[Any, Renderer], save_dir: Path, *flags: str) -> demo.DemoService:
    sources, renderer = loaded
    args = demo.parse_args(["--config", config, "--save_dir", str(save_dir), *TINY, *flags])
    runner = demo.JobRunner(Session(Engine(renderer, sources)), LocalPeers())
    return demo.DemoService(runner, demo.base_settings(args), save_dir)


@pytest.fixture()
def service(config: str, loaded: tuple[Any, Renderer], tmp_path: Path) -> demo.DemoService:
    return make_service(config, loaded, tmp_path / "gradio")


# ---------------------------------------------------------------- binding and access


def access(*flags: str) -> demo.Access:
    return demo.access_from(demo.parse_args([*flags]))


def test_default_binds_localhost_without_share() -> None:
    assert access() == demo.Access("127.0.0.1", 7860, False, ())


@pytest.mark.parametrize("flags", [["--listen"], ["--share"], ["--listen", "--share"]])
def test_public_binding_needs_auth(flags: list[str]) -> None:
    with pytest.raises(ValueError, match=r"without a login: add --auth USER:PASS or --auth_file FILE"):
        access(*flags)


def test_public_binding_with_auth_or_auth_file(tmp_path: Path) -> None:
    assert access("--listen", "--auth", "ann:s3cret") == demo.Access("0.0.0.0", 7860, False, (("ann", "s3cret"),))
    logins = tmp_path / "logins"
    logins.write_text("# team\nann:one\n\nbob:two:with:colons\n")
    assert access("--share", "--auth_file", str(logins)).auth == (("ann", "one"), ("bob", "two:with:colons"))


@pytest.mark.parametrize("login", ["ann", "ann:", ":pw"])
def test_bad_login_is_refused_without_echoing_it(login: str) -> None:
    with pytest.raises(ValueError, match="--auth: a login is USER:PASS") as info:
        access("--listen", "--auth", login)
    assert "pw" not in str(info.value)


def test_main_refuses_to_start_public_without_auth(config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Renderer, "load", classmethod(refuse))
    assert demo.main(["--config", config, "--listen", *TINY]) == 2
    assert "--listen would let anyone" in capsys.readouterr().err  # main() logs to stderr


def test_batch_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.parse_args(["--case", "assets/testcases/t2i.json"])
    assert "--case is a batch flag of infer_single_gpu.py; in the demo the browser gives the task" in capsys.readouterr().err


def test_launch_serves_only_the_save_dir(tmp_path: Path) -> None:
    options = demo.launch_options(access(), tmp_path / "out", "500mb")
    assert options["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert (options["server_name"], options["share"], options["auth"], options["max_file_size"]) == ("127.0.0.1", False, None, "500mb")


# ---------------------------------------------------------------- requests


def test_t2i_request_saves_png_and_sidecar(service: demo.DemoService) -> None:
    result = service.generate(demo.DemoRequest("t2i", "a red cat", knobs={"seed": 7}))
    assert result.output.parent == service.save_dir and NAME.match(result.output.name) and result.kind == "image"
    assert verify_media(result.output, 1, 48, 32)
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["output"] == str(result.output) and sidecar["seed"] == 7
    assert sidecar["effective"]["guidance_mode"] == "t2v_apg" and sidecar["case"]["task_type"] == "t2i"
    assert sidecar["prompt_used"].endswith("a red cat") and result.prompt == "a red cat"


def test_v2v_request_saves_mp4_and_sidecar(service: demo.DemoService) -> None:
    result = service.generate(demo.DemoRequest("v2v", "make it snow", videos=(str(MEDIA / "source.mp4"),)))
    assert NAME.match(result.output.name) and result.kind == "video" and result.sidecar.is_file()
    effective = json.loads(result.sidecar.read_text())["effective"]
    assert effective["guidance_mode"] == "v2v_apg" and verify_media(result.output, effective["frames"], effective["width"], effective["height"])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (demo.DemoRequest("v2v", "x"), "request: key 'video': task 'v2v' takes exactly 1 video(s), got 0"),
        (demo.DemoRequest("t2i", "  "), "request: key 'prompt': must be a non-empty string"),
        (demo.DemoRequest("i2i", "x"), "request: key 'image': task 'i2i' needs the source image under 'image'"),
        (demo.DemoRequest("t2v", "x", guidance_mode="nope"), "request: key 'guidance_mode': "),
        (demo.DemoRequest("t2v", "x", knobs={"num_inference_steps": 0}), "invalid generation setting: num_inference_steps must be >= 1"),
        (demo.DemoRequest("t2v", "x", use_pe=True), "the prompt enhancer is off: start the demo with --use_pe"),
    ],
)
def test_bad_request_raises_the_cli_message(service: demo.DemoService, request_: demo.DemoRequest, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        service.generate(request_)
    assert not any(service.save_dir.glob("*")) if service.save_dir.exists() else True


def test_bad_video_file_is_a_case_error(service: demo.DemoService, tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video")
    with pytest.raises(CaseError, match=r"request: key 'video': video '.*notes.mp4' could not be decoded"):
        service.generate(demo.DemoRequest("v2v", "x", videos=(str(fake),)))


def test_prompt_enhancer_is_a_per_request_switch(service: demo.DemoService) -> None:
    service.enhance = lambda case: (f"A detailed photo: {case.prompt}", {"status": "enhanced", "model": "stub"})
    enhanced = service.generate(demo.DemoRequest("t2i", "a red cat", use_pe=True))
    sidecar = json.loads(enhanced.sidecar.read_text())
    assert enhanced.prompt == "A detailed photo: a red cat" and sidecar["prompt_used"].endswith("A detailed photo: a red cat")
    assert sidecar["prompt_enhancer"] == {"status": "enhanced", "model": "stub"}
    raw = service.generate(demo.DemoRequest("t2i", "a red cat", use_pe=False))
    assert raw.prompt == "a red cat" and json.loads(raw.sidecar.read_text())["prompt_enhancer"] is None

    def down(case: Any) -> tuple[str, dict[str, Any]]:
        raise RuntimeError("endpoint unreachable")

    service.enhance = down
    with pytest.raises(demo.RenderError, match="prompt enhancement failed: RuntimeError: endpoint unreachable"):
        service.generate(demo.DemoRequest("t2i", "a red cat", use_pe=True))


def test_cancel_stops_between_steps_and_saves_nothing(config: str, loaded: tuple[Any, Renderer], tmp_path: Path) -> None:
    service = make_service(config, loaded, tmp_path / "out", "--num_inference_steps", "4")
    steps: list[int] = []

    def report(event: Any) -> None:
        steps.append(event.index)
        assert not service.cancel("someone else")  # another session cannot stop this request
        assert service.cancel("me")

    with pytest.raises(demo.Cancelled, match="cancelled after step 2/4"):
        service.generate(demo.DemoRequest("t2i", "x"), report, session="me")
    assert steps == [0] and not list((tmp_path / "out").glob("*.png"))
    assert service.generate(demo.DemoRequest("t2i", "x"), session="me").output.is_file()  # the next request runs


# ---------------------------------------------------------------- the page's handlers


def page_values(**values: Any) -> dict[str, Any]:
    return {"task_type": "t2i", "prompt": "a red cat", "guidance_mode": "t2v_apg", "use_pe": False, "source_video": None,
            "reference_video": None, "image": None, "images": None, **values}


def test_page_routes_media_to_the_task_slots() -> None:
    videos = {"source_video": "/a.mp4", "reference_video": "/b.mp4", "image": "/c.png", "images": ["/d.png"]}
    v2v = demo.request_from_page(page_values(task_type="v2v", **videos))
    assert (v2v.videos, v2v.image, v2v.images) == (("/a.mp4",), None, ())
    ads2v = demo.request_from_page(page_values(task_type="ads2v", **videos))
    assert (ads2v.videos, ads2v.image, ads2v.images) == (("/a.mp4", "/b.mp4"), None, ("/d.png",))
    i2i = demo.request_from_page(page_values(task_type="i2i", seed=3.0, **videos))
    assert (i2i.videos, i2i.image, i2i.images, i2i.knobs) == ((), "/c.png", (), {"seed": 3.0})


def test_task_change_sets_default_mode_and_shows_its_inputs() -> None:
    mode, source, reference, image, images, frames, fps, height, width, max_size = demo.Page.on_task("rv2v")
    assert mode["value"] == "rv2v"
    assert (source["visible"], reference["visible"], image["visible"], images["visible"]) == (True, False, False, True)
    assert (frames["visible"], height["visible"], max_size["visible"]) == (True, False, True)
    t2i = demo.Page.on_task("t2i")
    assert t2i[0]["value"] == "t2v_apg" and [u["visible"] for u in t2i[1:]] == [False, False, False, False, False, False, True, True, False]


def test_page_handler_shows_result_or_raises_gr_error(service: demo.DemoService) -> None:
    page = demo.Page(service, use_pe=False)
    video, image, prompt, status = page.on_generate(None, lambda *a, **k: None, **page_values())
    assert image["visible"] and not video["visible"] and Path(image["value"]).parent == service.save_dir
    assert prompt == "a red cat" and status.startswith("saved t2i_")
    with pytest.raises(gr.Error, match=re.escape("request: key 'video': task 'v2v' takes exactly 1 video(s), got 0")):
        page.on_generate(None, lambda *a, **k: None, **page_values(task_type="v2v", guidance_mode="v2v_apg"))


# ---------------------------------------------------------------- the running server


@pytest.fixture()
def server(service: demo.DemoService) -> Iterator[tuple[str, gr.Blocks]]:
    app = demo.build_app(service)
    url = demo.start(app, demo.Access(port=free_port()), service.save_dir, "1mb", queue_size=3)
    try:
        yield url, app
    finally:
        app.close()


def fetch(url: str, path: str) -> tuple[int, bytes]:
    """A raw GET: no client-side normalization of '..' or '%2F'."""
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_server_binds_localhost_with_a_bounded_queue(server: tuple[str, gr.Blocks]) -> None:
    url, app = server
    assert url.startswith("http://127.0.0.1:")
    assert app._queue.max_size == 3  # gradio has no public accessor
    generate = next(f for f in app.fns.values() if f.api_name == "generate")
    assert generate.concurrency_limit == 1


def test_files_outside_the_save_dir_cannot_be_fetched(server: tuple[str, gr.Blocks], service: demo.DemoService) -> None:
    url, _ = server
    result = service.generate(demo.DemoRequest("t2i", "x"))
    status, body = fetch(url, f"/gradio_api/file={result.output}")
    assert status == 200 and body[:4] == b"\x89PNG"  # the control: results are served
    secret = ROOT / "requirements.txt"  # in the working directory, which gradio may otherwise trust
    probes = [
        "/file=/etc/passwd",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=//etc/passwd",
        "/gradio_api/file=%2Fetc%2Fpasswd",
        "/gradio_api/file=../../../../../../etc/passwd",
        f"/gradio_api/file={service.save_dir}/../../../../../../etc/passwd",
        f"/gradio_api/file={service.save_dir}/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        f"/gradio_api/file={secret}",
        "/gradio_api/file=requirements.txt",
        f"/gradio_api/file={result.sidecar.parent.parent}",
        "/gradio_api/file=file:///etc/passwd",
    ]
    for probe in probes:
        status, body = fetch(url, probe)
        assert status in (403, 404), f"{probe}: HTTP {status}"
        assert b"root:" not in body and b"torch" not in body, probe


def test_auth_guards_the_page_and_the_files(service: demo.DemoService) -> None:
    import httpx

    result = service.generate(demo.DemoRequest("t2i", "x"))
    app = demo.build_app(service)
    url = demo.start(app, demo.Access(port=free_port(), auth=(("ann", "s3cret"),)), service.save_dir)
    try:
        assert fetch(url, f"/gradio_api/file={result.output}")[0] in (401, 403)
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/login", data={"username": "ann", "password": "wrong"}).status_code >= 400
            assert client.post("/login", data={"username": "ann", "password": "s3cret"}).status_code == 200
            assert client.get(f"/gradio_api/file={result.output}").status_code == 200
    finally:
        app.close()


def test_uploads_over_the_cap_are_refused(server: tuple[str, gr.Blocks]) -> None:
    import httpx

    url, _ = server
    small = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.mp4", b"0" * 1000)}, timeout=10)
    big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.mp4", b"0" * 2_000_000)}, timeout=10)
    assert small.status_code == 200 and big.status_code == 413  # the fixture caps uploads at 1 MB


# ---------------------------------------------------------------- torchrun: rank 0 serves, every rank renders


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited with {proc.returncode}: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        try:
            if fetch(url, "/")[0] == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not serve {url} within {seconds} s")


def test_torchrun_ulysses_rank0_serves_and_all_ranks_render(config: str, tmp_path: Path) -> None:
    from gradio_client import Client

    port, save_dir = free_port(), tmp_path / "dist"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "gradio_demo.py"),
               "--ulysses", "2", "--config", config, "--port", str(port), "--save_dir", str(save_dir), *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "uploads")}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, proc, 300)  # two ranks load the models before rank 0 serves: minutes on a loaded 2-core machine
        client = Client(url, verbose=False)
        empty = {"guidance_mode": None, "source_video": None, "reference_video": None, "image": None, "images": None,
                 "omega_vid_low": None, "omega_img_low": None, "omega_txt_low": None}  # empty: ω x omega_scale, as upstream
        for _ in range(2):  # the second request proves the other rank went back to waiting
            _, image, prompt, status = client.predict(task_type="t2i", prompt="a red cat", **empty, api_name="/generate")
            assert prompt == "a red cat" and status.startswith("saved t2i_"), status
        outputs = sorted(save_dir.glob("t2i_*.png"))
        assert len(outputs) == 2 and all((save_dir / f"{p.name}.json").is_file() for p in outputs)
    finally:
        end_group(proc, 30)
