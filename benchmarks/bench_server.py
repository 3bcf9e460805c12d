"""Seconds per 480p job through the job server against the CLI's per-case path, on one loaded renderer.

python -m benchmarks.bench_server --tiny .tiny/Bernini-R-Diffusers --steps 4 --compile [--repeats 2] [--json out.json]

Full-size random weights (UMT5-XXL, the Wan VAE, two A14B experts, all resident on one GPU; the tiny checkpoint
gives only the tokenizer and scheduler config). The CLI side is what `bernini run` does for each case once the
models are loaded (the driver's Session.run_case: render, atomic write, sidecar); the server side is a job sent with the
openai SDK to the real app and worker on 127.0.0.1, timed by the client from create() to the poll that sees it
completed (0.1 s polls). Runs alternate after a warm-up render; the target is a ratio within 1.02.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import argparse
import logging
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench_pipeline import build_renderer
from benchmarks.common import device_name, write_json
from bernini import attention
from bernini.cases import parse_case
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.driver import Session
from bernini.engine import Engine
from bernini.plan import plan_case
from bernini.server import Access, JobRenderer, JobService, JobStore, Limits, Redactor, ServerFolders, Worker, create_app

PROMPT = "a boat on a river at dawn"
IDENTITY = {"config": "random full-size weights"}


def cli_seconds(session: Session, settings: GenerationSettings, out_dir: Path, n: int) -> float:
    """One case the way the CLI renders it after loading: plan, then the driver's Session.run_case (timed)."""
    case = parse_case({"task_type": "t2v", "prompt": PROMPT}, source="<bench>", name=f"cli_{n}", base=None)
    case = replace(case, output=out_dir / f"cli_{n}.mp4", explicit_output=True)
    plan = plan_case(case, settings)
    torch.cuda.synchronize()
    start = time.perf_counter()
    record = session.run_case(case, plan, settings=settings)
    torch.cuda.synchronize()
    if record.status != "ok":
        raise RuntimeError(f"the CLI render failed: {record.error}")
    return time.perf_counter() - start


def server_seconds(client: object, store: JobStore) -> tuple[float, float]:
    """(client wall from create() to the completed poll, the server's own job seconds)."""
    start = time.perf_counter()
    video = client.videos.create(prompt=PROMPT)  # type: ignore[attr-defined]
    deadline = start + 3600
    while time.perf_counter() < deadline:
        video = client.videos.retrieve(video.id)  # type: ignore[attr-defined]
        if video.status in ("completed", "failed"):
            break
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if video.status != "completed":
        raise RuntimeError(f"the server job ended {video.status}: {video.error}")
    row = store.get(video.id)
    return wall, float(row.seconds or 0.0) if row else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", type=Path, default=Path(".tiny/Bernini-R-Diffusers"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--repeats", type=int, default=2, help="timed renders per side (after one warm-up)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the SDK marks client.videos deprecated
    import openai
    import uvicorn

    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", attention=args.attention, compile=args.compile)
    attention.select_backend(args.attention, "cuda")
    renderer = build_renderer(args.tiny, runtime)
    settings = GenerationSettings(num_inference_steps=args.steps, height=args.height, width=args.width, num_frames=args.frames)
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        root = Path(tmp)
        session = Session(Engine(renderer, renderer.sources, settings=settings, identity=IDENTITY, runtime=runtime))
        folders = ServerFolders.create(root / "server")
        store = JobStore(folders.database)
        jobs = JobRenderer(session)
        redact = Redactor(folders)
        worker = Worker(store, folders, jobs, redact)
        service = JobService(store, folders, settings, Limits(), "bernini-r", redact, worker)
        server = uvicorn.Server(uvicorn.Config(create_app(service, Access(), renderer.device), host="127.0.0.1", port=0, log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        worker.start()
        print(f"device: {device_name()}  attention: {attention.current_backend()}  compile: {args.compile}  "
              f"case: t2v_apg {args.width}x{args.height}, {args.frames} frames, {args.steps} steps")
        print(f"warm-up (CLI path): {cli_seconds(session, settings, root, 0):.2f} s")
        cli, served, inside = [], [], []
        for n in range(1, args.repeats + 1):
            cli.append(cli_seconds(session, settings, root, n))
            wall, own = server_seconds(client, store)
            served.append(wall)
            inside.append(own)
            print(f"run {n}: CLI {cli[-1]:.2f} s, server {wall:.2f} s (job {own:.2f} s inside the worker)")
        worker.stop()
        server.should_exit = True
        thread.join(30)
    ratio = statistics.mean(served) / statistics.mean(cli)
    print(f"seconds per job: CLI {statistics.mean(cli):.2f}, server {statistics.mean(served):.2f} -> ratio {ratio:.4f} "
          f"({'within' if ratio <= 1.02 else 'NOT within'} 2%)")
    write_json(args.json, {"device": device_name(), "steps": args.steps, "frames": args.frames, "height": args.height, "width": args.width,
                           "compile": args.compile, "cli_s": cli, "server_s": served, "server_job_s": inside, "ratio": ratio})


if __name__ == "__main__":
    main()
