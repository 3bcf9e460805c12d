"""Batches split across jobs: the share, array-job variables, claim files, summary merge, and the CLI end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bernini import claims as claims_module
from bernini import main as entry
from bernini.cases import Case
from bernini.claims import Claim, Claims, Owner, claim_path
from bernini.plan import CasePlan
from bernini.runner import CaseRecord
from bernini.shard import Shard, ShardRun, find_summaries, merge_summaries, parse_shard, resolve_shard, shard_from_env, share

REPO = Path(__file__).resolve().parent.parent
TINY = ["--num_inference_steps", "2", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5", "--device", "cpu", "--dtype", "float32"]
SCHEDULER_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP",
                  "SLURM_JOB_ID", "SLURM_PROCID", "JOB_COMPLETION_INDEX", "BERNINI_SHARD_COUNT", "BERNINI_JOB_ID")


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the array-job variables themselves; the machine running them must not."""
    for name in SCHEDULER_VARS:
        monkeypatch.delenv(name, raising=False)


def clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in SCHEDULER_VARS}, "OMP_NUM_THREADS": "1"}


# ---- the shard spec and the array-job variables ----


def test_parse_shard() -> None:
    assert parse_shard("0/2") == Shard(0, 2, "--shard 0/2") and parse_shard("3/4").index == 3
    assert parse_shard("none") is None and parse_shard("NONE") is None
    assert parse_shard("1/2").label == "shard-1-of-2"
    for bad, says in (("2/2", "must be below COUNT"), ("0/0", "COUNT >= 1"), ("-1/2", "INDEX/COUNT"), ("1", "INDEX/COUNT"), ("a/b", "INDEX/COUNT")):
        with pytest.raises(ValueError, match=says):
            parse_shard(bad)


def test_slurm_array_variables() -> None:
    # sbatch --array=5-8: task 7 is the third of four
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8", "SLURM_ARRAY_TASK_COUNT": "4"}
    found = shard_from_env(env)
    assert found is not None and (found.index, found.count) == (2, 4) and "SLURM_ARRAY_TASK_ID=7" in found.origin
    # --array=1-7:2 (1, 3, 5, 7): task 5 is the third of four
    stepped = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"}
    assert (shard_from_env(stepped).index, shard_from_env(stepped).count) == (2, 4)  # type: ignore[union-attr]
    # --array=1,3,4: not evenly spaced, so task ids do not map to shares
    with pytest.raises(ValueError, match="evenly spaced"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT is not set"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0"})
    with pytest.raises(ValueError, match="is not an integer"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"})


def test_kubernetes_indexed_job_variables(caplog: pytest.LogCaptureFixture) -> None:
    found = shard_from_env({"JOB_COMPLETION_INDEX": "3", "BERNINI_SHARD_COUNT": "5"})
    assert found is not None and (found.index, found.count) == (3, 5)
    with pytest.raises(ValueError, match="must be below COUNT"):
        shard_from_env({"JOB_COMPLETION_INDEX": "5", "BERNINI_SHARD_COUNT": "5"})
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX is not set"):
        shard_from_env({"BERNINI_SHARD_COUNT": "5"})
    assert shard_from_env({"JOB_COMPLETION_INDEX": "3"}) is None  # Kubernetes gives no count: the whole batch, said loudly
    assert "BERNINI_SHARD_COUNT is not" in caplog.text
    assert shard_from_env({"PATH": "/bin"}) is None


def test_flag_wins_over_the_environment() -> None:
    env = {"JOB_COMPLETION_INDEX": "1", "BERNINI_SHARD_COUNT": "2"}
    assert resolve_shard(None, env) == Shard(1, 2, "JOB_COMPLETION_INDEX=1, BERNINI_SHARD_COUNT=2")
    assert resolve_shard("0/3", env) == Shard(0, 3, "--shard 0/3")
    assert resolve_shard("none", env) is None


# ---- the share ----


def planned_with(costs: dict[str, int], root: Path = Path("/out")) -> list[tuple[Case, CasePlan]]:
    """Cases named by the keys whose plans cost tokens + tokens^2 / 20000 (one pass, one step)."""
    items = []
    for name, tokens in costs.items():
        output = root / f"{name}.mp4"
        case = Case(name, f"/cases/{name}.json", "t2v", "p", output=output)
        items.append((case, CasePlan(name, "t2v", "t2v", 5, 48, 32, 16.0, (2, 2, 3), str(output), (), 1, (tokens,), 1)))
    return items


def names(planned: list[tuple[Case, CasePlan]]) -> list[str]:
    return [c.name for c, _ in planned]


def test_share_by_hand() -> None:
    # Costs 512.5, 408, 304.5 x3; largest first onto the lighter shard: a->0, b->1, c->1 (712.5), d->0 (817), e->1 (1017).
    planned = planned_with({"a": 500, "b": 400, "c": 300, "d": 300, "e": 300})
    assert names(share(planned, Shard(0, 2))) == ["a", "d"]
    assert names(share(planned, Shard(1, 2))) == ["b", "c", "e"]
    assert names(share(planned, Shard(0, 1))) == names(planned)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 20])
