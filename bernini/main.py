"""The single-process entry: argv -> validated batch -> dry run, enhanced cases, or load once and render."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bernini import memory, shard
from bernini.cases import Case, CaseError
from bernini.cli import build_parser, collect, configure_logging, options_from, progress_for, runtime_from, settings_from, wants_progress_bars
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.plan import CasePlan
from bernini.runner import format_plan, plan_all, run_batch, summary_location, write_json_atomic

if TYPE_CHECKING:
    from bernini.pipeline import ModelSources

log = logging.getLogger(__name__)

Enhance = Callable[[Case], tuple[str, dict[str, Any]]]
Planned = list[tuple[Case, CasePlan]]


def make_enhancer(args: argparse.Namespace) -> Enhance:
    """The --use_pe hook: case -> (prompt to render, sidecar info)."""
    from bernini.prompt_enhancer import PESettings, PromptEnhancer

    enhancer = PromptEnhancer(PESettings.from_env(model=args.pe_model, on_error=args.pe_on_error))

    def enhance(case: Case) -> tuple[str, dict[str, Any]]:
        result = enhancer.enhance(case.task_type, case.prompt, videos=case.videos, image=case.image, images=case.images)
        log.info("%s: prompt (%s): %s", case.name, result.status, result.prompt)
        return result.prompt, result.to_sidecar()

    return enhance


def prepare(args: argparse.Namespace) -> tuple[GenerationSettings, Planned, list[tuple[str, str]]]:
    """Settings, planned cases and invalid cases; raises ValueError when the run cannot start."""
    settings = settings_from(args)
    cases, errors = collect(args)
    planned = plan_all(cases, settings, errors)
    for source, message in errors:
        log.error("invalid case %s", message if message.startswith(source) else f"{source}: {message}")
    return settings, planned, errors


def enhanced_case(case: Case, prompt: str) -> dict[str, Any]:
    """A case file for the enhanced prompt: the same keys, media as absolute paths."""
    data: dict[str, Any] = {"task_type": case.task_type, "prompt": prompt}
    if case.guidance_mode:
        data["guidance_mode"] = case.guidance_mode
    if case.videos:
        data["video"] = str(case.videos[0]) if len(case.videos) == 1 else [str(p) for p in case.videos]
    if case.image:
        data["image"] = str(case.image)
    if case.images:
        data["images"] = [str(p) for p in case.images]
    if case.explicit_output and case.output:
        data["output"] = str(case.output)
    return data


def write_enhanced_cases(planned: Planned, errors: Sequence[tuple[str, str]], enhance: Enhance, output_dir: Path) -> int:
    """--pe_only: <output_dir>/enhanced/<case name>.json per valid case; prints each path. Exit code."""
    failed = 0
    for case, _ in planned:
        try:
            prompt, _info = enhance(case)
        except Exception as exc:  # one unreachable endpoint must not stop the other cases
            log.error("%s: prompt enhancement failed: %s: %s", case.name, type(exc).__name__, exc)
            failed += 1
            continue
        path = (output_dir / "enhanced" / f"{case.name}.json").resolve()
        write_json_atomic(path, enhanced_case(case, prompt))
        print(path)
    if not planned or failed == len(planned):
        return 2
    return 1 if failed or errors else 0


def model_identity(sources: ModelSources) -> dict[str, Any]:
    """Paths of config, base and experts, plus a cheap name/size/mtime fingerprint of the expert files."""
    from bernini import weights
    from bernini.pipeline import EXPERT_FOLDERS

    identity = sources.identity()
    paths = [ckpt or sources.base / EXPERT_FOLDERS[name] for name, ckpt in sources.expert_ckpts.items()]
    try:
        identity["files"] = weights.checkpoint_identity(paths)
    except (OSError, ValueError) as exc:  # a hub id that is not a local path: its id is the identity
        log.debug("no file fingerprint for the checkpoint: %s", exc)
    return identity


def dry_run(args: argparse.Namespace, planned: Planned, errors: Sequence[tuple[str, str]], runtime: RuntimeConfig) -> int:
    """Print the plan and, when --config resolves without the network, the memory plan this machine would get."""
    print(format_plan(planned, errors))
    if planned:
        import torch

        from bernini import offload
        from bernini.doctor import offline_hub
        from bernini.pipeline import resolve_sources

        try:
            with offline_hub():
                sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
            load = memory.workload_of([p for _, p in planned], runtime.batch_combos)
            plan = offload.plan_for_run(sources.base, len(sources.renderer.experts), runtime, torch.device(runtime.device), load, sources.renderer.max_sequence_length)
            print(plan.describe())
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            print(f"memory plan skipped: --config {args.config} does not resolve offline ({str(exc).splitlines()[0]})")
    return 0 if not errors else (1 if planned else 2)


def main(argv: Sequence[str] | None = None, prog: str = "infer_single_gpu.py") -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging(args.log_format, args.verbose, progress_bars=wants_progress_bars(args.log_format))
    try:
        settings, planned, errors = prepare(args)
        runtime = runtime_from(args)
        part = shard.resolve_shard(args.shard)
    except ValueError as exc:  # CaseError included: the run cannot start
        log.error("%s", exc)
        return 2
    options = options_from(args, runtime)
    if part is not None:
        planned, errors, options = shard.take_share(part, planned, errors, options)
    if args.dry_run:
        return dry_run(args, planned, errors, runtime)
    if args.pe_only:
        return write_enhanced_cases(planned, errors, make_enhancer(args), Path(args.output_dir))
    if not planned:  # every case invalid (exit 2), or an empty share of a sharded batch (exit 0)
        if errors:
            log.error("no case can run")
        code = run_batch([], errors, settings, options, {}, _never_load)
        print(summary_location([], options.summary, options.output_dir))
        return code
    from bernini.pipeline import Renderer, resolve_sources

    try:
        sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
        identity = model_identity(sources)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    enhance = make_enhancer(args) if args.use_pe else None
    code = run_batch(planned, errors, settings, options, identity, lambda: Renderer.load(sources, runtime, memory.workload_of([p for _, p in planned], runtime.batch_combos)).render, enhance, progress_for(args.log_format))
    print(summary_location([p for _, p in planned], options.summary, options.output_dir))
    return code


def _never_load() -> Callable[..., Any]:
    raise CaseError("no case can run")


if __name__ == "__main__":
    sys.exit(main())
