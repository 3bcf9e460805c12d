"""The command line: the official flags (and their old names) plus ours; argv -> configs and cases."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bernini.cases import BatchSpec, Case, CaseError, collect_cases
from bernini.config import DEFAULT_CONFIG_DIR, FAST_PRESET, FP8_ATTENTION_CHOICES, FP8_GEMM_CHOICES, GenerationSettings, RuntimeConfig
from bernini.guidance import GUIDANCE_MODES, PLANNER_ONLY_MODES
from bernini.plan import CasePlan
from bernini.presets import PRESETS, get_preset
from bernini.runner import BatchOptions, CaseRecord, LogProgress
from bernini.sampling import SOLVERS, StepEvent
from bernini.tasks import DEFAULT_NEG_PROMPT

if TYPE_CHECKING:
    from bernini.lora import LoraRef

log = logging.getLogger(__name__)
_D = GenerationSettings()


def build_parser(prog: str, multi_gpu: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Render Bernini-R cases (see README.md).")
    m = p.add_argument_group("model")
    m.add_argument("--config", default=DEFAULT_CONFIG_DIR, help="config folder, a Bernini-R-Diffusers folder, or a hub id")
    m.add_argument("--high_noise_ckpt", help="separate high-noise expert: folder, index.json or hub id")
    m.add_argument("--low_noise_ckpt", help="separate low-noise expert: folder, index.json or hub id")
    m.add_argument("--use_unipc", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--use_src_tgt_id", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--interpolate_src_id", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--max_trained_src_id", type=int, default=_D.max_trained_src_id)

    i = p.add_argument_group("inputs")
    i.add_argument("--case", nargs="+", help="case file(s), folder(s) of case files (recursive) or glob(s)")
    i.add_argument("--inputs", help="JSON list or .jsonl of case objects")
    i.add_argument("--prompt")
    i.add_argument("--task_type", help="default v2v (as upstream) when neither case nor flag sets it")
    i.add_argument("--video", nargs="+")
    i.add_argument("--image")
    i.add_argument("--images", nargs="+")
    i.add_argument("--output", help="output path for a single case (default outputs/<case name>.mp4|.png)")
    i.add_argument("--output_dir", default="outputs", help="folder for outputs of cases that name none")

    g = p.add_argument_group("generation")
    g.add_argument("--neg_prompt", default=DEFAULT_NEG_PROMPT)
    g.add_argument("--system_prompt", default="", help="override the task's system prompt")
    g.add_argument("--num_frames", type=int, default=_D.num_frames)
    g.add_argument("--max_image_size", type=int, default=_D.max_image_size)
    g.add_argument("--height", type=int, default=_D.height)
    g.add_argument("--width", type=int, default=_D.width)
    g.add_argument("--num_inference_steps", type=int, default=_D.num_inference_steps)
    g.add_argument("--guidance_mode", choices=[*GUIDANCE_MODES, *PLANNER_ONLY_MODES], help="default: the case file's, else the task's")
    g.add_argument("--omega_vid", "--omega_V", type=float, default=_D.omega_vid)
    g.add_argument("--omega_img", "--omega_I", type=float, default=_D.omega_img)
    g.add_argument("--omega_txt", "--omega_TI", type=float, default=_D.omega_txt)
    g.add_argument("--omega_scale", type=float, default=_D.omega_scale)
    g.add_argument("--flow_shift", type=float, default=_D.flow_shift)
    g.add_argument("--seed", type=int, default=_D.seed)
    g.add_argument("--fps", type=float, default=_D.fps)
    g.add_argument("--eta", type=float, default=_D.eta)
    g.add_argument("--norm_threshold", type=float, nargs="+", default=list(_D.norm_threshold))
    g.add_argument("--momentum", type=float, default=_D.momentum)
    f = p.add_argument_group("LoRAs and few-step schedules (bernini)")
    f.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="merge a LoRA into both experts (repeatable; a .safetensors file or a hub id repo[/file.safetensors])")
    f.add_argument("--lora_high", action="append", metavar="FILE[:SCALE]", help="merge a LoRA into the high-noise expert only (repeatable)")
    f.add_argument("--lora_low", action="append", metavar="FILE[:SCALE]", help="merge a LoRA into the low-noise expert only (repeatable)")
    f.add_argument("--solver", choices=SOLVERS, help="unipc (default) or euler (the official --no-use_unipc scheduler)")
    f.add_argument("--switch_step", type=int, help="run the high-noise expert for the first N steps (default: the boundary rule)")
    for term in ("vid", "img", "txt"):
        f.add_argument(f"--omega_{term}_low", type=float, help=f"the low-noise expert's ω {term} (default: --omega_{term} x --omega_scale)")
    f.add_argument("--skip_zero_passes", action=argparse.BooleanOptionalAction, default=True, help="do not run guidance passes whose weight is zero (lossless)")
    f.add_argument("--preset", action=PresetAction, choices=list(PRESETS), help="a published step-distillation recipe (README); explicit flags win")
    planner = p.add_argument_group("full-Bernini planner flags (accepted for script compatibility, unused by the renderer)")
    for flag, kind, default in (("--omega_tgt", float, 0.5), ("--planning_step", int, 25), ("--vit_txt_cfg", float, 1.2), ("--vit_img_cfg", float, 1.0), ("--vit_denoising_step", int, 5)):
        planner.add_argument(flag, type=kind, default=default, help=argparse.SUPPRESS)

    e = p.add_argument_group("prompt enhancer")
    e.add_argument("--use_pe", action="store_true", help="rewrite prompts through an OpenAI-compatible endpoint")
    e.add_argument("--pe_model")
    e.add_argument("--pe_on_error", choices=("raw", "fail"), default="raw", help="on enhancer failure: use the raw prompt, or fail the case")
    e.add_argument("--pe_only", action="store_true", help="write enhanced case files and stop (no model loads)")

    r = p.add_argument_group("runtime (bernini)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    r.add_argument("--attention", default="auto", choices=("auto", "fa3", "fa4", "fa2", "sdpa"))
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="regional torch.compile of the blocks (default: on for CUDA, off on the CPU)")
    r.add_argument("--batch_combos", action=argparse.BooleanOptionalAction, default=True, help="run equal-length guidance passes as one batch")
    r.add_argument("--offload", default="auto", choices=("auto", "none", "expert", "block"))
    r.add_argument("--t5_cpu", action="store_true", help="encode text on the CPU (default: UMT5 waits in pinned host memory and visits the GPU to encode)")
    r.add_argument("--weights", default="bf16", choices=("bf16", "fp8"), help="fp8: block Linear weights as float8_e4m3fn + per-channel scales (lossy, about half the memory)")
    r.add_argument("--max_gpu_memory", type=float, metavar="GiB", help="plan for (and cap the allocator at) this much GPU memory")
    r.add_argument("--vae_tiling", action=argparse.BooleanOptionalAction, default=None, help="tiled VAE encode/decode (default: when memory is short)")
    r.add_argument("--host_memory", type=float, metavar="GiB", help="plan for a machine with this much RAM (default: what is free now)")
    f = p.add_argument_group("fast mode (bernini; lossy, each option off unless named)")
    f.add_argument("--fast", action="store_true", help="the preset of the fast options that measured best: --fp8_gemm auto --fp8_attention auto (named flags override it)")
    f.add_argument("--fp8_gemm", nargs="?", const="auto", choices=FP8_GEMM_CHOICES, help="block Linear layers in FP8 (per-token activation and per-channel weight scales); alone: auto")
    f.add_argument("--fp8_attention", nargs="?", const="auto", choices=FP8_ATTENTION_CHOICES, help="8-bit self-attention (cuDNN FP8 SDPA or SageAttention); alone: auto")

    b = p.add_argument_group("batch (bernini)")
    b.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="validate and print the plan; load no model")
    b.add_argument("--fail-fast", "--fail_fast", dest="fail_fast", action="store_true")
    b.add_argument("--skip-existing", "--skip_existing", dest="skip_existing", action="store_true", help="resume: skip cases whose output is complete")
    b.add_argument("--summary", type=Path, help="where to write summary.json (default: the common folder of the outputs)")
    b.add_argument("--overwrite", action="store_true", help="replace existing files at output paths that bernini did not write (refused by default)")
    b.add_argument("--confine_outputs", "--confine-outputs", dest="confine_outputs", action="store_true", help="refuse any case output outside --output_dir (for case files from others)")
    b.add_argument("--log-format", "--log_format", dest="log_format", choices=("text", "json"), default="text")
    b.add_argument("--verbose", "-v", action="store_true")
    if multi_gpu:
        d = p.add_argument_group("multi-GPU")
        d.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel degree per case")
        d.add_argument("--cfg_parallel", type=int, default=1, help="run guidance passes on this many GPU groups at once")
    else:  # a batch across independent jobs (bernini/shard.py); torchrun spreads one launch instead
        b.add_argument("--shard", metavar="INDEX/COUNT", help="render share INDEX (from 0) of COUNT jobs; default: from SLURM array / "
                       "Kubernetes indexed-job variables; none: the whole batch (README: Batches across many jobs)")
    return p


class PresetAction(argparse.Action):
    """--preset NAME: the recipe's values for every flag still at its default, and its LoRAs; later flags win."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        preset = get_preset(str(values))
        setattr(namespace, self.dest, preset.name)
        hidden = {a.dest for a in parser._actions if a.help == argparse.SUPPRESS}  # e.g. the demo's page sets the mode
        for dest, value in preset.values.items():
            if dest not in hidden and getattr(namespace, dest) == parser.get_default(dest):
                setattr(namespace, dest, value)
        namespace.lora_high = [*(namespace.lora_high or []), *preset.lora_high]
        namespace.lora_low = [*(namespace.lora_low or []), *preset.lora_low]


