"""The Gradio page: one form for every task, its Generate and Stop buttons wired to the DemoService."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr

from bernini.demo.service import KNOBS, Cancelled, DemoRequest, DemoService, RenderError
from bernini.guidance import GUIDANCE_MODES
from bernini.presets import PRESETS, Preset
from bernini.sampling import StepEvent
from bernini.tasks import Task, get_task

log = logging.getLogger(__package__)  # "bernini.demo" for every module of the demo, as log lines always named it

DEMO_TASKS = ("t2i", "t2v", "i2i", "v2v", "mv2v", "rv2v", "ads2v", "r2v")


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
        loras=tuple((str(name), float(values.get("lora_scale") or 1.0), str(values.get("lora_expert") or "lora")) for name in values.get("loras") or ()),
    )


# The page's knobs a preset sets (argparse dests of bernini/presets.py), and how each one's value goes in.
PRESET_KNOBS = ("guidance_mode", "num_inference_steps", "flow_shift", "omega_vid", "omega_img", "omega_txt", "omega_vid_low", "omega_img_low", "omega_txt_low", "use_unipc")


def preset_updates(name: str) -> list[Any]:
    """gr.update per PRESET_KNOBS, then the note; 'none' changes no knob."""
    preset: Preset | None = PRESETS.get(name)
    if preset is None:
        return [gr.update() for _ in PRESET_KNOBS] + [gr.update(value="")]
    values = {**preset.values, "use_unipc": preset.values.get("solver", "unipc") == "unipc"}
    loras = ", ".join((*preset.lora_high, *preset.lora_low))
    note = f"{preset.summary}. Source: {preset.source}. Tasks: {', '.join(preset.tasks)}." + (f" Its LoRAs ({loras}) are merged at launch: start the demo with --preset {preset.name}." if loras else "")
    return [gr.update(value=values[k]) if k in values else gr.update() for k in PRESET_KNOBS] + [gr.update(value=note)]


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

    def __init__(self, service: DemoService, use_pe: bool, task: str = DEMO_TASKS[0]) -> None:
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
            with gr.Row():
                for term, what in (("vid", "video"), ("img", "image"), ("txt", "text")):
                    f[f"omega_{term}_low"] = gr.Number(value=getattr(s, f"omega_{term}_low"), label=f"ω {what}, low-noise expert (empty: ω x scale)", elem_id=f"omega-{term}-low")
        with gr.Accordion("Few steps and LoRAs", open=False):
            f["preset"] = gr.Dropdown([("none", "none"), *[(f"{p.name}: {p.summary}", p.name) for p in PRESETS.values()]], value=s.preset or "none", label="Preset (published recipes; sets the knobs)", elem_id="preset")
            self.preset_note = gr.Markdown("", elem_id="preset-note")
            f["use_unipc"] = gr.Dropdown([("UniPC", True), ("Euler (the official fallback)", False)], value=s.use_unipc, label="Solver", elem_id="solver")
            self._lora_picker()

    def _lora_picker(self) -> None:
        """Files of --lora_dir; picking other LoRAs loads the experts again before the render (they are merged at load)."""
        f, service = self.fields, self.service
        merged = ", ".join(f"{r.source} x {r.scale:g} ({r.expert})" for r in service.loaded_loras()) or "none"
        gr.Markdown(f"Merged now: {merged}", elem_id="loras-merged")
        if service.lora_dir is None:
            return
        f["loras"] = gr.CheckboxGroup(service.lora_files(), value=[], label=f"LoRAs from {service.lora_dir}", elem_id="loras")
        f["lora_scale"] = _slider("LoRA strength", 1.0, (-2, 2, 0.05), "lora-scale")
        f["lora_expert"] = gr.Radio([("both experts", "lora"), ("high-noise", "lora_high"), ("low-noise", "lora_low")], value="lora", label="Merged into", elem_id="lora-expert")

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
        f["preset"].change(preset_updates, inputs=f["preset"], outputs=[f[k] for k in PRESET_KNOBS] + [self.preset_note], queue=False, api_visibility="private")
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
