"""A batch request and rank 0's plan of it: collect, validate and plan the cases, the dry run, --pe_only, resume."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bernini import shard
from bernini.cases import BatchSpec, Case, collect_cases
from bernini.config import DEFAULT_CONFIG_DIR, GenerationSettings, RuntimeConfig
from bernini.plan import CasePlan, check_run_destinations, format_plan, plan_all
from bernini.runner import BatchOptions, CaseRecord, fingerprint_for, is_complete, model_identity, summary_location, write_json_atomic
from bernini.world import Planned, World, describe

if TYPE_CHECKING:
    from bernini.pipeline import ModelSources
    from bernini.shard import Shard, ShardRun

log = logging.getLogger(__name__)

Enhance = Callable[[Case], tuple[str, dict[str, Any] | None]]


@dataclass(frozen=True)
class BatchRequest:
    """One batch as an entry script parsed it; bernini.driver.run does the rest."""

    spec: BatchSpec
    settings: GenerationSettings
    runtime: RuntimeConfig
    options: BatchOptions = BatchOptions()
    config: str = DEFAULT_CONFIG_DIR
    high_noise_ckpt: str | None = None
    low_noise_ckpt: str | None = None
    dry_run: bool = False
    pe_only: bool = False
    use_pe: bool = False
    enhancer: Callable[[], Enhance] | None = None  # builds the --use_pe / --pe_only hook when first needed
    shard: Shard | None = None  # --shard, or the array job's variables (bernini/shard.py)


@dataclass(frozen=True)
class BatchPlan:
    """What rank 0 decided; every rank works from it."""

    exit_code: int | None = None  # set: the run ends here, with this code on every rank
    report: tuple[str, ...] = ()  # lines for the entry to print (the dry-run table, enhanced case files)
    identity: dict[str, Any] = field(default_factory=dict)
    finished: list[CaseRecord] = field(default_factory=list)  # invalid, then skipped
    todo: Planned = field(default_factory=list)
    shares: list[list[int]] = field(default_factory=list)  # todo indices of each model group
    summary: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)  # summary.json's run fields
    sources: ModelSources | None = None  # the checkpoint every rank loads
    shard: ShardRun | None = None  # a job's share of a batch split across jobs: each case is rendered under its claim


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def not_run(item: tuple[Case, CasePlan], error: str) -> CaseRecord:
    case, plan = item
    return CaseRecord(case.name, case.source, "not_run", output=plan.output, error=error)


def plan_batch(request: BatchRequest, world: World, sources: ModelSources | None = None) -> BatchPlan:
    """Rank 0: collect, validate and plan every case; then the dry run, --pe_only, or resume and each group's share."""
    try:
        if request.use_pe and request.enhancer is not None:
            request.enhancer()  # a missing key or a bad endpoint stops the run here, before any model loads
        cases, errors = collect_cases(request.spec)
        planned = plan_all(cases, request.settings, errors)
        for source, message in errors:
            log.error("invalid case %s", message if message.startswith(source) else f"{source}: {message}")
        if request.shard is not None:  # this job's share of a batch split across jobs: its cases, its summary, claims
            planned, errors, options = shard.take_share(request.shard, planned, errors, request.options)
            request = dataclasses.replace(request, options=options)
        summary = summary_location([p for _, p in planned], request.options.summary, request.options.output_dir)
        check_run_destinations(planned, summary, Path(request.spec.output_dir), overwrite=request.spec.overwrite)
    except ValueError as exc:  # CaseError included: the inputs cannot be read, or the run has nowhere to go
        log.error("%s", exc)
        return BatchPlan(exit_code=2)
    if request.dry_run:
        return dry_run(request, planned, errors, world)
    if request.pe_only:
        assert request.enhancer is not None, "--pe_only needs the enhancer"
        return write_enhanced_cases(planned, errors, request.enhancer(), Path(request.spec.output_dir))
    invalid = [CaseRecord(source, source, "invalid", error=message) for source, message in errors]
    info = {"started": _now(), "timings": {}, "settings": request.settings.to_dict(), "runtime": dataclasses.asdict(request.runtime), **world.run_info()}
    if request.options.shard is not None:
        info["shard"] = request.options.shard.info()
    if not planned:
        if errors or request.shard is None:  # an empty share of a sharded batch is simply done
            log.error("no case can run")
        return BatchPlan(finished=invalid, summary=summary, info=info)
    try:
        sources = sources or resolve(request)
        identity = model_identity(sources)
    except ValueError as exc:
        log.error("%s", exc)
        return BatchPlan(exit_code=2)
    todo, skipped = resume(planned, request, identity)
    return BatchPlan(None, (), identity, invalid + skipped, todo, world.assign([p for _, p in todo]), summary, info, sources, request.options.shard)