# Flags of the batch CLI with no meaning for a long-lived server (the demo, the job server): each request gives its case.
BATCH_ONLY = (
    "case", "inputs", "prompt", "task_type", "video", "image", "images", "output", "output_dir", "guidance_mode",
    "pe_only", "dry_run", "fail_fast", "skip_existing", "summary",
)


def hide_flags(parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> None:
    """Keep flags parseable (to refuse them by name) but out of --help."""
    for action in parser._actions:  # argparse has no public lookup by dest
        if action.dest in dests:
            action.help = argparse.SUPPRESS


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    if args.guidance_mode in PLANNER_ONLY_MODES:
        raise ValueError(f"--guidance_mode {args.guidance_mode} belongs to the full Bernini planner; the renderer supports: {', '.join(GUIDANCE_MODES)}")
    if args.solver == "unipc" and not args.use_unipc:
        raise ValueError("--solver unipc contradicts --no-use_unipc; give one of them")
    return GenerationSettings(
        neg_prompt=args.neg_prompt,
        system_prompt=args.system_prompt,
        num_frames=args.num_frames,
        max_image_size=args.max_image_size,
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        guidance_mode=args.guidance_mode,
        omega_vid=args.omega_vid,
        omega_img=args.omega_img,
        omega_txt=args.omega_txt,
        omega_scale=args.omega_scale,
        flow_shift=args.flow_shift,
        seed=args.seed,
        fps=args.fps,
        eta=args.eta,
        norm_threshold=tuple(args.norm_threshold),
        momentum=args.momentum,
        use_unipc=args.use_unipc if args.solver is None else args.solver == "unipc",
        use_src_tgt_id=args.use_src_tgt_id,
        interpolate_src_id=args.interpolate_src_id,
        max_trained_src_id=args.max_trained_src_id,
        omega_vid_low=args.omega_vid_low,
        omega_img_low=args.omega_img_low,
        omega_txt_low=args.omega_txt_low,
        switch_step=args.switch_step,
        skip_zero_passes=args.skip_zero_passes,
        preset=args.preset,
    )


def loras_from(args: argparse.Namespace) -> tuple[LoraRef, ...]:
    """--lora/--lora_high/--lora_low -> LoraRefs (files located, hashed); ValueError before any model loads."""
    specs = [(flag, spec) for flag in ("lora", "lora_high", "lora_low") for spec in getattr(args, flag) or ()]
    if not specs:
        return ()
    from bernini import lora

    return lora.resolve(specs)


def runtime_from(args: argparse.Namespace) -> RuntimeConfig:
    preset = FAST_PRESET if args.fast else {}
    return RuntimeConfig(
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        compile=args.compile,
        batch_combos=args.batch_combos,
        offload=args.offload,
        t5_cpu=args.t5_cpu,
        weights=args.weights,
        max_gpu_memory=args.max_gpu_memory,
        vae_tiling=args.vae_tiling,
        fp8_gemm=args.fp8_gemm or preset.get("fp8_gemm", "off"),
        fp8_attention=args.fp8_attention or preset.get("fp8_attention", "off"),
        loras=loras_from(args),
        host_memory=args.host_memory,
    )


def batch_spec_from(args: argparse.Namespace) -> BatchSpec:
    cli_case: dict[str, Any] = {
        "prompt": args.prompt,
        "task_type": args.task_type,
        "video": args.video,
        "image": args.image,
        "images": args.images,
    }
    return BatchSpec(case=args.case or (), inputs=args.inputs, cli_case=cli_case, output=args.output, output_dir=args.output_dir,
                     overwrite=args.overwrite, confine_outputs=args.confine_outputs)


def options_from(args: argparse.Namespace, runtime: RuntimeConfig | None = None) -> BatchOptions:
    return BatchOptions(
        dry_run=args.dry_run,
        fail_fast=args.fail_fast,
        skip_existing=args.skip_existing,
        summary=args.summary,
        output_dir=Path(args.output_dir),
        runtime=runtime,
    )


_EVENT_FIELDS = ("event", "case", "index", "total", "step", "steps", "expert", "s_per_step", "eta_s", "status", "output", "seconds", "timings", "rank")


class JsonFormatter(logging.Formatter):
    """--log-format json: one JSON object per line, with the structured fields of progress events."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in _EVENT_FIELDS:
            if hasattr(record, key):
                event[key] = getattr(record, key)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (test runners and notebooks swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class TqdmLogHandler(StderrHandler):
    """Log lines printed above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class TqdmProgress:
    """Terminal bars: cases done of the batch, and the steps of the current case (expert, s/step, ETA)."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.case: Any = None
        self.failed = 0

    def case_started(self, index: int, total: int, case: Case, plan: CasePlan) -> None:
        from tqdm import tqdm

        if self.batch is None:
            self.batch = tqdm(total=total, desc="batch", unit="case", position=0, file=sys.stderr, dynamic_ncols=True)
        # Steps take seconds: show every one (tqdm would otherwise skip updates within 0.1 s).
        self.case = tqdm(total=plan.steps, desc=case.name[-24:], unit="step", position=1, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0, miniters=1)

    def step(self, index: int, total: int, case: Case, event: StepEvent) -> None:
        self.case.set_postfix_str(f"{event.expert} expert", refresh=False)
        self.case.update(1)

    def case_finished(self, index: int, total: int, record: CaseRecord) -> None:
        if self.case is not None:
            self.case.close()
        self.failed += record.status != "ok"
        self.batch.set_postfix_str(f"last: {record.name} {record.status}, failed {self.failed}", refresh=False)
        self.batch.update(1)

    def close(self) -> None:
        for bar in (self.case, self.batch):
            if bar is not None:
                bar.close()


def wants_progress_bars(log_format: str) -> bool:
    """Bars only for a person at a terminal; pipes, files and JSON logs get one line per event."""
    return log_format == "text" and sys.stderr.isatty()


def progress_for(log_format: str) -> TqdmProgress | LogProgress:
    return TqdmProgress() if wants_progress_bars(log_format) else LogProgress()


def quiet_library_progress() -> None:
    """Library bars (transformers' 'Loading weights') would break JSON lines and our own bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        module = sys.modules.get(name)
        disable = getattr(module, "disable_progress_bar", None)
        if callable(disable):
            disable()


def configure_logging(log_format: str, verbose: bool, rank: int = 0, progress_bars: bool = False) -> None:
    handler: logging.Handler = TqdmLogHandler() if progress_bars else StderrHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn output goes through the formatter too
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "PIL", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_library_progress()


def collect(args: argparse.Namespace) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases of the run and the errors of the invalid ones; CaseError if the inputs can't be read at all."""
    return collect_cases(batch_spec_from(args))


__all__ = ["build_parser", "settings_from", "runtime_from", "options_from", "collect", "configure_logging", "progress_for", "CaseError"]
