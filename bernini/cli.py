"""The command line: the official flags (and their old names) plus ours; argv -> configs and cases."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from bernini.cases import BatchSpec, Case, CaseError, collect_cases
from bernini.config import DEFAULT_CONFIG_DIR, FAST_PRESET, SOLVERS, Flag, GenerationSettings, RuntimeConfig, flags_of, value_type
from bernini.guidance import GUIDANCE_MODES, PLANNER_ONLY_MODES
from bernini.plan import CasePlan
from bernini.presets import PRESETS, get_preset
from bernini.runner import BatchOptions, CaseRecord, LogProgress
from bernini.sampling import StepEvent

if TYPE_CHECKING:
    from bernini.lora import LoraRef

log = logging.getLogger(__name__)
SETTINGS_CLASSES = (GenerationSettings, RuntimeConfig)  # their flagged fields are flags (config.flag)


def build_parser(prog: str, multi_gpu: bool = False) -> argparse.ArgumentParser:
    """The flags in --help order; those of GenerationSettings and RuntimeConfig come from their fields (add_fields)."""
    p = argparse.ArgumentParser(prog=prog, description="Render Bernini-R cases (see README.md).", formatter_class=DefaultsFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--config", default=DEFAULT_CONFIG_DIR, help="config folder, a Bernini-R-Diffusers folder, or a hub id")
    m.add_argument("--high_noise_ckpt", help="separate high-noise expert: folder, index.json or hub id")
    m.add_argument("--low_noise_ckpt", help="separate low-noise expert: folder, index.json or hub id")
    add_fields(m, "model")

    i = p.add_argument_group("inputs")
    i.add_argument("--case", nargs="+", help="case file(s), folder(s) of case files (recursive) or glob(s)")
    i.add_argument("--inputs", help="JSON list or .jsonl of case objects")
    i.add_argument("--prompt", help="the prompt of a case given by flags (or filling the case files')")
    i.add_argument("--task_type", help="the task (t2v, i2v, v2v, ...); v2v (as upstream) when neither case nor flag sets it")
    i.add_argument("--video", nargs="+", help="source video(s)")
    i.add_argument("--image", help="source image")
    i.add_argument("--images", nargs="+", help="reference images")
    i.add_argument("--output", help="output path for a single case (default outputs/<case name>.mp4|.png)")
    i.add_argument("--output_dir", default="outputs", help="folder for outputs of cases that name none")

    add_fields(p.add_argument_group("generation"), "generation")
    f = p.add_argument_group("LoRAs and few-step schedules (bernini)")
    f.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="merge a LoRA into both experts (repeatable; a .safetensors file or a hub id repo[/file.safetensors])")
    f.add_argument("--lora_high", action="append", metavar="FILE[:SCALE]", help="merge a LoRA into the high-noise expert only (repeatable)")
    f.add_argument("--lora_low", action="append", metavar="FILE[:SCALE]", help="merge a LoRA into the low-noise expert only (repeatable)")
    f.add_argument("--solver", choices=SOLVERS, help="unipc or euler (the official --no-use_unipc scheduler) (default: as --use_unipc says: unipc)")
    add_fields(f, "few-step")
    planner = p.add_argument_group("full-Bernini planner flags (accepted for script compatibility, unused by the renderer)")
    for flag, kind, default in (("--omega_tgt", float, 0.5), ("--planning_step", int, 25), ("--vit_txt_cfg", float, 1.2), ("--vit_img_cfg", float, 1.0), ("--vit_denoising_step", int, 5)):
        planner.add_argument(flag, type=kind, default=default, help=argparse.SUPPRESS)

    e = p.add_argument_group("prompt enhancer")
    e.add_argument("--use_pe", action="store_true", help="rewrite prompts through an OpenAI-compatible endpoint")
    e.add_argument("--pe_model", help="the enhancer's chat model (default: BERNINI_PE_MODEL, else the enhancer's default)")
    e.add_argument("--pe_on_error", choices=("raw", "fail"), default="raw", help="on enhancer failure: use the raw prompt, or fail the case")
    e.add_argument("--pe_only", action="store_true", help="write enhanced case files and stop (no model loads)")

    add_fields(p.add_argument_group("runtime (bernini)"), "runtime")
    f = p.add_argument_group("fast mode (bernini; lossy, each option off unless named)")
    f.add_argument("--fast", action="store_true", help="the preset of the fast options that measured best: --fp8_gemm auto --fp8_attention auto (named flags override it)")
    add_fields(f, "fast")

    b = p.add_argument_group("batch (bernini)")
    b.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="validate and print the plan; load no model")
    b.add_argument("--fail-fast", "--fail_fast", dest="fail_fast", action="store_true", help="stop the batch at the first failed case")
    b.add_argument("--skip-existing", "--skip_existing", dest="skip_existing", action="store_true", help="resume: skip cases whose output is complete")
    b.add_argument("--summary", type=Path, help="where to write summary.json (default: the common folder of the outputs)")
    b.add_argument("--overwrite", action="store_true", help="replace existing files at output paths that bernini did not write (refused by default)")
    b.add_argument("--confine_outputs", "--confine-outputs", dest="confine_outputs", action="store_true", help="refuse any case output outside --output_dir (for case files from others)")
    b.add_argument("--log-format", "--log_format", dest="log_format", choices=("text", "json"), default="text", help="json: one JSON event per line")
    b.add_argument("--verbose", "-v", action="store_true", help="debug log lines")
    if multi_gpu:
        d = p.add_argument_group("multi-GPU")
        d.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel degree per case")
        d.add_argument("--cfg_parallel", type=int, default=1, help="run guidance passes on this many GPU groups at once")
    else:  # a batch across independent jobs (bernini/shard.py); torchrun spreads one launch instead
        b.add_argument("--shard", metavar="INDEX/COUNT", help="render share INDEX (from 0) of COUNT jobs; default: from SLURM array / "
                       "Kubernetes indexed-job variables; none: the whole batch (README: Batches across many jobs)")
    return p


class DefaultsFormatter(argparse.HelpFormatter):
    """--help names each flag's default, unless its help already says it or there is none to name (off, unset)."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and self._names_default(action):  # a flag without help still shows its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return f"{text} (default: %(default)s)" if text and "default" not in text and self._names_default(action) else text

    @staticmethod
    def _names_default(action: argparse.Action) -> bool:
        return bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS)


