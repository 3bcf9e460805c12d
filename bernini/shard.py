"""A batch split across independent jobs: this job's share (--shard, SLURM arrays, Kubernetes indexed
jobs), rendered under claim files, and `summary merge` of the shards' summaries into one."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bernini.claims import Claims
from bernini.parallel import balance
from bernini.runner import BatchOptions, CaseRecord, exit_code, summary_location, write_json_atomic

if TYPE_CHECKING:
    from bernini.cases import Case
    from bernini.plan import CasePlan

log = logging.getLogger(__name__)

__all__ = ["Shard", "ShardRun", "find_summaries", "main", "merge_summaries", "resolve_shard", "share", "take_share"]

COUNT_ENV = "BERNINI_SHARD_COUNT"  # Kubernetes sets JOB_COMPLETION_INDEX but no count: the job spec passes its completions here
SUMMARY_GLOB = "summary.shard-*-of-*.json"

Planned = list[tuple["Case", "CasePlan"]]


@dataclass(frozen=True)
class Shard:
    """Share `index` of `count` (from 0), and where that came from (for the log)."""

    index: int
    count: int
    origin: str = "--shard"

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"{self.origin}: shard {self.index}/{self.count} is invalid: INDEX counts from 0 and must be below COUNT (COUNT >= 1)")

    @property
    def label(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard | None:
    """--shard INDEX/COUNT, or 'none' (render the whole batch even inside an array job)."""
    if text.strip().lower() == "none":
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise ValueError(f"--shard {text!r} is invalid: write INDEX/COUNT, e.g. --shard 0/4 for the first of 4 shares, or --shard none")
    return Shard(int(index), int(count), f"--shard {text}")


def _int(environ: Mapping[str, str], name: str, why: str) -> int:
    try:
        return int(environ[name])
    except KeyError:
        raise ValueError(f"{why} but {name} is not set; pass --shard INDEX/COUNT (or --shard none)") from None
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer; pass --shard INDEX/COUNT (or --shard none)") from None


def shard_from_env(environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The share a SLURM array task or a Kubernetes indexed-job pod stands for; None outside them."""
    if "SLURM_ARRAY_TASK_ID" in environ:
        why = "SLURM_ARRAY_TASK_ID is set (a Slurm job array)"
        task, low = _int(environ, "SLURM_ARRAY_TASK_ID", why), _int(environ, "SLURM_ARRAY_TASK_MIN", why)
        count = _int(environ, "SLURM_ARRAY_TASK_COUNT", why)
        step = int(environ.get("SLURM_ARRAY_TASK_STEP") or 1)
        high = int(environ.get("SLURM_ARRAY_TASK_MAX") or low + (count - 1) * step)
        if (task - low) % step or (high - low) // step + 1 != count:
            raise ValueError(
                f"Slurm array task {task} of min {low}, max {high}, step {step}, count {count} is not one of an evenly spaced range; "
                "shard a batch with --array=A-B or A-B:S, or pass --shard INDEX/COUNT"
            )
        return Shard((task - low) // step, count, f"SLURM_ARRAY_TASK_ID={task} (min {low}, count {count})")
    if COUNT_ENV in environ:
        index = _int(environ, "JOB_COMPLETION_INDEX", f"{COUNT_ENV} is set")
        return Shard(index, _int(environ, COUNT_ENV, f"{COUNT_ENV} is set"), f"JOB_COMPLETION_INDEX={index}, {COUNT_ENV}={environ[COUNT_ENV]}")
    if "JOB_COMPLETION_INDEX" in environ:
        log.warning("JOB_COMPLETION_INDEX=%s is set but %s is not: rendering the whole batch; set %s to the job's completions to shard it",
                    environ["JOB_COMPLETION_INDEX"], COUNT_ENV, COUNT_ENV)
    return None


def resolve_shard(flag: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """--shard when given, else the array job's variables; None: the whole batch, as before sharding existed."""
    return parse_shard(flag) if flag is not None else shard_from_env(environ)


def share(planned: Sequence[tuple[Case, CasePlan]], shard: Shard) -> Planned:
    """This shard's cases, in batch order: largest estimated cost first onto the least-loaded shard.

    Every job must reach the same answer, so cases are balanced in order of name and output, not
    in the order a job happened to list them; the costs come from the same probes everywhere.
    """
    order = sorted(range(len(planned)), key=lambda i: (planned[i][0].name, planned[i][1].output))
    placement = balance([planned[i][1].cost for i in order], shard.count)
    mine = {i for i, target in zip(order, placement) if target == shard.index}
    return [item for i, item in enumerate(planned) if i in mine]


@dataclass(frozen=True)
class ShardRun:
    """What the batch driver needs of a sharded run: claims around each case, the shard for summary.json."""

    shard: Shard
    claims: Claims
    cases: int  # this shard's share
    batch_cases: int  # the valid cases of the whole batch

    def info(self) -> dict[str, Any]:
        owner = self.claims.owner
        return {"index": self.shard.index, "count": self.shard.count, "origin": self.shard.origin, "cases": self.cases,
                "batch_cases": self.batch_cases, "host": owner.host, "pid": owner.pid, "job": owner.job or None}

    def run(self, case: Case, plan: CasePlan, render: Callable[[], CaseRecord], complete: Callable[[], bool]) -> CaseRecord:
        """Render a case under its claim: skipped when another live job holds it, or finished it first."""
        try:
            with self.claims.hold(Path(plan.output)) as other:
                if other is not None:
                    log.info("%s: claimed by %s; skipped", case.name, other.describe())
                    return CaseRecord(case.name, case.source, "skipped", output=plan.output, error=f"claimed by another job: {other.describe()}")
                if complete():  # checked under the claim, so a job that rendered it and let go is never redone
                    log.info("%s: complete output %s found; skipped", case.name, plan.output)
                    return CaseRecord(case.name, case.source, "skipped", output=plan.output)
                return render()  # catches everything of its own
        except OSError as exc:  # the claim file could not be made: render nothing rather than risk a duplicate
            log.error("%s: cannot claim %s: %s", case.name, plan.output, exc)
            return CaseRecord(case.name, case.source, "failed", output=plan.output, error=f"cannot create the claim file beside {plan.output}: {exc}")


def take_share(shard: Shard, planned: Planned, errors: list[tuple[str, str]], options: BatchOptions) -> tuple[Planned, list[tuple[str, str]], BatchOptions]:
    """This job's part of a batch: its cases, the invalid ones (reported by shard 0 alone), and options
    that name the shard's summary, resume complete outputs and claim each case."""
    mine = share(planned, shard)
    plans = [p for _, p in planned]
    summary = options.summary
    if summary is None:  # beside where the whole batch's summary.json would go, the same folder for every shard
        whole = summary_location(plans, None, options.output_dir)
        summary = whole.with_name(f"{whole.stem}.{shard.label}{whole.suffix}")
    run = ShardRun(shard, Claims(), len(mine), len(planned))
    log.info("shard %s (%s): %d of %d case(s), estimated cost %.3g of %.3g; summary %s", shard, shard.origin, len(mine), len(planned),
             sum(p.cost for _, p in mine), sum(p.cost for p in plans), summary)
    return mine, errors if shard.index == 0 else [], dataclasses.replace(options, summary=summary, skip_existing=True, shard=run)


# ---- summary merge ----

# When shards disagree about a case, the record that says most wins: a good output, then a failure, then
# "another job had it" (the skip of a claimed case), then not run, then invalid.
def _rank(record: Mapping[str, Any]) -> int:
    status = record.get("status")
    if status == "skipped":
        return 3 if record.get("error") else 1
    return {"ok": 0, "failed": 2, "not_run": 4, "invalid": 5}.get(str(status), 6)


def find_summaries(targets: Sequence[Path]) -> list[Path]:
    """The shard summaries in each folder (summary.shard-I-of-N.json), and files named directly."""
    found: dict[Path, Path] = {}
    for target in targets:
        if target.is_dir():
            paths = sorted(target.glob(SUMMARY_GLOB))
            if not paths:
                raise ValueError(f"{target}: no {SUMMARY_GLOB} in this folder; pass the folder the shards wrote their summaries to, or the files")
        elif target.is_file():
            paths = [target]
        else:
            raise ValueError(f"{target} does not exist")
        for path in paths:
            found.setdefault(path.resolve(), path)
    return list(found.values())


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise ValueError(f"{path} is not a bernini summary: it has no 'cases' list")
    return data


def _time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except (TypeError, ValueError):
        return None


def merge_summaries(paths: Sequence[Path]) -> dict[str, Any]:
    """One summary of many shards': every case once, counts and exit code recomputed, the shards listed."""
    loaded = [(path, _load(path)) for path in paths]
    counts_of_shards = sorted({s["shard"]["count"] for _, s in loaded if isinstance(s.get("shard"), dict) and "count" in s["shard"]})
    if len(counts_of_shards) > 1:
        raise ValueError(f"the summaries come from runs of {' and '.join(map(str, counts_of_shards))} shards; merge the files of one run by name")
    loaded.sort(key=lambda item: ((item[1].get("shard") or {}).get("index", -1), str(item[0])))
    cases: dict[tuple[str, str], dict[str, Any]] = {}  # insertion order: first seen; a better record keeps the place
    for _, summary in loaded:
        for record in summary["cases"]:
            key = (str(record.get("source")), str(record.get("name")))
            if key not in cases or _rank(record) < _rank(cases[key]):
                cases[key] = record
    fields = {f.name for f in dataclasses.fields(CaseRecord)}
    records = [CaseRecord(**{k: v for k, v in r.items() if k in fields}) for r in cases.values()]
    shards = [{"summary": str(path), **(s.get("shard") or {}), "complete": s.get("complete"), "exit_code": s.get("exit_code"),
               "counts": s.get("counts"), "started": s.get("started"), "finished": s.get("finished")} for path, s in loaded]
    present = {s["index"] for s in shards if "index" in s}
    missing = [i for i in range(counts_of_shards[0]) if i not in present] if counts_of_shards else []
    complete = not missing and all(s.get("complete") for _, s in loaded)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    code = exit_code(records)
    starts = [t for t in (_time(s.get("started")) for _, s in loaded) if t]
    ends = [t for t in (_time(s.get("finished")) for _, s in loaded) if t]
    merged: dict[str, Any] = {
        "summary_version": loaded[0][1].get("summary_version"),
        "complete": complete,
        "started": min(starts).isoformat() if starts else None,
        "finished": max(ends).isoformat() if ends and complete else None,
        "seconds": (max(ends) - min(starts)).total_seconds() if starts and ends and complete else None,
        "exit_code": max(code, 1) if not complete else code,  # a missing or unfinished shard is never "all ok"
        "counts": counts,
    }
    for key in ("settings", "runtime"):
        values = [s.get(key) for _, s in loaded]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            log.warning("the shards ran with different %s; the merged summary leaves them out (each shard's summary has its own)", key)
    merged.update(shards=shards, missing_shards=missing, cases=[r.to_dict() for r in records])
    return merged


def build_parser(prog: str = "python -m bernini summary") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Summaries of batches split across jobs.")
    commands = p.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the shards' summaries into one summary.json")
    merge.add_argument("targets", nargs="+", type=Path, metavar="DIR", help=f"folders holding {SUMMARY_GLOB} files, or summary files")
    merge.add_argument("-o", "--output", type=Path, help="where the merged summary goes (default: summary.json in the first DIR)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`summary merge DIR... [-o OUT]`: prints the merged summary's path; exit code that of the merged batch (2: no merge)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = find_summaries(args.targets)
        merged = merge_summaries(paths)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    first = args.targets[0]
    out = args.output or (first if first.is_dir() else first.parent) / "summary.json"
    write_json_atomic(out, merged)
    if merged["missing_shards"] or not merged["complete"]:
        log.warning("incomplete: missing shard(s) %s; unfinished shard summaries: %s", merged["missing_shards"] or "none",
                    [s["summary"] for s in merged["shards"] if not s["complete"]] or "none")
    log.info("merged %d summar%s: %d case(s) %s", len(paths), "y" if len(paths) == 1 else "ies", len(merged["cases"]), merged["counts"])
    print(out)
    return int(merged["exit_code"])
