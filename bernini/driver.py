"""The batch driver under every entry point: plan (bernini.batch), load once, render each share, summarize, stop on signals.

It runs on a world (bernini.world): one process for one GPU, the demo and the Python API; torchrun's N processes
(bernini.parallel.world). Entry scripts parse their flags into a BatchRequest and call `run`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from bernini import media
from bernini.batch import BatchPlan, BatchRequest, Enhance, not_run, plan_batch
from bernini.cases import Case, CaseError
from bernini.config import GenerationSettings
from bernini.plan import CasePlan
from bernini.runner import CaseRecord, LogProgress, Progress, counts_of, exit_code, fingerprint_for, is_complete, release_memory, tally, write_summary
from bernini.sampling import NonFiniteError, StepEvent
from bernini.world import LoadFailure, LocalWorld, Part, World, describe

if TYPE_CHECKING:
    from bernini.engine import Engine
    from bernini.pipeline import ModelSources

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- outcomes


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
        if plan.shard is None:
            record = session.run_case(case, case_plan, n, len(mine))
        else:  # under the case's claim, so jobs sharing the batch never render it twice
            record = plan.shard.run(case, case_plan, lambda: session.run_case(case, case_plan, n, len(mine)),
                                    lambda: is_complete(case, case_plan, fingerprint_for(case, request.settings, plan.identity, request.runtime)))
        rendered[index] = record
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
