"""The one place a job is rendered: through the batch driver's Session (the CLI's engine, atomic write, sidecar), by every rank of the launch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bernini.cases import Case, CaseError, parse_case
from bernini.config import GenerationSettings
from bernini.driver import Session
from bernini.parallel import LocalPeers, Peers
from bernini.plan import CasePlan, plan_case
from bernini.runner import CaseRecord
from bernini.sampling import StepEvent
from bernini.server.fields import SOURCE

Report = Callable[[StepEvent], None]


class Stopped(CaseError):
    """A render stopped between steps (the job was deleted, or the server is stopping); nothing was saved."""


@dataclass(frozen=True)
class RenderJob:
    """A job as every rank renders it: planned once on rank 0 (media probed, sizes resolved) and sent as is."""

    job_id: str
    case_data: dict[str, Any]  # the case-file object (media as absolute paths)
    case: Case
    plan: CasePlan
    settings: GenerationSettings


@dataclass(frozen=True)
class Rendered:
    ok: bool
    error: str | None
    output: Path
    timings: dict[str, float] = field(default_factory=dict)


def output_suffix(case: Case) -> str:
    return ".png" if case.task.single_frame else ".mp4"


def plan_job(job_id: str, case_data: Mapping[str, Any], settings: GenerationSettings, out_dir: Path) -> RenderJob:
    """Check a case-file object exactly as the CLI checks a case file, and plan it into out_dir/<job id>.mp4|.png; CaseError says what is wrong."""
    case = parse_case(dict(case_data), source=SOURCE, name=job_id, base=None)
    case = replace(case, output=out_dir / f"{job_id}{output_suffix(case)}", explicit_output=True)
    return RenderJob(job_id, dict(case_data), case, plan_case(case, settings), settings)


# ---------------------------------------------------------------- ranks


# ---------------------------------------------------------------- rendering


def _ignore(event: StepEvent) -> None:
    pass


class _Steps:
    """runner.Progress for one job: stop between steps when told, else report the step."""

    def __init__(self, report: Report, stop: Callable[[], bool]) -> None:
        self.report = report
        self.stop = stop

    def case_started(self, index: int, total: int, case: Case, plan: CasePlan) -> None:
        pass

    def step(self, index: int, total: int, case: Case, event: StepEvent) -> None:
        self.step_event(event)

    def step_event(self, event: StepEvent) -> None:
        """An on_step callback (Engine.render's): raises Stopped between steps when told to stop."""
        if self.stop():
            raise Stopped(f"stopped after step {event.index + 1}/{event.total}; nothing was saved")
        self.report(event)

    def case_finished(self, index: int, total: int, record: CaseRecord) -> None:
        pass

    def close(self) -> None:
        pass


class JobRenderer:
    """Renders planned jobs with a loaded engine; rank 0 calls render(), the other ranks serve_peer()."""

    def __init__(self, session: Session, peers: Peers | None = None) -> None:
        self.session = session
        self.peers = peers or LocalPeers()

    @property
    def device(self) -> torch.device:
        return self.session.engine.renderer.device

    def render(self, job: RenderJob, report: Report, should_stop: Callable[[], bool]) -> Rendered:
        """Rank 0: share the job with the other ranks, then render it with them; should_stop is asked after every step."""
        self.peers.send(job)
        return self.render_here(job, report, lambda: self.peers.agree(should_stop()))

    def render_here(self, job: RenderJob, report: Report, stop: Callable[[], bool]) -> Rendered:
        record = self.session.run_case(job.case, job.plan, settings=job.settings, progress=_Steps(report, stop))
        return Rendered(record.status == "ok", record.error, Path(job.plan.output), dict(record.timings))

    def serve_peer(self) -> None:
        """Ranks > 0: render what rank 0 sends until it sends None."""
        while (job := self.peers.receive()) is not None:
            self.render_here(job, _ignore, lambda: self.peers.agree(False))

    def close(self) -> None:
        """Release the other ranks (rank 0, once no job runs)."""
        self.peers.send(None)
