"""The /v1/videos job server on the tiny checkpoint: the openai SDK against a real server process, the CLI's
outputs, crash recovery, auth, validation, limits, cancel, idempotency; in-process tests drive the same app."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the job server needs fastapi (requirements.txt)")
openai = pytest.importorskip("openai", reason="the tests drive the server with the openai SDK")
pytest.importorskip("openai.resources.videos", reason="the tests need an openai SDK with client.videos")

from fastapi.testclient import TestClient  # noqa: E402
from processes import end_group, free_port  # noqa: E402

from bernini.cases import load_case_file  # noqa: E402
from bernini.config import GenerationSettings, RuntimeConfig  # noqa: E402
from bernini.driver import Session  # noqa: E402
from bernini.engine import Engine  # noqa: E402
from bernini.media import verify_media  # noqa: E402
from bernini.pipeline import Renderer, resolve_sources  # noqa: E402
from bernini.runner import model_identity  # noqa: E402
from bernini.server import (  # noqa: E402
    JobRenderer,
    JobService,
    JobStore,
    Redactor,
    Rendered,
    RenderJob,
    ServerFolders,
    Worker,
    auth,
    create_app,
    launch,
)

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"openai\..*")  # the SDK marks client.videos deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "assets" / "testcases" / "media"
TINY = ["--num_inference_steps", "2", "--max_image_size", "64", "--num_frames", "5", "--height", "32", "--width", "48", "--device", "cpu", "--dtype", "float32"]
TINY_SETTINGS = GenerationSettings(num_inference_steps=2, max_image_size=64, num_frames=5, height=32, width=48)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same threads: same floats in every process



def frames_of(path: Path) -> np.ndarray:
    """Decoded RGB frames [T, H, W, 3] (a png is one frame)."""
    if path.suffix == ".png":
        return np.asarray(Image.open(path).convert("RGB"))[None]
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def wait_until(check: Callable[[], Any], seconds: float, what: str, every: float = 0.1) -> Any:
    """Poll until check() is truthy (bounded); its value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {seconds} s waiting for {what}")


# ---------------------------------------------------------------- a server process


class ServerProcess:
    """`python -m bernini serve` in its own process group, its output in a log file."""

    def __init__(self, config: str, data_dir: Path, log: Path, *flags: str, host: str = "127.0.0.1", env: dict[str, str] | None = None) -> None:
        self.host, self.port, self.log = host, free_port(host), log
        command = [sys.executable, "-m", "bernini", "serve", "--config", config, "--data_dir", str(data_dir), "--host", host, "--port", str(self.port), *TINY, *flags]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env or ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://{host}:{self.port}"

    def wait_ready(self, seconds: float = 120) -> None:
        import httpx

        def healthy() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, seconds, "the server to answer /health", every=0.3)

    def client(self, **kwargs: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=30, **kwargs)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this test started
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


def finish(client: Any, video_id: str, seconds: float = 120) -> Any:
    def done() -> Any:
        video = client.videos.retrieve(video_id)
        return video if video.status in ("completed", "failed") else None

    return wait_until(done, seconds, f"{video_id} to finish", every=0.2)


