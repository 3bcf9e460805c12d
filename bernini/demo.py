"""The Gradio demo: every task in the browser, one model load, one GPU or a torchrun group, safe by default."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gradio as gr
import torch
import torch.distributed as dist

from bernini.cases import Case, CaseError, parse_case
from bernini.cli import configure_logging, runtime_from, settings_from
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.guidance import GUIDANCE_MODES
from bernini.main import make_enhancer, model_identity
from bernini.parallel.groups import Groups, LaunchEnv, Topology, build_topology, destroy_distributed, init_distributed
from bernini.parallel.runner import build_parser as multi_gpu_parser
from bernini.parallel.runner import device_for, expert_heads, install
from bernini.parallel.status import CheckedRender, GroupStatus, describe
from bernini.plan import CasePlan, plan_case
from bernini.runner import BatchOptions, BatchRunner, CaseRecord, sidecar_path
from bernini.sampling import StepEvent
from bernini.tasks import Task, get_task

if TYPE_CHECKING:
    from bernini.pipeline import Renderer

log = logging.getLogger(__name__)

__all__ = [
    "Access", "Cancelled", "DemoRequest", "DemoResult", "DemoService", "DistPeers", "JobRunner", "LocalPeers", "Page", "RenderError",
    "access_from", "build_app", "build_parser", "launch_options", "main", "parse_args", "request_from_page", "start",
]

DEMO_TASKS = ("t2i", "t2v", "i2i", "v2v", "mv2v", "rv2v", "ads2v", "r2v")
LOCALHOST = "127.0.0.1"
PUBLIC_HOST = "0.0.0.0"
DEFAULT_SAVE_DIR = "outputs/gradio"
REQUEST_SOURCE = "request"  # how validation messages name a browser request (the CLI says the case file)
# Flags of the batch CLI with no meaning here: the browser supplies the case.
BATCH_ONLY = (
    "case", "inputs", "prompt", "task_type", "video", "image", "images", "output", "output_dir", "guidance_mode",
    "pe_only", "dry_run", "fail_fast", "skip_existing", "summary",
)
INT_KNOBS = ("seed", "num_inference_steps", "num_frames", "max_image_size", "height", "width")
FLOAT_KNOBS = ("fps", "flow_shift", "omega_vid", "omega_img", "omega_txt", "omega_scale")
KNOBS = INT_KNOBS + FLOAT_KNOBS

Enhance = Callable[[Case], tuple[str, dict[str, Any]]]


class Cancelled(CaseError):
    """The user stopped the request; a CaseError so that BatchRunner reports it in one line, no traceback."""


class RenderError(RuntimeError):
    """A valid request whose render failed (out of memory, non-finite latent, a peer rank failed...)."""


# ---------------------------------------------------------------- flags and access


def build_parser(prog: str = "gradio_demo.py") -> argparse.ArgumentParser:
    """The CLI's model, generation, prompt-enhancer, runtime and multi-GPU flags, plus the demo's own."""
    parser = multi_gpu_parser(prog)
    parser.description = "Serve Bernini-R in the browser (README.md, 'Gradio demo'). Binds 127.0.0.1 unless told otherwise."
    _hide(parser, BATCH_ONLY)
    d = parser.add_argument_group("demo")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--listen", action="store_true", help=f"serve on {PUBLIC_HOST} (every interface), not {LOCALHOST}; needs --auth or --auth_file")
    d.add_argument("--share", action="store_true", help="also open a public gradio.live link; needs --auth or --auth_file")
    d.add_argument("--auth", metavar="USER:PASS", help="login for the page (required with --listen or --share)")
    d.add_argument("--auth_file", type=Path, help="file of USER:PASS lines ('#' comments); keeps passwords out of the process list")
    d.add_argument("--save_dir", type=Path, default=Path(DEFAULT_SAVE_DIR), help="results and their JSON sidecars; the only folder the server serves files from")
    d.add_argument("--queue_size", type=int, default=20, help="requests that may wait; more are refused until the queue drains")
    d.add_argument("--max_file_size", default="500mb", help="upload size cap, gradio syntax (500mb, 2gb)")
    return parser


def _hide(parser: argparse.ArgumentParser, dests: Sequence[str]) -> None:
    for action in parser._actions:  # argparse has no public lookup by dest
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def parse_args(argv: Sequence[str] | None = None, prog: str = "gradio_demo.py") -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for dest in BATCH_ONLY:
        if getattr(args, dest) != parser.get_default(dest):
            parser.error(f"--{dest} is a batch flag of infer_single_gpu.py; in the demo the browser gives the task, prompt and media")
    return args


@dataclass(frozen=True)
class Access:
    """Who can reach the server: the bound address, the share link, and the logins."""

    host: str = LOCALHOST
    port: int = 7860
    share: bool = False
    auth: tuple[tuple[str, str], ...] = ()


def parse_login(text: str, where: str) -> tuple[str, str]:
    """'user:pass' -> (user, pass); the message never repeats the password."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where}: a login is USER:PASS with both parts non-empty")
    return user, password


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"--auth_file {path} cannot be read ({exc.strerror or exc})") from None
    logins = [parse_login(line, f"--auth_file {path}:{n}") for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not logins:
        raise ValueError(f"--auth_file {path} holds no USER:PASS line")
    return logins


def access_from(args: argparse.Namespace) -> Access:
    """Refuse to expose the demo beyond this machine without a login; ValueError says what to add."""
    logins = ([parse_login(args.auth, "--auth")] if args.auth else []) + (read_auth_file(args.auth_file) if args.auth_file else [])
    exposed = [flag for flag, on in (("--listen", args.listen), ("--share", args.share)) if on]
    if exposed and not logins:
        flags = " and ".join(exposed)
        raise ValueError(
            f"{flags} would let anyone who reaches this machine (or the link) use the GPU without a login: "
            f"add --auth USER:PASS or --auth_file FILE, or drop {flags} to serve on {LOCALHOST} only"
        )
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    return Access(PUBLIC_HOST if args.listen else LOCALHOST, args.port, args.share, tuple(logins))


def launch_options(access: Access, save_dir: Path, max_file_size: str) -> dict[str, Any]:
    """Keyword arguments of gr.Blocks.launch: nothing public, served or phoning home unless asked."""
    return {
        "server_name": access.host,
        "server_port": access.port,
        "share": access.share,
        "auth": list(access.auth) or None,
        "allowed_paths": [str(save_dir.resolve())],  # besides gradio's own uploads, the only files served
        "max_file_size": max_file_size,
        "show_error": False,  # unexpected exceptions stay in the log; expected ones are gr.Error messages
        "quiet": True,  # the library logs the address itself
        "ssr_mode": False,
        "mcp_server": False,
        "enable_monitoring": False,
        "run_history": False,  # its page can push results to a remote bucket
    }


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class DemoRequest:
    """One browser request: the case keys plus the generation knobs the page sets."""

    task_type: str
    prompt: str
    guidance_mode: str | None = None  # None: the task's default
    videos: tuple[str, ...] = ()
    image: str | None = None
    images: tuple[str, ...] = ()
    use_pe: bool = False
    knobs: Mapping[str, Any] = field(default_factory=dict)  # GenerationSettings fields (KNOBS)

    def case_data(self) -> dict[str, Any]:
        """The request as a case-file object, so parse_case checks it exactly like the CLI."""
        data: dict[str, Any] = {"task_type": self.task_type, "prompt": self.prompt}
        if self.guidance_mode:
            data["guidance_mode"] = self.guidance_mode
        if self.videos:
            data["video"] = list(self.videos)
        if self.image:
            data["image"] = self.image
        if self.images:
            data["images"] = list(self.images)
        return data


def settings_with(base: GenerationSettings, knobs: Mapping[str, Any]) -> GenerationSettings:
    """The launch settings with the page's knobs; ValueError names a bad one."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown generation setting {unknown[0]!r}; the page sets: {', '.join(KNOBS)}")
    values: dict[str, Any] = {}
    for name, value in knobs.items():
        if value is None:
            continue
        try:
            values[name] = int(value) if name in INT_KNOBS else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"invalid generation setting: {name} must be a number, got {value!r}") from None
    return replace(base, **values)


@dataclass(frozen=True)
class Job:
    """A validated request, as every rank renders it."""

    case: Case
    plan: CasePlan
    settings: GenerationSettings
    prompt: str
    pe_info: dict[str, Any] | None = None


@dataclass(frozen=True)
class DemoResult:
    output: Path
    sidecar: Path
    kind: str  # image | video
    prompt: str  # the prompt rendered (after the enhancer), without the task's system prompt
    status: str


# ---------------------------------------------------------------- ranks


class Peers(Protocol):
    """The other ranks of a torchrun launch: rank 0 sends each job, all agree on stopping."""

    def send(self, job: Job | None) -> None: ...

    def receive(self) -> Job | None: ...

    def agree(self, stop: bool) -> bool: ...


class LocalPeers:
    """One process: nobody to tell."""

    def send(self, job: Job | None) -> None:
        pass

    def receive(self) -> Job | None:
        return None

    def agree(self, stop: bool) -> bool:
        return stop


class DistPeers:
    """Ranks of one model group: jobs go out on the control group, the stop flag every step on the model group."""

    def __init__(self, groups: Groups):
        self.groups = groups

    def send(self, job: Job | None) -> None:
        dist.broadcast_object_list([job], src=0, group=self.groups.control)

    def receive(self) -> Job | None:
        box: list[Job | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.groups.control)
        return box[0]

    def agree(self, stop: bool) -> bool:
        # Every rank leaves the case at the same step, or the others would wait in a collective.
        flag = [stop]
        dist.broadcast_object_list(flag, src=0, group=self.groups.model)
        return bool(flag[0])


def _ignore(event: StepEvent) -> None:
    pass


class StepProgress:
    """runner.Progress for one request: reports each step and raises Cancelled between steps."""

    def __init__(self, stop: Callable[[], bool], report: Callable[[StepEvent], None] | None = None):
        self.stop = stop
        self.report = report or _ignore

    def case_started(self, index: int, total: int, case: Case, plan: CasePlan) -> None:
        pass

    def step(self, index: int, total: int, case: Case, event: StepEvent) -> None:
        if self.stop():
            raise Cancelled(f"cancelled after step {event.index + 1}/{event.total}; nothing was saved")
        self.report(event)

    def case_finished(self, index: int, total: int, record: CaseRecord) -> None:
        pass

    def close(self) -> None:
        pass


class JobRunner:
    """Renders jobs through BatchRunner, so outputs are written atomically with the CLI's sidecar."""

    def __init__(
        self,
        render: Callable[..., Any],
        identity: dict[str, Any],
        options: BatchOptions,
        peers: Peers | None = None,
        load_seconds: float | None = None,
        device: torch.device | None = None,
    ):
        self.render = render
        self.identity = identity
        self.options = options
        self.peers = peers or LocalPeers()
        self.load_seconds = load_seconds
        self.device = device

    def _on_device(self) -> AbstractContextManager[Any]:
        # Gradio renders in a worker thread, whose current CUDA device is 0 whatever the renderer's is.
        return torch.cuda.device(self.device) if self.device is not None and self.device.type == "cuda" else nullcontext()

    def run(self, job: Job, progress: StepProgress) -> CaseRecord:
        """Rank 0: share the job with the other ranks, then render it with them."""
        self.peers.send(job)
        return self.run_here(job, progress)

    def run_here(self, job: Job, progress: StepProgress) -> CaseRecord:
        # The prompt was enhanced once on rank 0; every rank replays it.
        enhance = None if job.pe_info is None else (lambda _case: (job.prompt, job.pe_info))
        runner = BatchRunner(self.render, job.settings, self.options, self.identity, enhance, progress, self.load_seconds)
        with self._on_device():
            return runner.run_case(1, 1, job.case, job.plan)

    def serve_peer(self) -> None:
        """Ranks > 0: render what rank 0 sends until it sends None."""
        while (job := self.peers.receive()) is not None:
            self.run_here(job, StepProgress(lambda: self.peers.agree(False)))


class DemoService:
    """Validates requests like the CLI and renders them one at a time; what the page and tests call."""

    def __init__(self, runner: JobRunner, settings: GenerationSettings, save_dir: Path, enhance: Enhance | None = None):
        self.runner = runner
        self.settings = settings
        self.save_dir = save_dir.resolve()
        self.enhance = enhance
        # One render at a time even when gradio abandons a cancelled call's thread (it cannot kill it).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._session: str | None = None

    def prepare(self, request: DemoRequest) -> Job:
        """Check the request exactly as the CLI checks a case file; CaseError/ValueError say what is wrong."""
        if request.use_pe and self.enhance is None:
            raise ValueError("the prompt enhancer is off: start the demo with --use_pe to use it")
        settings = settings_with(self.settings, request.knobs)
        case = parse_case(request.case_data(), source=REQUEST_SOURCE, name="request", base=None)
        name = f"{case.task_type}_{datetime.now():%Y%m%d_%H%M%S_%f}"
        case = replace(case, name=name, output=self._free_output(name, case.task), explicit_output=True)
        plan = plan_case(case, settings)
        prompt, pe_info = self._enhanced(case) if request.use_pe else (case.prompt, None)
        return Job(case, plan, settings, prompt, pe_info)

    def _enhanced(self, case: Case) -> tuple[str, dict[str, Any] | None]:
        assert self.enhance is not None
        try:
            return self.enhance(case)
        except Exception as exc:  # an outside service (--pe_on_error fail): any failure ends this request only
            raise RenderError(f"prompt enhancement failed: {type(exc).__name__}: {exc}") from exc

    def _free_output(self, name: str, task: Task) -> Path:
        suffix = ".png" if task.single_frame else ".mp4"
        path, n = self.save_dir / f"{name}{suffix}", 2
        while path.exists():
            path, n = self.save_dir / f"{name}_{n}{suffix}", n + 1
        return path

    def generate(self, request: DemoRequest, report: Callable[[StepEvent], None] | None = None, session: str | None = None) -> DemoResult:
        """Validate, render and save; raises ValueError (bad request), Cancelled or RenderError."""
        job = self.prepare(request)
        with self._lock:
            self._session = session
            self._stop.clear()
            try:
                record = self.runner.run(job, StepProgress(lambda: self.runner.peers.agree(self._stop.is_set()), report))
                stopped = self._stop.is_set()
            finally:
                self._session = None
        return self._result(job, record, stopped)

    def cancel(self, session: str | None = None) -> bool:
        """Stop the running request at its next step if it belongs to `session`; True if one was asked to stop."""
        if not self._lock.locked() or self._session != session:
            return False
        self._stop.set()
        return True

    def _result(self, job: Job, record: CaseRecord, stopped: bool) -> DemoResult:
        if record.status != "ok":
            if stopped:
                raise Cancelled(record.error or "cancelled")
            raise RenderError(f"the render failed: {record.error}")
        plan, output = job.plan, Path(job.plan.output)
        seconds = record.timings.get("total", 0.0)
        status = f"saved {output.name} ({plan.width}x{plan.height}, {plan.frames} frame(s), {plan.guidance_mode}, {plan.steps} steps, {seconds:.1f} s)"
        kind = "image" if output.suffix == ".png" else "video"
        return DemoResult(output, sidecar_path(output), kind, job.prompt, status)


# ---------------------------------------------------------------- the page


def request_from_page(values: Mapping[str, Any]) -> DemoRequest:
    """Page values -> request; media go to the slots the task takes, and hidden slots are dropped."""
    task = get_task(str(values.get("task_type")))
    videos = (values.get("source_video"), values.get("reference_video"))[: task.videos[1]]
    images = (values.get("images") or []) if task.images[1] else []
    return DemoRequest(
        task_type=task.name,
        prompt=str(values.get("prompt") or ""),
        guidance_mode=values.get("guidance_mode") or None,
        videos=tuple(str(v) for v in videos if v),
        image=str(values["image"]) if task.image and values.get("image") else None,
        images=tuple(str(p) for p in images),
        use_pe=bool(values.get("use_pe")),
        knobs={k: values[k] for k in KNOBS if k in values},
    )


@dataclass(frozen=True)
class Visibility:
    """Which inputs a task shows."""

    source_video: bool
    reference_video: bool
    image: bool
    images: bool
    num_frames: bool
    fps: bool
    size: bool  # height/width: tasks whose size does not come from a source
    max_image_size: bool

    @classmethod
    def of(cls, task: Task) -> Visibility:
        takes_media = bool(task.videos[1] or task.image or task.images[1])
        return cls(
            source_video=task.videos[1] >= 1,
            reference_video=task.videos[1] >= 2,
            image=task.image,
            images=task.images[1] > 0,
            num_frames=not task.single_frame,
            fps=not task.single_frame,
            size=not task.videos[1] and not task.image,
            max_image_size=takes_media,
        )


def images_label(task: Task) -> str:
    return f"Reference images ({task.images[0]} or more)" if task.images[0] else "Extra reference images (optional)"


def _slider(label: str, default: float, span: tuple[float, float, float], elem_id: str, visible: bool = True) -> gr.Slider:
    lo, hi, step = span
    # Widen the range to the launch value, so tiny test settings (or huge ones) stay selectable.
    return gr.Slider(minimum=min(lo, default), maximum=max(hi, default), step=step, value=default, label=label, visible=visible, elem_id=elem_id)


class Page:
    """The components of the page and their events."""

    def __init__(self, service: DemoService, use_pe: bool, task: str = DEMO_TASKS[0]):
        self.service = service
        self.use_pe = use_pe
        self.task = task
        self.fields: dict[str, Any] = {}

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Bernini-R", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as app:
            gr.Markdown("## Bernini-R\nPick a task, give the prompt and the media it needs, then Generate. Results are also saved on the server.")
            with gr.Row():
                with gr.Column():
                    self._request_inputs()
                    self._knobs()
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column():
                    outputs = self._outputs()
            self._wire(generate, stop, outputs)
        return app

    def _request_inputs(self) -> None:
        task, vis = get_task(self.task), Visibility.of(get_task(self.task))
        f = self.fields
        f["task_type"] = gr.Dropdown([(f"{t}: {get_task(t).description}", t) for t in DEMO_TASKS], value=task.name, label="Task", elem_id="task")
        f["guidance_mode"] = gr.Dropdown(list(GUIDANCE_MODES), value=task.default_mode, label="Guidance mode (set by the task, editable)", elem_id="guidance-mode")
        f["prompt"] = gr.Textbox(label="Prompt", lines=4, elem_id="prompt")
        f["use_pe"] = gr.Checkbox(value=self.use_pe, interactive=self.use_pe, label="Enhance the prompt (needs --use_pe)", elem_id="use-pe")
        f["source_video"] = gr.Video(label="Source video", sources=["upload"], include_audio=True, visible=vis.source_video, elem_id="source-video")
        f["reference_video"] = gr.Video(label="Reference video (inserted)", sources=["upload"], include_audio=True, visible=vis.reference_video, elem_id="reference-video")
        f["image"] = gr.Image(label="Source image", type="filepath", image_mode=None, sources=["upload"], visible=vis.image, elem_id="source-image")
        f["images"] = gr.File(label=images_label(task), file_count="multiple", file_types=["image"], visible=vis.images, elem_id="reference-images")

    def _knobs(self) -> None:
        s, f, vis = self.service.settings, self.fields, Visibility.of(get_task(self.task))
        with gr.Row():
            f["seed"] = gr.Number(value=s.seed, precision=0, label="Seed", elem_id="seed")
            f["num_inference_steps"] = _slider("Steps", s.num_inference_steps, (1, 100, 1), "steps")
        f["num_frames"] = _slider("Frames (4k+1; video sources: at most)", s.num_frames, (1, 361, 4), "num-frames", vis.num_frames)
        f["max_image_size"] = _slider("Max image size (sources)", s.max_image_size, (256, 1280, 16), "max-image-size", vis.max_image_size)
        f["fps"] = _slider("FPS (input sampling and output)", s.fps, (1, 60, 1), "fps", vis.fps)
        with gr.Row():
            f["height"] = gr.Number(value=s.height, precision=0, label="Height (no-source tasks)", visible=vis.size, elem_id="height")
            f["width"] = gr.Number(value=s.width, precision=0, label="Width (no-source tasks)", visible=vis.size, elem_id="width")
        with gr.Accordion("Guidance", open=False):
            f["flow_shift"] = _slider("Flow shift", s.flow_shift, (0.5, 12, 0.5), "flow-shift")
            f["omega_vid"] = _slider("ω video", s.omega_vid, (0, 10, 0.05), "omega-vid")
            f["omega_img"] = _slider("ω image", s.omega_img, (0, 10, 0.05), "omega-img")
            f["omega_txt"] = _slider("ω text", s.omega_txt, (0, 10, 0.05), "omega-txt")
            f["omega_scale"] = _slider("ω scale after the expert switch", s.omega_scale, (0, 2, 0.05), "omega-scale")

    @staticmethod
    def _outputs() -> list[Any]:
        return [
            gr.Video(label="Result", interactive=False, visible=False, elem_id="result-video"),
            gr.Image(label="Result", type="filepath", interactive=False, visible=False, elem_id="result-image"),
            gr.Textbox(label="Prompt actually used", interactive=False, elem_id="prompt-used"),
            gr.Textbox(label="Status", interactive=False, elem_id="status"),
        ]

    def _wire(self, generate: gr.Button, stop: gr.Button, outputs: list[Any]) -> None:
        f = self.fields
        shown = ["guidance_mode", "source_video", "reference_video", "image", "images", "num_frames", "fps", "height", "width", "max_image_size"]
        f["task_type"].change(self.on_task, inputs=f["task_type"], outputs=[f[k] for k in shown], queue=False, api_visibility="private")
        run = generate.click(self.on_generate, inputs_kwargs=dict(f), outputs=outputs, api_name="generate", concurrency_limit=1)
        # Not queued: it must get through while the one queue slot is busy rendering.
        stop.click(self.on_stop, outputs=outputs[3], cancels=[run], queue=False, api_name="stop")

    @staticmethod
    def on_task(task_type: str) -> list[Any]:
        task = get_task(task_type)
        vis = Visibility.of(task)
        return [
            gr.update(value=task.default_mode),
            gr.update(visible=vis.source_video),
            gr.update(visible=vis.reference_video),
            gr.update(visible=vis.image),
            gr.update(visible=vis.images, label=images_label(task)),
            gr.update(visible=vis.num_frames),
            gr.update(visible=vis.fps),
            gr.update(visible=vis.size),
            gr.update(visible=vis.size),
            gr.update(visible=vis.max_image_size),
        ]

    # A gr.Progress() default is how gradio finds the parameter to feed; values come by name (inputs_kwargs).
    def on_generate(self, request: gr.Request | None, progress: gr.Progress = gr.Progress(), **values: Any) -> list[Any]:  # noqa: B008
        """The Generate button: result, prompt used and status; a bad request becomes a gr.Error message."""

        def report(event: StepEvent) -> None:
            progress((event.index + 1, event.total), desc=f"denoising ({event.expert} expert)", unit="steps")

        session = request.session_hash if request is not None else None
        try:
            result = self.service.generate(request_from_page(values), report, session)
        except Cancelled as exc:
            return [gr.update(), gr.update(), gr.update(), str(exc)]
        except (ValueError, RenderError) as exc:  # CaseError/MediaError included: the CLI's messages
            log.warning("request refused: %s", exc)
            raise gr.Error(str(exc), duration=None, print_exception=False) from None
        is_video = result.kind == "video"
        return [
            gr.update(value=str(result.output) if is_video else None, visible=is_video),
            gr.update(value=None if is_video else str(result.output), visible=not is_video),
            result.prompt,
            result.status,
        ]

    def on_stop(self, request: gr.Request | None) -> str:
        asked = self.service.cancel(request.session_hash if request is not None else None)
        return "stopping after the current step" if asked else "nothing of yours is running"


def build_app(service: DemoService, use_pe: bool = False, task: str = DEMO_TASKS[0]) -> gr.Blocks:
    return Page(service, use_pe, task).build()


def start(app: gr.Blocks, access: Access, save_dir: Path, max_file_size: str = "500mb", queue_size: int = 20) -> str:
    """Queue (bounded, one render at a time) and serve without blocking; the local URL."""
    if queue_size < 1:
        raise ValueError(f"--queue_size {queue_size} is invalid: at least 1 request must be able to wait")
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    _, local_url, share_url = app.launch(prevent_thread_lock=True, **launch_options(access, save_dir, max_file_size))
    log.info("demo on %s%s; results in %s%s", local_url, f" and {share_url}" if share_url else "", save_dir, " (login required)" if access.auth else "")
    return local_url


# ---------------------------------------------------------------- entry


def base_settings(args: argparse.Namespace) -> GenerationSettings:
    """The launch flags as settings; the page's knobs start from these values."""
    return settings_from(args)


def serve_page(args: argparse.Namespace, access: Access, runner: JobRunner) -> int:
    """Rank 0 (or the only process): the page, until interrupted."""
    save_dir = args.save_dir.resolve()
    save_dir.mkdir(parents=True, exist_ok=True)
    enhance = make_enhancer(args) if args.use_pe else None
    service = DemoService(runner, base_settings(args), save_dir, enhance)
    app = build_app(service, args.use_pe)
    try:
        start(app, access, save_dir, args.max_file_size, args.queue_size)
        app.block_thread()
    finally:
        runner.peers.send(None)  # release the other ranks
    return 0


def serve_single(args: argparse.Namespace, access: Access, sources: Any, runtime: RuntimeConfig) -> int:
    from bernini.pipeline import Renderer

    renderer = Renderer.load(sources, runtime)
    options = BatchOptions(output_dir=args.save_dir.resolve(), runtime=runtime)
    runner = JobRunner(renderer.render, model_identity(sources), options, LocalPeers(), renderer.load_seconds, renderer.device)
    return serve_page(args, access, runner)


def group_topology(args: argparse.Namespace, env: LaunchEnv, sources: Any) -> Topology:
    topology = build_topology(env, args.ulysses, args.cfg_parallel, expert_heads(sources))
    if topology.dp != 1:
        raise ValueError(
            f"the demo renders each request with every rank: launch --nproc-per-node {topology.model_size} "
            f"(--ulysses x --cfg_parallel = {args.ulysses} x {args.cfg_parallel}), not WORLD_SIZE {env.world_size}"
        )
    return topology


def load_in_group(sources: Any, runtime: RuntimeConfig, topology: Topology, groups: Groups) -> Renderer | None:
    """Load this rank's renderer; None on every rank when any rank failed (all of them hear of it)."""
    from bernini.pipeline import Renderer

    renderer, error = None, None
    try:
        renderer = Renderer.load(sources, runtime)
        install(renderer, topology, groups)
    except Exception as exc:  # reported through the status exchange below, never left to a hang
        log.error("the models could not be loaded: %s", describe(exc), exc_info=not isinstance(exc, ValueError))
        error = describe(exc)
    failure = GroupStatus.first(GroupStatus(groups.model, topology.model_size).errors(error))
    if failure is not None:
        log.error("the demo cannot start: %s", failure)
        return None
    return renderer


def serve_group(args: argparse.Namespace, access: Access, sources: Any, runtime: RuntimeConfig, env: LaunchEnv) -> int:
    """torchrun: every rank loads its part; rank 0 serves the page and shares each request."""
    topology = group_topology(args, env, sources)
    device = device_for(args.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = init_distributed(topology, env, device, args.dist_timeout)
    try:
        runtime = dataclasses.replace(runtime, device=str(device))
        renderer = load_in_group(sources, runtime, topology, groups)
        if renderer is None:
            return 2
        render = CheckedRender(renderer, GroupStatus(groups.model, topology.model_size), writer=topology.is_leader)
        options = BatchOptions(output_dir=args.save_dir.resolve(), runtime=runtime, write_outputs=topology.is_leader)
        runner = JobRunner(render, model_identity(sources), options, DistPeers(groups), renderer.load_seconds, renderer.device)
        if topology.rank == 0:
            return serve_page(args, access, runner)
        runner.serve_peer()
        return 0
    finally:
        destroy_distributed()


def main(argv: Sequence[str] | None = None, prog: str = "gradio_demo.py") -> int:
    args = parse_args(argv, prog)
    try:
        env = LaunchEnv.from_environ()
    except ValueError as exc:
        configure_logging(args.log_format, args.verbose)
        log.error("%s", exc)
        return 2
    configure_logging(args.log_format, args.verbose, env.rank)
    from bernini.pipeline import resolve_sources

    try:  # identical on every rank: all stop here, before any collective or model load
        access = access_from(args)
        base_settings(args)
        runtime = runtime_from(args)
        sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        if env.world_size > 1 or args.ulysses > 1 or args.cfg_parallel > 1:
            return serve_group(args, access, sources, runtime, env)
        return serve_single(args, access, sources, runtime)
    except (ValueError, OSError) as exc:  # weights that do not load, a port in use
        log.error("%s", exc)
        return 2