def add_fields(group: argparse._ArgumentGroup, name: str) -> None:
    """The flags of the settings fields in help group `name`, from each field's type, default and Flag."""
    for cls in SETTINGS_CLASSES:
        for spec, flag in flags_of(cls):
            if flag.group == name:
                action = group.add_argument(f"--{spec.name}", *flag.aliases, dest=spec.name, **_argparse_form(cls, spec, flag))
                alone = f"; alone: {flag.bare}" if flag.bare is not None else ""
                action.help = f"{flag.help} (default: {flag.default_text or _shown(spec.default)}{alone})"


def _argparse_form(cls: type, spec: dataclasses.Field, flag: Flag) -> dict[str, Any]:
    """add_argument keywords for a field: type and nargs from its annotation, choices from its Literal, its default."""
    kind = value_type(cls, spec.name)
    form: dict[str, Any] = {"default": spec.default, **({"metavar": flag.metavar} if flag.metavar else {}), **SPECIAL_FORMS.get(spec.name, {})}
    if kind is bool:
        form["action"] = argparse.BooleanOptionalAction
    elif get_origin(kind) is tuple:
        form.update(nargs="+", type=get_args(kind)[0], default=list(spec.default))
    elif get_origin(kind) is Literal:
        form["choices"] = get_args(kind)
    elif kind in (int, float):
        form["type"] = kind
    elif kind is not str:
        raise TypeError(f"{spec.name}: no command-line form for a field of type {kind}; give it one here or no flag")
    if flag.bare is not None:  # unset (None) keeps the field's default, or what --fast sets
        form.update(nargs="?", const=flag.bare, default=None)
    return form


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return " ".join(str(v) for v in default)
    return str(default)


def field_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values of the flagged fields of `cls`; a flag left unset where the field has a value is left out."""
    values: dict[str, Any] = {}
    for spec, _ in flags_of(cls):
        value = getattr(args, spec.name)
        if value is None and spec.default is not None:
            continue
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    return values


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


# The flags whose parsing needs more than their field's type: the planner's guidance modes parse, so that
# settings_from refuses them by name; a preset also sets the other flags still at their defaults.
SPECIAL_FORMS: dict[str, dict[str, Any]] = {
    "guidance_mode": {"choices": [*GUIDANCE_MODES, *PLANNER_ONLY_MODES]},
    "preset": {"action": PresetAction, "choices": list(PRESETS)},
}


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


def refuse_batch_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, instead: str) -> None:
    """A long-lived server (the demo, the job server) takes each case from its requests: a batch flag is an error."""
    for dest in BATCH_ONLY:
        if getattr(args, dest) != parser.get_default(dest):
            parser.error(f"--{dest} is a batch flag of infer_single_gpu.py; {instead}")


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    if args.guidance_mode in PLANNER_ONLY_MODES:
        raise ValueError(f"--guidance_mode {args.guidance_mode} belongs to the full Bernini planner; the renderer supports: {', '.join(GUIDANCE_MODES)}")
    if args.solver == "unipc" and not args.use_unipc:
        raise ValueError("--solver unipc contradicts --no-use_unipc; give one of them")
    values = field_values(args, GenerationSettings)
    if args.solver is not None:  # --solver names the scheduler --use_unipc picks
        values["use_unipc"] = args.solver == "unipc"
    return GenerationSettings(**values)


def loras_from(args: argparse.Namespace) -> tuple[LoraRef, ...]:
    """--lora/--lora_high/--lora_low -> LoraRefs (files located, hashed); ValueError before any model loads."""
    specs = [(flag, spec) for flag in ("lora", "lora_high", "lora_low") for spec in getattr(args, flag) or ()]
    if not specs:
        return ()
    from bernini import lora

    return lora.resolve(specs)


def runtime_from(args: argparse.Namespace) -> RuntimeConfig:
    values = field_values(args, RuntimeConfig)
    if args.fast:  # the preset fills the fast options not named
        values = {**FAST_PRESET, **values}
    return RuntimeConfig(**values, loras=loras_from(args))


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
