"""The batch driver under every entry point: prepare, dry run, resume, render each share, summarize, stop on signals.

It runs on a world (bernini.world): one process for one GPU, the demo and the Python API; torchrun's N processes
(bernini.parallel.world). Entry scripts parse their flags into a BatchRequest and call `run`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from bernini import media, memory
from bernini.cases import BatchSpec, Case, CaseError, collect_cases
from bernini.config import DEFAULT_CONFIG_DIR, GenerationSettings, RuntimeConfig
from bernini.plan import CasePlan, format_plan, plan_all
from bernini.runner import (
    BatchOptions, CaseRecord, LogProgress, Progress, counts_of, exit_code, fingerprint_for, is_complete, model_identity, release_memory,
    summary_location, tally, write_json_atomic, write_summary,
)
from bernini.sampling import NonFiniteError, StepEvent
from bernini.world import LoadFailure, LocalWorld, Part, Planned, World, describe

if TYPE_CHECKING:
    from bernini.engine import Engine
    from bernini.pipeline import ModelSources

log = logging.getLogger(__name__)

Enhance = Callable[[Case], tuple[str, dict[str, Any] | None]]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ---------------------------------------------------------------- signals


class Interrupted(BaseException):
    """SIGTERM or SIGINT ended the batch; a BaseException, so no case-level handler takes it for a failed case."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended: 143, 130


class StopSignals:
    """SIGTERM and SIGINT stop the batch at the next step (every rank of a group at the same one); a second signal stops it at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.closing = False  # the summary is being written: a second signal waits for it

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if not self.closing:
                raise Interrupted(self.received)
            return
        self.received = signum
        log.warning("%s received: the batch stops at the next step (send it again to stop at once)", signal.Signals(signum).name)

    def check(self, world: World) -> None:
        """Raise Interrupted on every rank of the group when any of them received a signal."""
        signum = world.agree(self.received)
        if signum is not None:
            raise Interrupted(signum)


# ---------------------------------------------------------------- requests, plans, outcomes


@dataclass(frozen=True)
class BatchRequest:
    """One batch as an entry script parsed it; `run` does the rest."""

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


@dataclass(frozen=True)
class Outcome:
    """How the run ended, for the entry to print (rank 0) and exit with (every rank)."""

    exit_code: int
    report: tuple[str, ...] = ()
    summary: Path | None = None
    tally: str | None = None  # "8 ok, 0 failed, 0 skipped"
    interrupted: str | None = None  # the signal's name

    @property
    def last_line(self) -> str | None:
        """The line a person reads at the end."""
        if self.interrupted:
            return f"interrupted by {self.interrupted}: {self.tally or 'before any case ran'}"
        return self.tally


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def not_run(item: tuple[Case, CasePlan], error: str) -> CaseRecord:
    case, plan = item
    return CaseRecord(case.name, case.source, "not_run", output=plan.output, error=error)


# ---------------------------------------------------------------- preparation (rank 0)


def plan_batch(request: BatchRequest, world: World, sources: ModelSources | None = None) -> BatchPlan:
    """Rank 0: collect, validate and plan every case; then the dry run, --pe_only, or resume and each group's share."""
    try:
        cases, errors = collect_cases(request.spec)
    except ValueError as exc:  # CaseError included: the inputs cannot be read at all
        log.error("%s", exc)
        return BatchPlan(exit_code=2)
    planned = plan_all(cases, request.settings, errors)
    for source, message in errors:
        log.error("invalid case %s", message if message.startswith(source) else f"{source}: {message}")
    if request.dry_run:
        return dry_run(request, planned, errors, world)
    if request.pe_only:
        assert request.enhancer is not None, "--pe_only needs the enhancer"
        return write_enhanced_cases(planned, errors, request.enhancer(), Path(request.spec.output_dir))
    invalid = [CaseRecord(source, source, "invalid", error=message) for source, message in errors]
    summary = summary_location([p for _, p in planned], request.options.summary, request.options.output_dir)
    info = {"started": _now(), "timings": {}, "settings": request.settings.to_dict(), "runtime": dataclasses.asdict(request.runtime), **world.run_info()}
    if not planned:
        log.error("no case can run")
        return BatchPlan(finished=invalid, summary=summary, info=info)
    try:
        sources = sources or resolve(request)
        identity = model_identity(sources)
    except ValueError as exc:
        log.error("%s", exc)
        return BatchPlan(exit_code=2)
    todo, skipped = resume(planned, request, identity)
    # Sharding across jobs (bernini/shard.py) takes this job's share of `todo` here: after resume, before the groups' shares.
    return BatchPlan(None, (), identity, invalid + skipped, todo, world.assign([p for _, p in todo]), summary, info, sources)


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
        lines.append(memory_plan_line(request, planned))
    shares = world.describe_shares(planned)
    if shares:
        lines.append(shares)
    return BatchPlan(exit_code=0 if not errors else (1 if planned else 2), report=tuple(lines))