def test_share_covers_every_case_once_and_balances(count: int) -> None:
    rng = random.Random(count)
    planned = planned_with({f"case{i:02d}": rng.randrange(50, 5000) for i in range(13)})
    shares = [share(planned, Shard(i, count)) for i in range(count)]
    together = [name for part in shares for name in names(part)]
    assert sorted(together) == sorted(names(planned))  # every case, none twice
    for part in shares:  # each share keeps the batch's order
        assert names(part) == [n for n in names(planned) if n in set(names(part))]
    # Greedy onto the lightest shard: the heaviest and lightest shares differ by at most one case's cost.
    loads = [sum(p.cost for _, p in part) for part in shares]
    assert max(loads) - min(loads) <= max(p.cost for _, p in planned) + 1e-9
    # The same answer whatever order a job lists the cases in.
    shuffled = planned[:]
    rng.shuffle(shuffled)
    assert [sorted(names(share(shuffled, Shard(i, count)))) for i in range(count)] == [sorted(names(part)) for part in shares]


def test_equal_costs_split_evenly_and_stably() -> None:
    planned = planned_with({f"c{i}": 1000 for i in range(10)})
    parts = [names(share(planned, Shard(i, 3))) for i in range(3)]
    assert sorted(map(len, parts)) == [3, 3, 4]
    assert parts == [names(share(list(reversed(planned)), Shard(i, 3)))[::-1] for i in range(3)]


# ---- claims ----

RACER = """
import sys, time
from pathlib import Path
from bernini.claims import Claims
output, folder, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
claims = Claims()
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
print("won" if claims.take(output) is None else "lost", flush=True)
while not (folder / "done").exists():  # stay alive: a dead winner's claim would rightly be stale
    time.sleep(0.01)
"""


def race(output: Path, folder: Path, racers: int = 6) -> list[str]:
    """Start `racers` processes that each try to claim `output` at the same moment; their answers."""
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(output), str(folder), str(i)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, text=True)
             for i in range(racers)]
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("ready-*"))) < racers and time.monotonic() < deadline:
            time.sleep(0.01)
        (folder / "go").touch()
        answers = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
    finally:
        (folder / "done").touch()
        for p in procs:
            p.wait(timeout=60)
    return answers


def test_racing_jobs_one_claim(tmp_path: Path) -> None:
    output = tmp_path / "out" / "case.mp4"
    answers = race(output, tmp_path)
    assert sorted(answers) == ["lost"] * 5 + ["won"]


def test_racing_jobs_take_over_a_stale_claim_once(tmp_path: Path) -> None:
    output = tmp_path / "out" / "case.mp4"
    output.parent.mkdir()
    gone = Claim(Owner("a-node-that-died", 4242), "old", time.time() - 3600, time.time() - 3600)
    claim_path(output).write_bytes(gone.to_bytes())
    answers = race(output, tmp_path)
    assert sorted(answers) == ["lost"] * 5 + ["won"]
    assert Claim.read(claim_path(output)).token != "old"  # type: ignore[union-attr]


def claim_by(output: Path, owner: Owner, age: float = 0.0) -> Claim:
    output.parent.mkdir(parents=True, exist_ok=True)
    then = time.time() - age
    claim = Claim(owner, "theirs", then, then)
    claim_path(output).write_bytes(claim.to_bytes())
    return claim


def test_stale_claims_are_taken_over(tmp_path: Path) -> None:
    me = Owner.current()
    claims = Claims(Owner(me.host, me.pid, "slurm-77.0", me.pidns), stale_after=300)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    cases = {
        "dead_pid_here": (Owner(me.host, int(dead.stdout), "", me.pidns), 0.0),
        "not_refreshed": (Owner("other-node", 4242), 301.0),
        "earlier_attempt_of_this_job": (Owner("other-node", 4242, "slurm-77.0"), 0.0),
    }
    for name, (owner, age) in cases.items():
        output = tmp_path / f"{name}.mp4"
        claim_by(output, owner, age)
        assert claims.take(output) is None, name
        assert Claim.read(claim_path(output)).owner == claims.owner, name  # type: ignore[union-attr]


