"""The single-process entry: argv -> validated batch -> dry run, or load once and render every case."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from bernini.cases import Case, CaseError
from bernini.cli import build_parser, collect, configure_logging, options_from, runtime_from, settings_from
from bernini.runner import format_plan, plan_all, run_batch

log = logging.getLogger(__name__)


def make_enhancer(args) -> Any:
    """The --use_pe hook: case -> (prompt to render, sidecar info)."""
    from bernini.prompt_enhancer import PESettings, PromptEnhancer

    enhancer = PromptEnhancer(PESettings.from_env(model=args.pe_model, on_error=args.pe_on_error))

    def enhance(case: Case) -> tuple[str, dict[str, Any]]:
        result = enhancer.enhance(case.task_type, case.prompt, videos=case.videos, image=case.image, images=case.images)
        log.info("%s: prompt (%s): %s", case.name, result.status, result.prompt)
        return result.prompt, result.to_sidecar()

    return enhance


def prepare(args) -> tuple[Any, list, list[tuple[str, str]]]:
    """Settings, planned cases and invalid cases; raises ValueError when the run cannot start."""
    settings = settings_from(args)
    cases, errors = collect(args)
    planned = plan_all(cases, settings, errors)
    for source, message in errors:
        log.error("invalid case %s", message if message.startswith(source) else f"{source}: {message}")
    return settings, planned, errors


def main(argv: Sequence[str] | None = None, prog: str = "infer_single_gpu.py") -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging(args.log_format, args.verbose)
    try:
        settings, planned, errors = prepare(args)
        runtime = runtime_from(args)
        if args.dry_run:
            print(format_plan(planned, errors))
            return 0 if not errors else (1 if planned else 2)
        if args.pe_only:
            from bernini.prompt_enhancer import write_enhanced_cases

            return write_enhanced_cases([c for c, _ in planned], make_enhancer(args), args.output_dir)
        if not planned:
            log.error("no case can run")
            return 2
        from bernini.pipeline import Renderer, resolve_sources

        sources = resolve_sources(args.config, args.high_noise_ckpt, args.low_noise_ckpt)
    except (CaseError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    enhance = make_enhancer(args) if args.use_pe else None
    return run_batch(planned, errors, settings, options_from(args), sources.identity(), lambda: Renderer.load(sources, runtime).render, enhance)


if __name__ == "__main__":
    sys.exit(main())