def memory_plan_line(request: BatchRequest, planned: Planned) -> str:
    from bernini import offload
    from bernini.doctor import offline_hub

    runtime = request.runtime
    try:
        with offline_hub():
            sources = resolve(request)
        load = memory.workload_of([p for _, p in planned], runtime.batch_combos)
        plan = offload.plan_for_run(sources.base, len(sources.renderer.experts), runtime, torch.device(runtime.device), load, sources.renderer.max_sequence_length)
        return plan.describe()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        return f"memory plan skipped: --config {request.config} does not resolve offline ({str(exc).splitlines()[0]})"


def make_enhancer(model: str | None = None, on_error: str = "raw") -> Enhance:
    """The --use_pe hook: case -> (prompt to render, sidecar info), through the prompt enhancer's endpoint and cache."""
    from bernini.prompt_enhancer import PESettings, PromptEnhancer

    enhancer = PromptEnhancer(PESettings.from_env(model=model, on_error=on_error))

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


# ---------------------------------------------------------------- one case at a time


class Session:
    """A loaded engine in its world, rendering one case at a time into summary records; the demo keeps one alive."""

    def __init__(
        self,
        engine: Engine,
        world: World | None = None,
        progress: Progress | None = None,
        make_enhancer: Callable[[], Enhance] | None = None,
        signals: StopSignals | None = None,
    ) -> None:
        self.engine = engine
        self.world = world or LocalWorld()
        self.progress = progress or LogProgress()
        self.make_enhancer = make_enhancer  # --use_pe: built on first use, on the group leader only
        self._enhance: Enhance | None = None
        self.signals = signals

    def run_case(
        self,
        case: Case,
        plan: CasePlan,
        index: int = 1,
        total: int = 1,
        *,
        settings: GenerationSettings | None = None,
        prompt: tuple[str, dict[str, Any] | None] | None = None,
        progress: Progress | None = None,
    ) -> CaseRecord:
        """Render (and, on the writing rank, write) one planned case; failures become the record, signals propagate."""
        progress = progress or self.progress
        started = time.perf_counter()
        timings: dict[str, float] = {}
        status, error = "failed", None
        progress.case_started(index, total, case, plan)
        try:
            text, pe_info = prompt if prompt is not None else self._prompt(case, timings)
            on_step = self._on_step(progress, index, total, case)
            result = self.engine.render(case, settings, plan=plan, prompt=text, pe_info=pe_info, write=self.world.writes, on_step=on_step, timings=timings)
            if result is not None:  # None on a helper rank: its leader reports
                timings = dict(result.timings)
            status = "ok"
        except (CaseError, media.MediaError, NonFiniteError) as exc:
            error = str(exc)
        except torch.cuda.OutOfMemoryError as exc:
            error = f"out of GPU memory ({str(exc).splitlines()[0] if str(exc) else 'no detail'}); lower --max_image_size/--num_frames or use --offload expert|block"
        except Exception as exc:  # keep the batch going; the summary names the failure
            log.exception("%s failed", case.name)
            error = describe(exc)
        timings["total"] = time.perf_counter() - started
        record = CaseRecord(case.name, case.source, status, output=plan.output, error=error, plan=plan.to_dict(), timings=timings)
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
        extra = {"event": "case_end", "case": case.name, "status": status, "output": plan.output, "timings": timings}
        if status == "ok":
            log.info("[%d/%d] %s: ok -> %s (%s)", index, total, case.name, plan.output, phases, extra=extra)
        else:
            log.error("[%d/%d] %s: FAILED: %s (%s)", index, total, case.name, error, phases, extra=extra)
            release_memory()
        progress.case_finished(index, total, record)
        return record

    def _prompt(self, case: Case, timings: dict[str, float]) -> tuple[str, dict[str, Any] | None]:
        """--use_pe: the group leader asks the enhancer, the group renders its answer."""
        if self.make_enhancer is None:
            return case.prompt, None
        clock = time.perf_counter()
        answer = self.world.from_leader(lambda: self._enhancer()(case))
        timings["prompt_enhance"] = time.perf_counter() - clock
        return answer

    def _enhancer(self) -> Enhance:
        if self._enhance is None:
            assert self.make_enhancer is not None
            self._enhance = self.make_enhancer()
        return self._enhance

    def _on_step(self, progress: Progress, index: int, total: int, case: Case) -> Callable[[StepEvent], None]:
        def on_step(event: StepEvent) -> None:
            progress.step(index, total, case, event)
            if self.signals is not None:
                self.signals.check(self.world)  # the group leaves the case at the same step, or it would hang

        return on_step


# ---------------------------------------------------------------- the batch