def resolve(request: BatchRequest) -> ModelSources:
    from bernini.pipeline import resolve_sources

    return resolve_sources(request.config, request.high_noise_ckpt, request.low_noise_ckpt)


def resume(planned: Planned, request: BatchRequest, identity: dict[str, Any]) -> tuple[Planned, list[CaseRecord]]:
    """--skip-existing: cases whose output is whole and made from these very inputs are skipped."""
    todo: Planned = []
    skipped: list[CaseRecord] = []
    for case, plan in planned:
        if request.options.skip_existing and is_complete(case, plan, fingerprint_for(case, request.settings, identity, request.runtime)):
            log.info("%s: complete output %s found; skipped", case.name, plan.output)
            skipped.append(CaseRecord(case.name, case.source, "skipped", output=plan.output))
        else:
            todo.append((case, plan))
    return todo, skipped


def dry_run(request: BatchRequest, planned: Planned, errors: Sequence[tuple[str, str]], world: World) -> BatchPlan:
    """The plan table and, when --config resolves without the network, the memory plan this machine would get."""
    table = format_plan(planned, errors).splitlines()
    lines = [*table]
    device = request.runtime.device
    if planned and device.startswith("cuda") and not torch.cuda.is_available():
        if table and table[-1].endswith(" invalid"):  # format_plan's count line would say "ready"
            lines[-1] = f"{len(planned)} case(s) valid, {len(errors)} invalid"
        lines.append(
            f"not ready to run here: --device {device} but this machine has no CUDA device, so no memory plan was made; "
            "run the dry run where the batch will run, or use --device cpu (tiny checkpoints only)"
        )
    elif planned:
        try:
            lines += memory_plan_lines(request, planned)
        except ValueError as exc:  # unusable checkpoint files or LoRAs: nothing could run
            log.error("%s", exc)
            lines.append(str(exc))
            return BatchPlan(exit_code=2, report=tuple(lines))
    shares = world.describe_shares(planned)
    if shares:
        lines.append(shares)
    return BatchPlan(exit_code=0 if not errors else (1 if planned else 2), report=tuple(lines))


def memory_plan_lines(request: BatchRequest, planned: Planned) -> list[str]:
    """The memory plan (and the LoRAs) this machine would get; ValueError for checkpoint files or LoRAs that cannot load."""
    from bernini import offload, weights
    from bernini.doctor import offline_hub
    from bernini.pipeline import memory_plan_for

    runtime = request.runtime
    try:
        with offline_hub():
            sources = resolve(request)
            weights.preflight(sources)
        plan = memory_plan_for(sources, runtime, offload.workload_of([p for _, p in planned], runtime.batch_passes))
    except weights.CheckpointError as exc:  # the files are there and unusable
        raise ValueError(f"checkpoint: {exc}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        return [f"memory plan skipped: --config {request.config} does not resolve offline ({str(exc).splitlines()[0]})"]
    lines = [plan.describe()]
    if runtime.loras:  # checked against the experts' shapes, as the load would
        from bernini import lora
        from bernini.pipeline import expert_configs

        lines.append(lora.describe(lora.prepare(runtime.loras, expert_configs(sources))))
    return lines


def make_enhancer(model: str | None = None, on_error: str = "raw") -> Enhance:
    """The --use_pe hook: case -> (prompt to render, sidecar info), through the prompt enhancer's endpoint and cache."""
    from bernini.prompt_enhancer import PESettings, PromptEnhancer

    settings = PESettings.from_env(model=model, on_error=on_error)
    settings.check_ready()  # PEConfigError (a ValueError) names what is missing
    enhancer = PromptEnhancer(settings)

    def enhance(case: Case) -> tuple[str, dict[str, Any] | None]:
        result = enhancer.enhance(case.task_type, case.prompt, videos=case.videos, image=case.image, images=case.images)
        log.info("%s: prompt (%s): %s", case.name, result.status, result.prompt)
        return result.prompt, result.to_sidecar()

    return enhance


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


def write_enhanced_cases(planned: Planned, errors: Sequence[tuple[str, str]], enhance: Enhance, output_dir: Path) -> BatchPlan:
    """--pe_only: <output_dir>/enhanced/<case name>.json per valid case; their paths are the report."""
    failed = 0
    paths: list[str] = []
    for case, _ in planned:
        try:
            prompt, _info = enhance(case)
        except Exception as exc:  # one unreachable endpoint must not stop the other cases
            log.error("%s: prompt enhancement failed: %s", case.name, describe(exc))
            failed += 1
            continue
        path = (output_dir / "enhanced" / f"{case.name}.json").resolve()
        write_json_atomic(path, enhanced_case(case, prompt))
        paths.append(str(path))
    code = 2 if not planned or failed == len(planned) else (1 if failed or errors else 0)
    return BatchPlan(exit_code=code, report=tuple(paths))
