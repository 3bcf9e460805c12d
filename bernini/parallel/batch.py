"""Rank 0's half of a multi-GPU batch: plan, resume-check and enhance once, then share the plan."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch.distributed as dist

from bernini.cases import Case
from bernini.cli import options_from, runtime_from
from bernini.config import GenerationSettings
from bernini.parallel.groups import Groups, Topology, balance
from bernini.parallel.status import describe
from bernini.plan import CasePlan
from bernini.runner import BatchRunner, CaseRecord, is_complete, summary_location

log = logging.getLogger(__name__)

Planned = list[tuple[Case, CasePlan]]
Enhanced = tuple[str, dict[str, Any] | None]


@dataclass(frozen=True)
class BatchPlan:
    """What global rank 0 decided; broadcast so every rank works from the same plan."""

    exit_code: int | None = None  # set: the run ends here, with this code on every rank
    settings: GenerationSettings | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    finished: list[CaseRecord] = field(default_factory=list)  # invalid, then skipped (single-GPU order)
    todo: Planned = field(default_factory=list)
    shares: list[list[int]] = field(default_factory=list)  # todo indices of each model group
    prompts: dict[int, Enhanced | BaseException] = field(default_factory=dict)  # --use_pe, per todo index
    summary: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)  # summary.json's run fields, as one GPU writes them


def assign_cases(plans: Sequence[CasePlan], groups: int) -> list[list[int]]:
    """Case indices of each model group: longest estimated cost first onto the least-loaded group."""
    placement = balance([p.cost for p in plans], groups)
    return [[i for i, g in enumerate(placement) if g == group] for group in range(groups)]


def format_shares(planned: Planned, topology: Topology) -> str:
    """The --dry-run lines that say which model group renders which cases."""
    lines = []
    for group, indices in enumerate(assign_cases([p for _, p in planned], topology.dp)):
        first = group * topology.model_size
        names = ", ".join(planned[i][0].name for i in indices) or "-"
        cost = sum(planned[i][1].cost for i in indices)
        lines.append(f"model group {group} (ranks {first}-{first + topology.model_size - 1}): cost {cost:.3g}: {names}")
    return "\n".join(lines)


def plan_batch(args: argparse.Namespace, topology: Topology, sources: Any) -> BatchPlan:
    """Rank 0: validate, probe, plan, resume-check and enhance once, exactly as one GPU would."""
    from bernini.main import dry_run, make_enhancer, model_identity, prepare, write_enhanced_cases

    settings, planned, errors = prepare(args)
    runtime = runtime_from(args)
    if args.dry_run:
        code = dry_run(args, planned, errors, runtime)
        print(format_shares(planned, topology))
        return BatchPlan(exit_code=code)
    if args.pe_only:
        return BatchPlan(exit_code=write_enhanced_cases(planned, errors, make_enhancer(args), Path(args.output_dir)))
    if not planned:
        log.error("no case can run")
    identity = model_identity(sources)
    options = options_from(args, runtime)
    check = BatchRunner(lambda *a, **k: None, settings, options, identity).fingerprint
    finished = [CaseRecord(source, source, "invalid", error=message) for source, message in errors]
    todo: Planned = []
    for case, plan in planned:
        if args.skip_existing and is_complete(case, plan, check(case)):
            log.info("%s: complete output %s found; skipped", case.name, plan.output)
            finished.append(CaseRecord(case.name, case.source, "skipped", output=plan.output))
        else:
            todo.append((case, plan))
    for case, plan in todo:
        if plan.forwards_per_step < topology.cfg:
            log.warning("%s: %d guidance pass(es) per step for --cfg_parallel %d; some CFG groups idle", case.name, plan.forwards_per_step, topology.cfg)
    prompts = enhance_all(make_enhancer(args), todo) if args.use_pe and todo else {}
    summary = summary_location([p for _, p in planned], options.summary, options.output_dir)
    info = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": {},
        "settings": settings.to_dict(),
        "runtime": dataclasses.asdict(runtime),
        "parallel": {"world_size": topology.world_size, "data_parallel": topology.dp, "cfg_parallel": topology.cfg, "ulysses": topology.ulysses},
    }
    return BatchPlan(None, settings, identity, finished, todo, assign_cases([p for _, p in todo], topology.dp), prompts, summary, info)


def enhance_all(enhance: Callable[[Case], Enhanced], todo: Planned) -> dict[int, Enhanced | BaseException]:
    """One enhancer call per case, on rank 0 only; a failure is kept and replayed where the case runs."""
    results: dict[int, Enhanced | BaseException] = {}
    for i, (case, _) in enumerate(todo):
        try:
            results[i] = enhance(case)
        except Exception as exc:
            try:
                results[i] = pickle.loads(pickle.dumps(exc))  # it must survive the broadcast
            except Exception:  # an exception that cannot travel is replayed by its text
                results[i] = RuntimeError(describe(exc))
    return results


def replay(plan: BatchPlan) -> Callable[[Case], Enhanced] | None:
    """The enhance hook of BatchRunner, answered from rank 0's results."""
    if not plan.prompts:
        return None
    found = {(plan.todo[i][0].source, plan.todo[i][0].name): result for i, result in plan.prompts.items()}

    def enhance(case: Case) -> Enhanced:
        result = found[(case.source, case.name)]
        if isinstance(result, BaseException):
            raise result
        return result

    return enhance


def share_plan(compute: Callable[[], BatchPlan], topology: Topology, groups: Groups) -> BatchPlan:
    """Rank 0 computes the plan (any failure becomes exit code 2); every rank receives it."""
    box: list[BatchPlan | None] = [None]
    if topology.rank == 0:
        try:
            box[0] = compute()
        except ValueError as exc:  # CaseError included: the run cannot start
            log.error("%s", exc)
            box[0] = BatchPlan(exit_code=2)
        except Exception:
            log.exception("planning failed")
            box[0] = BatchPlan(exit_code=2)
    dist.broadcast_object_list(box, src=0, group=groups.control)
    assert box[0] is not None
    return box[0]