def run(request: BatchRequest, world: World | None = None, *, progress: Progress | None = None, sources: ModelSources | None = None) -> Outcome:
    """Run a batch on ``world`` (one process when None): rank 0 plans, every model group renders its share, rank 0 summarizes.

    ``sources``: the checkpoint already resolved (torchrun resolves it on every rank to validate the degrees).
    """
    world = world or LocalWorld()
    started = time.perf_counter()
    signals = StopSignals()
    with signals.installed():
        try:
            plan = world.broadcast(_plan_or_stop(request, world, sources) if world.rank == 0 else None)
        except Interrupted as stop:  # a second signal while planning: nothing ran, nothing to summarize
            return Outcome(stop.exit_code, interrupted=signal.Signals(stop.signum).name)
        if plan.exit_code is not None:
            return Outcome(plan.exit_code, plan.report)
        mine = plan.shares[world.group] if plan.todo else []
        rendered: dict[int, CaseRecord] = {}
        load_seconds: float | None = None
        stopped_by: int | None = None

        def save() -> None:
            # Rewritten after every case where rank 0 knows every record: one process, or one model group.
            if world.rank == 0 and len(plan.shares) == 1 and plan.summary is not None:
                write_summary(plan.summary, _ordered(plan, rendered, final=False), plan.info, started, final=False)

        try:
            if mine:
                signals.check(world)  # a signal while planning: load nothing
                clock = time.perf_counter()
                try:
                    engine = world.load(plan.sources, request.runtime, request.settings, plan.identity, [plan.todo[i][1] for i in mine])  # type: ignore[arg-type]
                except LoadFailure as exc:
                    rendered.update({i: not_run(plan.todo[i], f"models could not be loaded: {exc}") for i in mine})
                else:
                    engine.load_seconds = load_seconds = round(time.perf_counter() - clock, 3)
                    log.info("load: %.2f s", load_seconds, extra={"event": "load", "seconds": load_seconds})
                    session = Session(engine, world, progress, request.enhancer if request.use_pe else None, signals)
                    render_cases(request, plan, mine, session, signals, rendered, save)
        except Interrupted as stop:
            stopped_by = stop.signum
            left = [i for i in mine if i not in rendered]
            log.warning("%s: %d case(s) not run", stop, len(left), extra={"event": "interrupted"})
            rendered.update({i: not_run(plan.todo[i], str(stop)) for i in left})
        finally:
            signals.closing = True  # a second signal now waits for the summary
            if progress is not None:
                progress.close()
        parts = world.gather((rendered, load_seconds, stopped_by) if world.writes else ({}, None, None))
        return _finish(plan, parts, world, started)


def _plan_or_stop(request: BatchRequest, world: World, sources: ModelSources | None) -> BatchPlan:
    try:
        return plan_batch(request, world, sources)
    except Exception:  # a planning bug must end every rank, not leave them waiting for the plan
        log.exception("planning failed")
        return BatchPlan(exit_code=2)


def render_cases(
    request: BatchRequest, plan: BatchPlan, mine: list[int], session: Session, signals: StopSignals, rendered: dict[int, CaseRecord], save: Callable[[], None]
) -> None:
    """Render this group's cases into ``rendered``, one at a time; --fail-fast and signals stop the group between cases."""
    world = session.world
    failed: str | None = None
    for n, index in enumerate(mine, 1):
        signals.check(world)
        if request.options.fail_fast:
            # Agreed by the whole group, so no rank starts a case its peers skip.
            why = world.agree(f"after {failed} failed" if failed else ("after a case of another model group failed" if world.stopped() else None))
            if why is not None:
                rendered.update({i: not_run(plan.todo[i], f"--fail-fast: not run {why}") for i in mine[n - 1 :]})
                log.error("--fail-fast: stopping %s", why)
                break
        case, case_plan = plan.todo[index]
        # A job sharing the folder with others claims the case here (bernini/shard.py), around its render.
        rendered[index] = record = session.run_case(case, case_plan, n, len(mine))
        save()
        if record.status == "failed" and request.options.fail_fast:
            failed = case.name
            world.stop_all()


def _ordered(plan: BatchPlan, rendered: dict[int, CaseRecord], final: bool) -> list[CaseRecord]:
    """Invalid and skipped cases, then the rendered ones in batch order (final: every case, unreported ones not_run)."""
    if not final:
        return plan.finished + [rendered[i] for i in range(len(plan.todo)) if i in rendered]
    return plan.finished + [rendered.get(i) or not_run(item, "no model group reported this case") for i, item in enumerate(plan.todo)]


def _finish(plan: BatchPlan, parts: list[Part] | None, world: World, started: float) -> Outcome:
    """Rank 0 writes the final summary and makes the tally; every rank leaves with rank 0's exit code."""
    outcome: Outcome | None = None
    if parts is not None:
        rendered = {i: r for records, _, _ in parts for i, r in records.items()}
        loads = [seconds for _, seconds, _ in parts if seconds is not None]
        signum = next((s for _, _, s in parts if s is not None), None)
        records = _ordered(plan, rendered, final=True)
        code = exit_code(records) if signum is None else 128 + signum
        info = {**plan.info, "timings": {"load": max(loads)} if loads else {}}
        if signum is not None:
            info["interrupted"] = signal.Signals(signum).name
        assert plan.summary is not None
        write_summary(plan.summary, records, info, started, True, code)
        line = tally(counts_of(records))
        log.info("summary: %s (%s)", plan.summary, line, extra={"event": "summary", "output": str(plan.summary)})
        outcome = Outcome(code, (), plan.summary, line, info.get("interrupted"))
    code = world.broadcast(outcome.exit_code if outcome is not None else None)
    return outcome or Outcome(code)
