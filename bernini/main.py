"""The single-process entry: argv -> a batch request -> the driver on a world of one; prints what a person reads."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bernini import batch, driver, shard
from bernini.cli import batch_spec_from, build_parser, configure_logging, options_from, progress_for, runtime_from, settings_from, wants_progress_bars

log = logging.getLogger(__name__)


def make_enhancer(args: argparse.Namespace) -> batch.Enhance:
    """The --use_pe / --pe_only hook, from the prompt-enhancer flags."""
    return batch.make_enhancer(args.pe_model, args.pe_on_error)


def request_from(args: argparse.Namespace) -> batch.BatchRequest:
    """The parsed flags as a batch request; ValueError names a bad setting."""
    runtime = runtime_from(args)
    return batch.BatchRequest(
        spec=batch_spec_from(args),
        settings=settings_from(args),
        runtime=runtime,
        options=options_from(args, runtime),
        config=args.config,
        high_noise_ckpt=args.high_noise_ckpt,
        low_noise_ckpt=args.low_noise_ckpt,
        dry_run=args.dry_run,
        pe_only=args.pe_only,
        use_pe=args.use_pe,
        enhancer=lambda: make_enhancer(args),  # looked up when first needed
        shard=shard.resolve_shard(args.shard) if "shard" in vars(args) else None,  # one-process runs only
    )


def report(outcome: driver.Outcome, log_format: str) -> None:
    """stdout: the report (dry-run table, enhanced case files), then the summary's path; stderr: the tally line."""
    for line in outcome.report:
        print(line)
    if outcome.last_line is not None and log_format == "text":  # JSON logs carry it in the summary event
        print(outcome.last_line, file=sys.stderr)
    if outcome.summary is not None:
        print(outcome.summary)


def main(argv: Sequence[str] | None = None, prog: str = "infer_single_gpu.py") -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging(args.log_format, args.verbose, progress_bars=wants_progress_bars(args.log_format))
    try:
        request = request_from(args)
    except ValueError as exc:  # the run cannot start
        log.error("%s", exc)
        return 2
    outcome = driver.run(request, progress=progress_for(args.log_format))
    report(outcome, args.log_format)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