def test_live_claims_are_respected(tmp_path: Path) -> None:
    me = Owner.current()
    claims = Claims(me, stale_after=300)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        cases = {
            "live_pid_here": Owner(me.host, alive.pid, "", me.pidns),
            "fresh_elsewhere": Owner("other-node", 4242),
            "another_job": Owner("other-node", 4242, "slurm-78.0"),
        }
        for name, owner in cases.items():
            output = tmp_path / f"{name}.mp4"
            theirs = claim_by(output, owner, age=10)
            held = claims.take(output)
            assert held is not None and held.owner == owner, name
            assert Claim.read(claim_path(output)) == theirs, name  # untouched
        # A claim being written (not yet readable) is live until it is old.
        partial = tmp_path / "partial.mp4"
        claim_path(partial).write_bytes(b'{"host": ')
        assert claims.take(partial) is not None
        os.utime(claim_path(partial), (time.time() - 400, time.time() - 400))
        assert claims.take(partial) is None
    finally:
        alive.kill()
        alive.wait()


def wait_for(condition: Any, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_claim_refreshed_while_held_and_released_after(tmp_path: Path) -> None:
    output = tmp_path / "case.mp4"
    claims = Claims(refresh_every=0.05)
    with claims.hold(output) as other:
        assert other is None
        first = Claim.read(claim_path(output))
        assert first is not None and first.owner == claims.owner
        assert wait_for(lambda: Claim.read(claim_path(output)).refreshed > first.refreshed)  # type: ignore[union-attr]
        assert Claim.read(claim_path(output)).token == first.token  # type: ignore[union-attr]
    assert not claim_path(output).exists() and not list(tmp_path.glob("*.lock"))


def test_a_claim_taken_over_is_not_refreshed_or_released(tmp_path: Path) -> None:
    output = tmp_path / "case.mp4"
    claims = Claims()
    assert claims.take(output) is None
    theirs = claim_by(output, Owner("other-node", 4242))  # it was judged stale elsewhere and replaced
    assert claims.refresh(output) is False
    claims.release(output)
    assert Claim.read(claim_path(output)) == theirs


def test_hold_yields_the_holder_and_leaves_its_claim(tmp_path: Path) -> None:
    output = tmp_path / "case.mp4"
    theirs = claim_by(output, Owner("other-node", 4242))
    with Claims().hold(output) as other:
        assert other == theirs
    assert Claim.read(claim_path(output)) == theirs


def test_job_ids() -> None:
    assert claims_module.job_id({}) == ""
    assert claims_module.job_id({"SLURM_JOB_ID": "991"}) == "slurm-991.0"
    assert claims_module.job_id({"SLURM_JOB_ID": "991", "SLURM_PROCID": "3"}) == "slurm-991.3"
    assert claims_module.job_id({"SLURM_JOB_ID": "991", "BERNINI_JOB_ID": "render-7"}) == "render-7"


# ---- a case under its claim ----


def test_shard_run_renders_under_the_claim(tmp_path: Path) -> None:
    [(case, plan)] = planned_with({"a": 100}, tmp_path)
    run = ShardRun(Shard(0, 1), Claims(), 1, 1)
    seen: list[Claim | None] = []

    def render() -> CaseRecord:
        seen.append(Claim.read(claim_path(Path(plan.output))))
        return CaseRecord(case.name, case.source, "ok", output=plan.output)

    assert run.run(case, plan, render, lambda: False).status == "ok"
    assert seen[0] is not None and seen[0].owner == run.claims.owner  # held while rendering
    assert not claim_path(Path(plan.output)).exists()  # released once written

    done = run.run(case, plan, render, lambda: True)  # another job finished it before we got the claim
    assert (done.status, done.error, len(seen)) == ("skipped", None, 1)

    claim_by(Path(plan.output), Owner("other-node", 4242, "slurm-5.0"))
    held = run.run(case, plan, render, lambda: False)
    assert held.status == "skipped" and "host other-node pid 4242 (job slurm-5.0)" in held.error and len(seen) == 1  # type: ignore[operator]

    (tmp_path / "a_file").write_text("")
    [(case, plan)] = planned_with({"b": 100}, tmp_path / "a_file")  # no claim can be made inside a file
    failed = run.run(case, plan, render, lambda: False)
    assert failed.status == "failed" and "cannot create the claim file" in failed.error and len(seen) == 1  # type: ignore[operator]


# ---- summary merge ----


def shard_summary(index: int, count: int, cases: list[dict[str, Any]], complete: bool = True) -> dict[str, Any]:
    return {"summary_version": 1, "complete": complete, "started": f"2026-12-01T10:0{index}:00+00:00", "finished": f"2026-12-01T10:1{index}:00+00:00" if complete else None,
            "settings": {"seed": 42}, "runtime": {"dtype": "bfloat16"}, "exit_code": None, "counts": {},
            "shard": {"index": index, "count": count, "cases": len(cases)}, "cases": cases}


def rec(name: str, status: str, error: str | None = None) -> dict[str, Any]:
    return {"name": name, "source": f"/cases/{name}.json", "status": status, "output": f"/out/{name}.mp4", "error": error}


def write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"summary.shard-{data['shard']['index']}-of-{data['shard']['count']}.json"
    path.write_text(json.dumps(data))
    return path


def test_merge_lists_every_case_once(tmp_path: Path) -> None:
    bad = {"name": "/cases/bad.json", "source": "/cases/bad.json", "status": "invalid", "error": "key 'prompt': required"}
    write(tmp_path, shard_summary(0, 3, [bad, rec("a", "ok"), rec("b", "failed", "non-finite")]))
    write(tmp_path, shard_summary(1, 3, [rec("c", "ok"), rec("d", "skipped")]))
    write(tmp_path, shard_summary(2, 3, []))
    merged = merge_summaries(find_summaries([tmp_path]))
    assert [c["name"] for c in merged["cases"]] == ["/cases/bad.json", "a", "b", "c", "d"]
    assert merged["counts"] == {"invalid": 1, "ok": 2, "failed": 1, "skipped": 1} and merged["exit_code"] == 1
    assert [s["index"] for s in merged["shards"]] == [0, 1, 2] and merged["missing_shards"] == [] and merged["complete"]
    assert merged["started"] == "2026-12-01T10:00:00+00:00" and merged["finished"] == "2026-12-01T10:12:00+00:00" and merged["seconds"] == 720
    assert merged["settings"] == {"seed": 42}


def test_merge_of_duplicates_keeps_the_record_that_says_most(tmp_path: Path) -> None:
    # Two jobs ran shard 0 (a re-queue beside a straggler): one rendered what the other skipped or lost.
    first = shard_summary(0, 1, [rec("a", "skipped", "claimed by another job: host n2 pid 7"), rec("b", "ok"), rec("c", "not_run", "interrupted"), rec("d", "failed", "x")])
    second = shard_summary(0, 1, [rec("a", "failed", "non-finite"), rec("b", "skipped"), rec("c", "skipped"), rec("d", "skipped")])
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    for path, data in zip(paths, (first, second)):
        path.write_text(json.dumps(data))
    merged = merge_summaries(find_summaries(paths))
    assert {c["name"]: c["status"] for c in merged["cases"]} == {"a": "failed", "b": "ok", "c": "skipped", "d": "skipped"}
    assert merged["exit_code"] == 1 and len(merged["shards"]) == 2


def test_merge_says_what_is_missing(tmp_path: Path) -> None:
    write(tmp_path, shard_summary(0, 3, [rec("a", "ok")]))
    write(tmp_path, shard_summary(2, 3, [rec("c", "ok")], complete=False))
    merged = merge_summaries(find_summaries([tmp_path]))
    assert merged["missing_shards"] == [1] and not merged["complete"]
    assert merged["exit_code"] == 1 and merged["finished"] is None  # every listed case ok, but the batch is not known to be


def test_merge_refuses_mixed_runs_and_non_summaries(tmp_path: Path) -> None:
    write(tmp_path, shard_summary(0, 2, []))
    write(tmp_path, shard_summary(1, 4, []))
    with pytest.raises(ValueError, match="runs of 2 and 4 shards"):
        merge_summaries(find_summaries([tmp_path]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no summary.shard-"):
        find_summaries([tmp_path / "empty"])
    with pytest.raises(ValueError, match="nowhere does not exist"):
        find_summaries([tmp_path / "nowhere"])
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="x.json is not a bernini summary"):
        merge_summaries([tmp_path / "x.json"])


# ---- the CLI ----


def write_cases(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        task = "t2v" if i % 2 else "t2i"
        (folder / f"case{i}.json").write_text(json.dumps({"task_type": task, "prompt": f"scene number {i}"}))
    return folder


def test_array_variables_pick_the_share_in_a_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cases = write_cases(tmp_path / "cases")
    (cases / "broken.json").write_text(json.dumps({"task_type": "t2v"}))
    everything = {f"case{i}" for i in range(6)}
    listed: dict[int, set[str]] = {}
    for task in (10, 11, 12):  # sbatch --array=10-12
        for name, value in {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": 10, "SLURM_ARRAY_TASK_MAX": 12, "SLURM_ARRAY_TASK_COUNT": 3}.items():
            monkeypatch.setenv(name, str(value))
        code = entry.main(["--config", "unused", "--case", str(cases), "--output_dir", str(tmp_path / "out"), "--dry-run", *TINY])
        out = capsys.readouterr().out
        listed[task - 10] = {line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in everything}
        assert ("INVALID" in out) == (task == 10), "shard 0 alone reports the invalid cases"
        assert code == (1 if task == 10 else 0)
    assert sorted(n for part in listed.values() for n in part) == sorted(everything)
    assert not (tmp_path / "out").exists()


def test_an_empty_share_is_done_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = write_cases(tmp_path / "cases", count=1)
    code = entry.main(["--config", "unused", "--case", str(cases), "--output_dir", str(tmp_path / "out"), "--shard", "1/2", *TINY])
    summary = tmp_path / "out" / "summary.shard-1-of-2.json"
    assert code == 0 and capsys.readouterr().out.strip() == str(summary)
    data = json.loads(summary.read_text())
    assert data["cases"] == [] and data["exit_code"] == 0 and data["shard"]["index"] == 1 and data["shard"]["batch_cases"] == 1


def start(config: str, cases: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bernini", "run", "--config", config, "--case", str(cases), "--output_dir", str(out), "--log-format", "json", *extra, *TINY],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[str, set[str]]:
    """Wait; the summary path it printed and the cases it rendered (from its case_end events)."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    rendered = [e["case"] for e in events if e.get("event") == "case_end" and e.get("status") == "ok"]
    assert len(rendered) == len(set(rendered))
    return stdout.strip(), set(rendered)


def merge(*targets: Path) -> tuple[int, Path, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "bernini", "summary", "merge", *map(str, targets)], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    path = Path(proc.stdout.strip())
    return proc.returncode, path, json.loads(path.read_text())


def assert_written_once(out: Path, cases: list[str]) -> None:
    for name in cases:
        output = out / (f"{name}.png" if int(name[-1]) % 2 == 0 else f"{name}.mp4")
        assert output.is_file() and Path(f"{output}.json").is_file(), name
    assert not list(out.glob("*.claim")) and not list(out.glob("*.lock")) and not list(out.glob(".*tmp*"))


def test_two_shards_in_two_concurrent_jobs(config: str, tmp_path: Path) -> None:
    cases, out = write_cases(tmp_path / "cases"), tmp_path / "out"
    jobs = [start(config, cases, out, "--shard", f"{i}/2") for i in range(2)]
    (first, mine0), (second, mine1) = finish(jobs[0]), finish(jobs[1])
    everything = [f"case{i}" for i in range(6)]
    assert not mine0 & mine1 and sorted(mine0 | mine1) == everything  # each case rendered exactly once
    assert (first, second) == (str(out / "summary.shard-0-of-2.json"), str(out / "summary.shard-1-of-2.json"))
    for path, mine in ((first, mine0), (second, mine1)):
        data = json.loads(Path(path).read_text())
        assert {c["name"] for c in data["cases"]} == mine and data["shard"]["batch_cases"] == 6
    assert_written_once(out, everything)
    code, path, merged = merge(out)
    assert code == 0 and path == out / "summary.json"
    assert sorted(c["name"] for c in merged["cases"]) == everything and merged["counts"] == {"ok": 6}
    assert [s["index"] for s in merged["shards"]] == [0, 1] and merged["complete"] and merged["exit_code"] == 0


def test_two_concurrent_jobs_on_the_same_shard_render_no_case_twice(config: str, tmp_path: Path) -> None:
    cases, out = write_cases(tmp_path / "cases"), tmp_path / "out"
    jobs = [start(config, cases, out, "--shard", "0/1", "--summary", str(tmp_path / f"job{i}.json")) for i in range(2)]
    (_, mine0), (_, mine1) = finish(jobs[0]), finish(jobs[1])
    everything = [f"case{i}" for i in range(6)]
    assert not mine0 & mine1 and sorted(mine0 | mine1) == everything
    for i, mine in enumerate((mine0, mine1)):  # what a job did not render it lists as skipped (claimed, or found complete)
        data = json.loads((tmp_path / f"job{i}.json").read_text())
        assert {c["name"]: c["status"] for c in data["cases"]} == {n: "ok" if n in mine else "skipped" for n in everything}
    assert_written_once(out, everything)
    code, _path, merged = merge(tmp_path / "job0.json", tmp_path / "job1.json")
    assert code == 0 and sorted(c["name"] for c in merged["cases"]) == everything and merged["counts"] == {"ok": 6}