def test_sdk_jobs_equal_the_cli_outputs(config: str, tmp_path: Path) -> None:
    """t2v and i2i through the real openai SDK: polled to completion, downloaded, and pixel-equal to the CLI's files."""
    inputs = tmp_path / "cases.jsonl"
    inputs.write_text(
        json.dumps({"task_type": "t2v", "prompt": "a red cat", "output": str(tmp_path / "cli" / "t2v.mp4")}) + "\n"
        + json.dumps({"task_type": "i2i", "prompt": "make it blue", "image": str(MEDIA / "image.png"), "output": str(tmp_path / "cli" / "i2i.png")}) + "\n"
    )
    cli = subprocess.Popen([sys.executable, "-m", "bernini", "run", "--config", config, "--inputs", str(inputs), *TINY, "--seed", "7"],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(config, tmp_path / "data", tmp_path / "server.log")  # launch seed 42: the request's seed must win
    try:
        server.wait_ready()
        client = server.client()
        t2v = client.videos.create(prompt="a red cat", extra_body={"seed": 7}, extra_headers={"Idempotency-Key": "t2v-1"})
        assert (t2v.status, t2v.object, t2v.model, t2v.size, t2v.seconds) == ("queued", "video", "bernini-r", "48x32", "0.25")
        retry = client.videos.create(prompt="a red cat", extra_body={"seed": 7}, extra_headers={"Idempotency-Key": "t2v-1"})
        assert retry.id == t2v.id  # a client retry does not queue twice
        with open(MEDIA / "image.png", "rb") as image:
            i2i = client.videos.create(prompt="make it blue", input_reference=image, extra_body={"task_type": "i2i", "seed": 7})
        done = {v.id: finish(client, v.id) for v in (t2v, i2i)}
        assert {v.status for v in done.values()} == {"completed"} and {v.progress for v in done.values()} == {100}
        assert cli.wait(timeout=120) == 0, cli.stdout.read() if cli.stdout else ""

        for video, suffix, name in ((t2v, ".mp4", "t2v.mp4"), (i2i, ".png", "i2i.png")):
            served = tmp_path / f"served{suffix}"
            client.videos.download_content(video.id).write_to_file(served)
            expected = frames_of(tmp_path / "cli" / name)
            assert np.array_equal(frames_of(served), expected), name
            thumb = tmp_path / f"thumb_{name}.jpg"
            client.videos.download_content(video.id, variant="thumbnail").write_to_file(thumb)
            with Image.open(thumb) as jpg:
                assert jpg.format == "JPEG" and jpg.size == expected.shape[2:0:-1]
        assert [v.id for v in client.videos.list(limit=1, order="asc")] == [t2v.id, i2i.id]  # the SDK pages through

        remix = client.videos.remix(t2v.id, prompt="make it snow")
        assert remix.remixed_from_video_id == t2v.id and finish(client, remix.id).status == "completed"
        sidecar = json.loads((tmp_path / "data" / "videos" / f"{remix.id}.mp4.json").read_text())
        assert sidecar["case"]["task_type"] == "v2v" and sidecar["effective"]["frames"] == 5
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve("video_" + "0" * 32)
    finally:
        server.stop()
        if cli.poll() is None:
            cli.kill()


def test_kill9_mid_render_then_restart_completes_every_job_once(config: str, tmp_path: Path) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    server = ServerProcess(config, data, log)
    try:
        server.wait_ready()
        client = server.client()
        slow = client.videos.create(prompt="a slow one", size="96x64", extra_body={"num_inference_steps": 200, "num_frames": 9})
        queued = [client.videos.create(prompt=f"queued {i}") for i in range(2)]

        def started() -> bool:
            video = client.videos.retrieve(slow.id)
            assert video.status in ("queued", "in_progress"), video.status  # it must still be rendering when killed
            return video.status == "in_progress" and video.progress >= 1

        wait_until(started, 60, "the slow job to be rendering")
        with pytest.raises(openai.ConflictError, match="in_progress"):
            client.videos.download_content(slow.id)  # no partial file is served
        server.kill()
    finally:
        server.stop()
    videos = data / "videos"
    # What a crash could leave: a torn file under the final name and an atomic writer's temporary file.
    (videos / f"{slow.id}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 torn")
    (videos / f".{slow.id}.mp4.tmp-999.mp4").write_bytes(b"partial")

    server = ServerProcess(config, data, log)
    try:
        server.wait_ready()
        client = server.client()
        seen = client.videos.retrieve(slow.id)
        if seen.status != "completed":
            with pytest.raises(openai.ConflictError):
                client.videos.download_content(slow.id)
        ids = [slow.id] + [v.id for v in queued]
        finished = [finish(client, i, 180) for i in ids]
        assert [v.status for v in finished] == ["completed"] * 3
        for video, frames in zip(finished, (9, 5, 5)):
            served = tmp_path / f"{video.id}.mp4"
            client.videos.download_content(video.id).write_to_file(served)
            width, height = map(int, video.size.split("x"))
            assert verify_media(served, frames, width, height)
        assert not list(videos.glob(".*tmp-*"))
    finally:
        server.stop()
    text = log.read_text()
    for job_id in ids:
        assert len(re.findall(rf"job {job_id}: completed", text)) == 1, job_id  # exactly once, across both runs
    assert f"job {slow.id}: started (attempt 2)" in text and "1 interrupted job(s) queued again" in text


# ---------------------------------------------------------------- in-process: the same app and worker, no subprocess


@pytest.fixture(scope="module")
def loaded(config: str) -> tuple[Any, Renderer]:
    sources = resolve_sources(config)
    return sources, Renderer.load(sources, RuntimeConfig(device="cpu", dtype="float32"))


class Recording:
    """The real JobRenderer, noting which jobs it rendered and how each ended; `on_step` lets a test act mid-render."""

    def __init__(self, inner: JobRenderer, on_step: Callable[[str, Any], None] | None = None) -> None:
        self.inner, self.on_step = inner, on_step
        self.device = inner.device
        self.results: dict[str, Rendered] = {}
        self.rendered: list[str] = []

    def render(self, job: RenderJob, report: Callable[[Any], None], should_stop: Callable[[], bool]) -> Rendered:
        self.rendered.append(job.job_id)

        def step(event: Any) -> None:
            if self.on_step is not None:
                self.on_step(job.job_id, event)
            report(event)

        self.results[job.job_id] = result = self.inner.render(job, step, should_stop)
        return result

    def close(self) -> None:
        self.inner.close()


class Harness:
    def __init__(self, loaded: tuple[Any, Renderer], root: Path, limits: auth.Limits | None = None) -> None:
        sources, renderer = loaded
        self.folders = ServerFolders.create(root)
        self.store = JobStore(self.folders.database)
        self.renderer = Recording(JobRenderer(Session(Engine(renderer, sources, identity=model_identity(sources)))))
        redact = Redactor(self.folders, [sources.config_dir])
        self.worker = Worker(self.store, self.folders, self.renderer, redact)  # type: ignore[arg-type]
        self.service = JobService(self.store, self.folders, TINY_SETTINGS, limits or auth.Limits(), "bernini-r", redact, None)
        self.app = create_app(self.service, auth.Access(), renderer.device)
        self.http = TestClient(self.app, raise_server_exceptions=False)
        self.root = root

    def start_worker(self) -> None:
        self.service.worker = self.worker
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()

    def post(self, *args: Any, **kwargs: Any) -> Any:
        response = self.http.post(*args, **kwargs)
        assert str(self.root) not in response.text and str(ROOT) not in response.text, response.text  # no server path, ever
        return response

    def wait(self, video_id: str, seconds: float = 60) -> dict[str, Any]:
        def done() -> Any:
            body = self.http.get(f"/v1/videos/{video_id}").json()
            return body if body.get("status") in ("completed", "failed") else None

        return wait_until(done, seconds, f"{video_id} to finish")


@pytest.fixture()
def harness(loaded: tuple[Any, Renderer], tmp_path: Path) -> Iterator[Harness]:
    h = Harness(loaded, tmp_path / "data")
    yield h
    h.close()


def upload(path: Path, name: str | None = None) -> tuple[str, bytes]:
    return (name or path.name, path.read_bytes())


@pytest.mark.parametrize(
    ("data", "files", "message"),
    [
        ({"prompt": "  "}, None, "request: key 'prompt': must be a non-empty string"),
        ({"prompt": "x", "guidance_mode": "nope"}, None, "request: key 'guidance_mode': unknown guidance mode 'nope'"),
        ({"prompt": "x", "task_type": "t2x"}, None, "request: key 'task_type': unknown task_type 't2x'"),
        ({"prompt": "x", "output": "/etc/x.mp4"}, None, "request: key 'output': unknown key; allowed keys: prompt, model, size"),
        ({"prompt": "x", "num_inference_steps": "0"}, None, "invalid generation setting: num_inference_steps must be >= 1"),
        ({"prompt": "x", "seed": "abc"}, None, "request: key 'seed': must be an integer, got 'abc'"),
        ({"prompt": "x", "size": "big"}, None, "request: key 'size': must be 'WIDTHxHEIGHT' such as '848x480', got 'big'"),
        ({"prompt": "x", "seconds": "4", "num_frames": "9"}, None, "request: key 'seconds': give seconds or num_frames, not both"),
        ({"prompt": "x", "model": "sora-2"}, None, "request: key 'model': 'sora-2' is not served here; this server serves 'bernini-r'"),
        ({"prompt": "x", "task_type": "v2v", "video": "/etc/passwd"}, None, "request: key 'video': send the file as an upload"),
        ({"prompt": "x", "task_type": "v2v"}, {"video": ("notes.mp4", b"not a video")}, "request: key 'video': video '3-notes.mp4' could not be decoded"),
    ],
)
def test_bad_requests_get_400_with_the_case_file_message_and_leave_nothing(harness: Harness, data: dict[str, str], files: Any, message: str) -> None:
    response = harness.post("/v1/videos", data=data, files=files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(message) and error["type"] == "invalid_request_error"
    assert not list(harness.folders.uploads.iterdir()) and harness.store.counts()["queued"] == 0


def test_the_message_is_the_case_files_own(harness: Harness, tmp_path: Path) -> None:
    case_file = tmp_path / "case.json"
    # Media combinations are all valid (as upstream); an unknown task is a refusal both ways.
    case_file.write_text(json.dumps({"task_type": "rv2x", "prompt": "x", "video": str(MEDIA / "source.mp4")}))
    with pytest.raises(ValueError) as cli:
        load_case_file(case_file)
    response = harness.post("/v1/videos", data={"prompt": "x", "task_type": "rv2x"}, files={"video": upload(MEDIA / "source.mp4")})
    assert response.json()["error"]["message"].removeprefix("request: ") == str(cli.value).removeprefix(f"{case_file}: ")


def test_json_bodies_take_data_urls_and_never_paths(harness: Harness) -> None:
    import base64

    png = "data:image/png;base64," + base64.b64encode((MEDIA / "image.png").read_bytes()).decode()
    good = harness.post("/v1/videos", json={"prompt": "make it blue", "task_type": "i2i", "image": png, "seed": 3})
    assert good.status_code == 200 and good.json()["content_type"] == "image/png" and good.json()["size"] == "64x48"
    reference = harness.post("/v1/videos", json={"prompt": "p", "task_type": "i2i", "input_reference": {"image_url": png}})
    assert reference.status_code == 200
    web = harness.post("/v1/videos", json={"prompt": "p", "input_reference": {"image_url": "https://example.com/cat.png"}})
    assert web.status_code == 400 and "web URLs are not fetched" in web.json()["error"]["message"]
    text = harness.post("/v1/videos", json={"prompt": "a boat", "size": "96x64", "seconds": 0.5})
    assert (text.json()["task_type"], text.json()["size"], text.json()["seconds"]) == ("t2v", "96x64", "0.5")
    assert harness.http.post("/v1/videos", content=b"[1]", headers={"content-type": "application/json"}).status_code == 400
    assert harness.http.post("/v1/videos", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


def test_uploads_stay_in_the_jobs_folder(harness: Harness) -> None:
    response = harness.post("/v1/videos", data={"prompt": "x", "task_type": "v2v"}, files={"video": ("../../../escape/..\\evil.mp4", (MEDIA / "source.mp4").read_bytes())})
    assert response.status_code == 200, response.text
    folder = harness.folders.upload_dir(response.json()["id"])
    assert [p.name for p in folder.iterdir()] == ["3-evil.mp4"]  # part 3 (after two fields), folder parts dropped
    assert not list(harness.root.parent.rglob("escape")) and not (harness.root / "evil.mp4").exists()


def test_over_the_upload_cap_is_413_and_stored_nothing(loaded: tuple[Any, Renderer], tmp_path: Path) -> None:
    h = Harness(loaded, tmp_path / "data", limits=auth.Limits(max_upload_bytes=64 * 1024))
    big = b"0" * 200_000
    declared = h.post("/v1/videos", data={"prompt": "x", "task_type": "v2v"}, files={"video": ("big.mp4", big)})
    assert declared.status_code == 413 and "upload limit" in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while streaming
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\nContent-Type: video/mp4\r\n\r\n'
        for _ in range(20):
            yield b"0" * 10_000
        yield b"\r\n" + boundary + b"--\r\n"

    streamed = h.http.post("/v1/videos", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert streamed.status_code == 413
    assert h.post("/v1/videos", json={"prompt": "x" * 100_000}).status_code == 413
    assert not list(h.folders.uploads.iterdir()) and h.store.counts()["queued"] == 0
    assert h.post("/v1/videos", data={"prompt": "x"}).status_code == 200  # under the cap


def test_a_full_queue_is_429_until_a_job_leaves(loaded: tuple[Any, Renderer], tmp_path: Path) -> None:
    h = Harness(loaded, tmp_path / "data", limits=auth.Limits(max_queued=2))  # no worker: jobs stay queued
    first, second = (h.post("/v1/videos", json={"prompt": f"job {i}"}).json() for i in range(2))
    full = h.post("/v1/videos", json={"prompt": "one too many"})
    assert full.status_code == 429 and full.headers["retry-after"] == "30" and full.json()["error"]["code"] == "queue_full"
    assert h.http.delete(f"/v1/videos/{first['id']}").json() == {"id": first["id"], "object": "video.deleted", "deleted": True}
    assert h.post("/v1/videos", json={"prompt": "now there is room"}).status_code == 200
    assert h.http.get("/v1/videos").json()["data"][1]["id"] == second["id"]


def test_idempotency_key_returns_the_first_job(harness: Harness) -> None:
    def send(prompt: str, key: str) -> Any:
        return harness.post("/v1/videos", data={"prompt": prompt, "task_type": "i2i"}, files={"image": upload(MEDIA / "image.png")}, headers={"Idempotency-Key": key})

    first, again = send("make it blue", "k1"), send("make it blue", "k1")
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert [p.name for p in harness.folders.uploads.iterdir()] == [first.json()["id"]]  # the retry's upload was dropped
    reused = send("make it red", "k1")
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused" and reused.headers["x-should-retry"] == "false"
    other = send("make it blue", "k2")
    assert other.json()["id"] != first.json()["id"] and len(harness.http.get("/v1/videos").json()["data"]) == 2


def test_a_deleted_queued_job_never_runs(harness: Harness) -> None:
    doomed = harness.post("/v1/videos", data={"prompt": "never"}).json()
    kept = harness.post("/v1/videos", data={"prompt": "kept"}).json()
    assert harness.http.delete(f"/v1/videos/{doomed['id']}").status_code == 200
    assert harness.http.get(f"/v1/videos/{doomed['id']}").status_code == 404
    assert harness.http.delete(f"/v1/videos/{doomed['id']}").status_code == 404
    harness.start_worker()
    assert harness.wait(kept["id"])["status"] == "completed"
    assert harness.renderer.rendered == [kept["id"]] and not harness.folders.outputs_of(doomed["id"])
    assert not harness.folders.upload_dir(doomed["id"]).exists()


def test_a_deleted_running_job_stops_at_its_next_step(harness: Harness) -> None:
    def cancel_at_first_step(job_id: str, event: Any) -> None:
        if event.index == 0:
            assert harness.http.delete(f"/v1/videos/{job_id}").json()["deleted"] is True

    harness.renderer.on_step = cancel_at_first_step
    job = harness.post("/v1/videos", json={"prompt": "stop me", "num_inference_steps": 6}).json()
    harness.start_worker()
    wait_until(lambda: job["id"] in harness.renderer.results and job["id"] not in harness.store.ids(), 60, "the job to stop and be purged")
    result = harness.renderer.results[job["id"]]
    assert not result.ok and "stopped after step 2/6" in (result.error or "")
    assert not harness.folders.outputs_of(job["id"]) and not harness.folders.upload_dir(job["id"]).exists()
    harness.renderer.on_step = None
    after = harness.post("/v1/videos", json={"prompt": "the next one"}).json()
    assert harness.wait(after["id"])["status"] == "completed"  # the worker goes on


def test_shutdown_mid_render_queues_the_job_again(harness: Harness) -> None:
    stopper: list[threading.Thread] = []

    def stop_at_first_step(job_id: str, event: Any) -> None:
        if event.index == 0 and not stopper:  # Worker.stop joins the worker thread: call it from another one
            stopper.append(threading.Thread(target=harness.worker.stop))
            stopper[0].start()

    harness.renderer.on_step = stop_at_first_step
    job = harness.post("/v1/videos", json={"prompt": "interrupted", "num_inference_steps": 6}).json()
    harness.start_worker()
    wait_until(lambda: stopper and not stopper[0].is_alive() and not harness.worker.alive, 60, "the worker to stop")
    assert "stopped after step" in (harness.renderer.results[job["id"]].error or "")
    assert harness.http.get(f"/v1/videos/{job['id']}").json()["status"] == "queued"  # it runs again at the next start
    assert not harness.folders.outputs_of(job["id"])


def test_content_waits_for_completion_then_serves_mp4_png_and_thumbnail(harness: Harness) -> None:
    video = harness.post("/v1/videos", data={"prompt": "a boat"}).json()
    image = harness.post("/v1/videos", data={"prompt": "a cat", "task_type": "t2i"}).json()
    waiting = harness.http.get(f"/v1/videos/{video['id']}/content")
    assert waiting.status_code == 409 and waiting.json()["error"]["code"] == "video_not_ready"
    harness.start_worker()
    assert harness.wait(video["id"])["status"] == harness.wait(image["id"])["status"] == "completed"
    mp4 = harness.http.get(f"/v1/videos/{video['id']}/content")
    assert mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
    png = harness.http.get(f"/v1/videos/{image['id']}/content")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    thumb = harness.http.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert harness.http.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"}).status_code == 400
    metrics = harness.http.get("/metrics").text
    assert 'bernini_jobs{state="completed"} 2' in metrics and "bernini_queue_length 0" in metrics and "bernini_job_seconds_count 2" in metrics


def test_list_pages_in_both_orders(harness: Harness) -> None:
    ids = [harness.post("/v1/videos", json={"prompt": f"p{i}"}).json()["id"] for i in range(5)]
    for order, expected in (("desc", ids[::-1]), ("asc", ids)):
        seen, after = [], None
        for _ in range(5):  # bounded
            page = harness.http.get("/v1/videos", params={"limit": 2, "order": order, **({"after": after} if after else {})}).json()
            seen += [v["id"] for v in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == expected, order
    assert harness.http.get("/v1/videos", params={"limit": 0}).status_code == 400
    assert harness.http.get("/v1/videos", params={"limit": "many"}).status_code == 400


def test_failed_render_reports_a_message_without_server_paths(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    from bernini import media

    def broken(frames: Any, path: Path, fps: float) -> Path:
        raise media.MediaError(f"output '{path}' could not be written (disk full)")

    monkeypatch.setattr(media, "write_media", broken)
    job = harness.post("/v1/videos", json={"prompt": "x"}).json()
    harness.start_worker()
    done = harness.wait(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "render_failed"
    assert done["error"]["message"] == f"output '<data>/videos/{job['id']}.mp4' could not be written (disk full)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_job_completes_and_metrics_report_gpu_memory(config: str, tmp_path: Path) -> None:
    sources = resolve_sources(config)
    h = Harness((sources, Renderer.load(sources, RuntimeConfig(device="cuda", dtype="bfloat16", compile=False))), tmp_path / "data")
    try:
        job = h.post("/v1/videos", json={"prompt": "a red cat", "task_type": "t2i"}).json()
        h.start_worker()
        assert h.wait(job["id"])["status"] == "completed"
        metrics = h.http.get("/metrics").text
        assert re.search(r'bernini_gpu_memory_bytes\{kind="max_allocated",device="cuda:\d+"\} [1-9]', metrics), metrics
    finally:
        h.close()


# ---------------------------------------------------------------- who may call


def test_any_host_but_localhost_needs_the_token() -> None:
    assert auth.access_for("127.0.0.1", 8000, {}) == auth.Access("127.0.0.1", 8000, None)
    for host in ("127.0.0.2", "0.0.0.0", "10.1.2.3"):
        with pytest.raises(ValueError, match=f"--host {re.escape(host)} would let anyone .* set BERNINI_API_TOKEN"):
            auth.access_for(host, 8000, {})
    assert auth.access_for("0.0.0.0", 8000, {"BERNINI_API_TOKEN": "s3cret"}).token == "s3cret"
    assert "s3cret" not in repr(auth.access_for("0.0.0.0", 8000, {"BERNINI_API_TOKEN": "s3cret"}))


def test_serve_refuses_a_public_host_before_loading(config: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Renderer, "load", classmethod(refuse))
    monkeypatch.delenv("BERNINI_API_TOKEN", raising=False)
    assert launch.main(["--config", config, "--host", "0.0.0.0", "--data_dir", str(tmp_path), *TINY]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        launch.parse_args(["--case", "assets/testcases"])
    assert "--case is a batch flag of infer_single_gpu.py; a job server takes the task" in capsys.readouterr().err


@pytest.fixture()
def token_server(harness: Harness) -> Iterator[str]:
    """The app on 127.0.0.2 (loopback, but not 127.0.0.1: the token is required), served by uvicorn in a thread."""
    import uvicorn

    harness.app = create_app(harness.service, auth.access_for("127.0.0.2", 8000, {"BERNINI_API_TOKEN": "s3cret"}))
    server = uvicorn.Server(uvicorn.Config(harness.app, host="127.0.0.2", port=free_port("127.0.0.2"), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn to start")
    yield f"http://127.0.0.2:{server.config.port}"
    server.should_exit = True
    thread.join(30)


def test_bearer_token_on_every_endpoint_but_health(token_server: str) -> None:
    import httpx

    some_id = "video_" + "0" * 32
    routes = [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", f"/v1/videos/{some_id}"), ("GET", f"/v1/videos/{some_id}/content"),
              ("DELETE", f"/v1/videos/{some_id}"), ("POST", f"/v1/videos/{some_id}/remix"), ("GET", "/metrics")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.request(method, token_server + path, headers=headers, json={"prompt": "x"}, timeout=10)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", (method, path, headers)
    assert httpx.get(f"{token_server}/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=f"{token_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.videos.list()
    client = openai.OpenAI(base_url=f"{token_server}/v1", api_key="s3cret", max_retries=0)
    video = client.videos.create(prompt="a red cat")
    assert client.videos.retrieve(video.id).status == "queued"


# ---------------------------------------------------------------- torchrun: rank 0 serves, every rank renders


def test_torchrun_gloo_rank0_serves_and_both_ranks_render(config: str, tmp_path: Path) -> None:
    import httpx

    port, data = free_port(), tmp_path / "data"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bernini", "serve",
               "--ulysses", "2", "--config", config, "--port", str(port), "--data_dir", str(data), *TINY]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"torchrun exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 150, "rank 0 to serve", every=0.3)
        for prompt in ("a red cat", "a blue dog"):  # the second proves rank 1 went back to waiting
            job = httpx.post(f"{url}/v1/videos", json={"prompt": prompt, "task_type": "t2i"}, timeout=30).json()

            def done(job_id: str = job["id"]) -> Any:
                body = httpx.get(f"{url}/v1/videos/{job_id}", timeout=10).json()
                return body if body["status"] in ("completed", "failed") else None

            assert wait_until(done, 120, prompt)["status"] == "completed"
            assert httpx.get(f"{url}/v1/videos/{job['id']}/content", timeout=10).content[:4] == b"\x89PNG"
    finally:
        end_group(proc, 30)
