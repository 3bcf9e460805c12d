"""Multi-GPU machinery on CPU: topology rules, placement, and torchrun (gloo) runs against one process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import free_port

from bernini.guidance import I_C, I_U, NONE_C, NONE_U, V_U, VI_C, VI_U
from bernini.parallel import CfgPasses, LaunchEnv, Topology, assign_cases, assign_passes, balance, build_topology
from bernini.parallel.status import GroupStatus
from bernini.parallel.ulysses import pad_sequence, padded_length
from bernini.sampling import LocalPasses

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "dist"
CASES = ROOT / "assets" / "testcases"
# v2v_apg with two source videos (165 tokens), rv2v (45/90/110), r2v_apg (45/105): odd lengths, uneven padding.
LATENT_CASES = [CASES / "rv2v" / "rv2v_case2.json", CASES / "rv2v" / "rv2v_case1.json", CASES / "r2v" / "r2v.json"]
TINY_FLAGS = ["--device", "cpu", "--dtype", "float32", "--num_inference_steps", "3", "--height", "32", "--width", "48", "--max_image_size", "64", "--num_frames", "5"]


def env(world: int, local_world: int, rank: int = 0) -> LaunchEnv:
    return LaunchEnv(rank, rank % local_world, world, local_world, rank // local_world, torchrun=True)


# ---------------------------------------------------------------- topology


def test_topology_layout_keeps_model_groups_consecutive() -> None:
    topo = build_topology(env(8, 8, rank=6), ulysses=2, cfg=2, heads=40)
    assert (topo.dp, topo.dp_index, topo.cfg_index, topo.ulysses_index) == (2, 1, 1, 0)
    assert topo.ulysses_groups() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert topo.cfg_groups() == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert topo.model_groups() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [Topology(r, 8, 2, 2).is_leader for r in range(8)] == [True, False, False, False, True, False, False, False]


def test_topology_two_nodes_never_straddle() -> None:
    for rank in range(8):
        topo = build_topology(env(8, 4, rank), ulysses=2, cfg=1, heads=40)
        for group in topo.model_groups():
            assert len({r // 4 for r in group}) == 1
    assert build_topology(LaunchEnv(), 1, 1, 40).dp == 1  # plain `python`: a world of one


@pytest.mark.parametrize(
    ("launch", "ulysses", "cfg", "heads", "message"),
    [
        (env(2, 2), 0, 1, 40, "--ulysses 0 is invalid: the Ulysses degree must be >= 1"),
        (env(2, 2), 1, 0, 40, "--cfg_parallel 0 is invalid: the CFG-parallel degree must be >= 1"),
        (env(6, 6), 4, 1, 40, "WORLD_SIZE 6 is not a multiple of --cfg_parallel x --ulysses = 1 x 4 = 4"),
        (env(3, 3), 3, 1, 40, "--ulysses 3 does not divide the transformer's 40 attention heads; Ulysses splits heads evenly, choose one of: 1, 2, 4, 5, 8, 10, 20, 40"),
        (env(4, 2), 2, 2, 40, "a model group of --cfg_parallel x --ulysses = 4 ranks does not fit on one node of LOCAL_WORLD_SIZE 2"),
        (env(12, 6), 4, 1, 40, "LOCAL_WORLD_SIZE 6 is not a multiple of the model group size 4 (--cfg_parallel x --ulysses); a model group would straddle two nodes"),
        (env(6, 4), 2, 1, 40, "WORLD_SIZE 6 is not a multiple of LOCAL_WORLD_SIZE 4; run the same number of processes on every node"),
        (LaunchEnv(3, 0, 4, 2, 1, True), 2, 1, 40, "RANK 3 is not GROUP_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK = 1 x 2 + 0"),
    ],
)
def test_topology_validation_errors(launch: LaunchEnv, ulysses: int, cfg: int, heads: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build_topology(launch, ulysses, cfg, heads)
    assert message in str(info.value)


def test_heads_unknown_skips_only_the_head_rule() -> None:
    assert build_topology(env(3, 3), 3, 1, None).ulysses == 3  # --dry-run: no checkpoint is read


def test_launch_env_from_torchrun_variables() -> None:
    got = LaunchEnv.from_environ({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert got == LaunchEnv(5, 1, 8, 4, 1, True)
    assert LaunchEnv.from_environ({}) == LaunchEnv()
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers"):
        LaunchEnv.from_environ({"RANK": "x", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------- placement


def test_balance_is_longest_first_and_deterministic() -> None:
    assert balance([1, 5, 3, 3, 2], 2) == [1, 0, 1, 1, 0]  # 5+2 | 3+3+1
    assert balance([4.0, 4.0], 3) == [0, 1]
    assert balance([], 2) == []


def test_assign_passes_balances_rv2v_lengths() -> None:
    work = [(NONE_U, 45), (V_U, 90), (VI_U, 110), (VI_C, 110)]
    table = assign_passes(work, 2)
    assert table == [[V_U, VI_U], [NONE_U, VI_C]]  # 200 vs 155 tokens; VI·u and VI·c never share a group
    assert assign_passes([(NONE_U, 45), (I_U, 105), (I_C, 105)], 2) == [[NONE_U, I_U], [I_C]]
    assert assign_passes([(VI_U, 9), (VI_C, 9)], 4) == [[VI_U], [VI_C], [], []]


def test_cfg_of_one_is_local_passes() -> None:
    work = [(NONE_U, 12), (NONE_C, 12)]
    passes = CfgPasses(1, 0, None, torch.device("cpu"), torch.float32)
    assert passes.select(work) == LocalPasses().select(work)
    preds = {NONE_U: torch.zeros(1, 12, 4), NONE_C: torch.ones(1, 12, 4)}
    assert passes.exchange(preds, (NONE_U, NONE_C)) is preds
    with pytest.raises(ValueError, match="CFG parallel of 2 groups needs a process group"):
        CfgPasses(2, 0, None, torch.device("cpu"), torch.float32)


def test_assign_cases_by_cost_not_round_robin() -> None:
    class Plan:
        def __init__(self, cost: float) -> None:
            self.cost = cost

    shares = assign_cases([Plan(c) for c in (10, 1, 1, 9, 1)], 2)  # type: ignore[misc]
    assert shares == [[0, 2], [1, 3, 4]]  # 11 vs 11; round-robin would give 12 vs 10


def test_a_rank_plans_memory_for_its_share_of_the_forward() -> None:
    from bernini.parallel.world import member_workload
    from bernini.plan import CasePlan, MediaPlan

    src = MediaPlan("s.mp4", "video", 81, 848, 480, (21, 30, 53))
    v2v = CasePlan("c", "v2v", "v2v_apg", 81, 848, 480, 16.0, (21, 30, 53), "o.mp4", (src,), 2, (66780, 66780), 40)
    whole = member_workload([v2v], Topology(0, 1, 1, 1), batch_passes=True)
    assert (whole.tokens, whole.unbatched_tokens) == (133560, 66780)
    ulysses = member_workload([v2v], Topology(0, 4, 4, 1), batch_passes=True)  # every sequence split 4 ways
    assert (ulysses.tokens, ulysses.unbatched_tokens) == (33390, 16695)
    cfg = member_workload([v2v], Topology(0, 4, 2, 2), batch_passes=True)  # one pass per CFG rank, split 2 ways
    assert (cfg.tokens, cfg.unbatched_tokens) == (33390, 33390) and cfg.pixels == whole.pixels


def test_pad_and_unpad() -> None:
    assert [padded_length(n, 4) for n in (1, 4, 5, 45)] == [4, 4, 8, 48]
    x = torch.arange(10.0).reshape(1, 5, 2)
    padded = pad_sequence(x, 8)
    assert padded.shape == (1, 8, 2) and torch.equal(padded[:, :5], x) and not padded[:, 5:].any()
    assert pad_sequence(x, 5) is x


def test_group_status_of_one_needs_no_collective() -> None:
    status = GroupStatus(None, 1)  # type: ignore[arg-type]
    assert status.errors("boom") == ["boom"] and status.any(True) and not status.any(False)
    assert GroupStatus.first([None, "RuntimeError: x"]) == "rank 1: RuntimeError: x"


# ---------------------------------------------------------------- torchrun helpers



def torchrun(nproc: int, script: Path | str, *args: str, rdzv: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *(rdzv or ["--standalone"]), "--nproc-per-node", str(nproc), str(script), *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(commands: list[list[str]], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start every command at once (own process groups) and wait; a hang kills them and fails the test."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) for c in commands]
    done = []
    try:
        for proc, command in zip(procs, commands):
            out, _ = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(command, proc.returncode, out, ""))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a torchrun launch did not finish in {timeout} s (hang?): {commands}")
    return done


def run_ok(commands: list[list[str]], timeout: float = 120) -> list[str]:
    results = launch(commands, timeout)
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    return [r.stdout for r in results]


@pytest.fixture(scope="module")
def tiny() -> Path:
    from bernini.testing import tiny_checkpoints

    return tiny_checkpoints().diffusers


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final latents of one process (no distributed at all), rendered in this test process."""
    sys.path.insert(0, str(DIST))
    try:
        from render_latents import SETTINGS
    finally:
        sys.path.remove(str(DIST))
    from bernini.cases import load_case_file
    from bernini.config import RuntimeConfig
    from bernini.pipeline import Placement, Renderer, resolve_sources
    from bernini.plan import plan_case

    renderer = Renderer.load(resolve_sources(str(tiny)), RuntimeConfig(device="cpu", dtype="float32"), placement=Placement(decodes=False))
    latents = {}
    for path in LATENT_CASES:
        case = load_case_file(path)
        latents[case.name] = renderer.render(case, SETTINGS, plan=plan_case(case, SETTINGS)).latent
    return latents


def parallel_latents(tiny: Path, out: Path, nproc: int, *flags: str) -> dict[str, dict]:
    out.mkdir(parents=True)
    run_ok([torchrun(nproc, DIST / "render_latents.py", "--config", str(tiny), "--out", str(out), "--case", *map(str, LATENT_CASES), *flags)])
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


# ---------------------------------------------------------------- torchrun: numerics


def test_ulysses_attention_and_cfg_exchange_match_one_device() -> None:
    out = run_ok([torchrun(4, DIST / "exchange.py", "--ulysses", "2", "--cfg_parallel", "2")], timeout=60)[0]
    assert sorted(re.findall(r"OK rank (\d)", out)) == ["0", "1", "2", "3"]  # prints of ranks may share a line


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.parametrize("flags", [("--ulysses", "2"), ("--cfg_parallel", "2")], ids=["ulysses2", "cfg2"])
def test_nccl_ulysses_attention_and_cfg_exchange_match_one_device(flags: tuple[str, str]) -> None:
    out = run_ok([torchrun(2, DIST / "exchange.py", "--device", "cuda", *flags)], timeout=120)[0]
    assert sorted(re.findall(r"OK rank (\d)", out)) == ["0", "1"]


@pytest.mark.parametrize(
    ("nproc", "flags", "writers"),
    [
        (2, ("--ulysses", "2"), {0}),
        (2, ("--cfg_parallel", "2"), {0}),
        (2, (), {0, 1}),
        (4, ("--ulysses", "2", "--cfg_parallel", "2"), {0}),
        # The 8-rank layout of issue 9 (2 data-parallel groups of CFG 2 x Ulysses 2), on gloo.
        (8, ("--ulysses", "2", "--cfg_parallel", "2"), {0, 4}),
    ],
    ids=["ulysses2", "cfg2", "data2", "cfg2xulysses2", "8ranks-dp2xcfg2xulysses2"],
)
def test_parallel_latents_match_one_process(tiny: Path, reference: dict, tmp_path: Path, nproc: int, flags: tuple, writers: set) -> None:
    got = parallel_latents(tiny, tmp_path / "latents", nproc, *flags)
    assert set(got) == set(reference)  # every case once (files are created exclusively)
    assert {g["rank"] for g in got.values()} == writers  # only group leaders write; data parallel uses both
    for name, ref in reference.items():
        torch.testing.assert_close(got[name]["latent"], ref, rtol=0, atol=1e-5, msg=f"{name} {flags}")


# ---------------------------------------------------------------- torchrun: the batch driver


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_data_parallel_batch_writes_every_case_once(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--config", str(tiny), "--case", str(CASES), *TINY_FLAGS, "--output_dir", str(out)]
    log = run_ok([torchrun(2, ROOT / "infer_multi_gpu.py", *args)])[0]
    summary = summary_of(out)
    assert summary["counts"] == {"ok": 8} and summary["exit_code"] == 0 and summary["complete"] is True
    assert summary["parallel"] == {"world_size": 2, "data_parallel": 2, "cfg_parallel": 1, "ulysses": 1}
    assert len(summary["cases"]) == 8 and all(Path(c["output"]).is_file() for c in summary["cases"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*(Path(c["output"]).name for c in summary["cases"]), *(Path(c["output"]).name + ".json" for c in summary["cases"]), "summary.json"])
    assert log.count("[rank 1]") > 0 and log.count(": ok -> ") == 8  # both groups rendered, each case once
    again = run_ok([torchrun(2, ROOT / "infer_multi_gpu.py", *args, "--skip-existing")])[0]
    assert summary_of(out)["counts"] == {"skipped": 8} and "models loaded" not in again


def test_two_nodes_split_the_batch_and_groups_stay_inside_a_node(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    port = free_port()
    args = ["--config", str(tiny), "--case", str(CASES / "v2v"), str(CASES / "rv2v"), str(CASES / "t2v"), *TINY_FLAGS, "--output_dir", str(out), "--ulysses", "2", "--verbose"]
    commands = [
        torchrun(2, ROOT / "infer_multi_gpu.py", *args, rdzv=["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)])
        for node in (0, 1)
    ]
    logs = run_ok(commands, timeout=150)
    summary = summary_of(out)
    assert summary["counts"] == {"ok": 5} and summary["exit_code"] == 0
    assert summary["parallel"] == {"world_size": 4, "data_parallel": 2, "cfg_parallel": 1, "ulysses": 2}
    assert all(Path(c["output"]).is_file() and Path(c["output"] + ".json").is_file() for c in summary["cases"])
    placed = [tuple(map(int, m)) for log in logs for m in re.findall(r"rank (\d+) on node (\d+) \(local rank \d+\): model group (\d+)", log)]
    assert sorted(placed) == [(0, 0, 0), (1, 0, 0), (2, 1, 1), (3, 1, 1)]  # (rank, node, model group): no group spans nodes
    writes = [line for log in logs for line in log.splitlines() if "bernini.media: wrote" in line]
    assert len(writes) == 5 and not any("[rank 1]" in w or "[rank 3]" in w for w in writes)  # one writer per group
    assert any("bernini.media: wrote" in line for line in logs[0].splitlines()) and any("bernini.media: wrote" in line for line in logs[1].splitlines())


def test_dry_run_prints_the_plan_and_group_shares_once(tiny: Path, tmp_path: Path) -> None:
    args = ["--config", str(tiny), "--case", str(CASES), *TINY_FLAGS, "--output_dir", str(tmp_path), "--dry-run"]
    out = run_ok([torchrun(2, ROOT / "infer_multi_gpu.py", *args)], timeout=60)[0]
    assert out.count("8 case(s) ready, 0 invalid") == 1
    assert "model group 0 (ranks 0-0)" in out and "model group 1 (ranks 1-1)" in out
    assert not (tmp_path / "summary.json").exists() and "models loaded" not in out


def test_bad_degrees_stop_every_rank_before_any_collective(tiny: Path, tmp_path: Path) -> None:
    args = ["--config", str(tiny), "--case", str(CASES / "t2v"), *TINY_FLAGS, "--output_dir", str(tmp_path), "--ulysses", "2", "--cfg_parallel", "2"]
    # The two ranks started as torchrun starts them, but without torchrun: it ends the other workers as soon as one
    # exits, so whether the slower rank got to say why was a race. Each must stop on its own, before any collective
    # (a rank that waited for its peer would hang until the timeout).
    port = free_port()
    commands = [["env", f"RANK={rank}", f"LOCAL_RANK={rank}", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1",
                 f"MASTER_PORT={port}", sys.executable, str(ROOT / "infer_multi_gpu.py"), *args] for rank in (0, 1)]
    results = launch(commands, timeout=60)
    for rank, result in enumerate(results):
        assert result.returncode == 2, result.stdout[-2000:]
        assert "WORLD_SIZE 2 is not a multiple of --cfg_parallel x --ulysses = 2 x 2 = 4" in result.stdout, rank  # each rank says why


def test_failure_on_one_rank_fails_its_case_on_the_whole_group(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["--config", str(tiny), "--case", str(CASES / "v2v"), str(CASES / "t2i"), *TINY_FLAGS, "--output_dir", str(out), "--ulysses", "2"]
    results = launch([torchrun(2, DIST / "fail_on_rank.py", "1", "v2v_case1", str(out), "--", *args)], timeout=120)
    assert results[0].returncode != 0  # torchrun reports the workers' exit code 1
    assert [(out / f"exit_{r}").read_text() for r in (0, 1)] == ["1", "1"]
    summary = summary_of(out)
    status = {c["name"]: (c["status"], c.get("error")) for c in summary["cases"]}
    assert summary["counts"] == {"ok": 2, "failed": 1} and summary["exit_code"] == 1
    assert status["v2v_case1"][0] == "failed" and "rank 1: RuntimeError: injected failure on rank 1" in status["v2v_case1"][1]
    assert status["v2v_case2"][0] == status["t2i"][0] == "ok"
    assert not (out / "v2v_case1.mp4").exists() and (out / "v2v_case2.mp4").is_file()


def test_one_rank_running_passes_one_at_a_time_makes_its_whole_group_do_so(tiny: Path, tmp_path: Path) -> None:
    """Ulysses exchanges inside every forward: if one rank's memory plan unbatches the guidance passes, all must (no hang)."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--config", str(tiny), "--case", str(CASES / "t2i"), *TINY_FLAGS, "--output_dir", str(out), "--ulysses", "2"]
    run_ok([torchrun(2, DIST / "unbatch_on_rank.py", "1", str(out), "--", *args)])
    assert [(out / f"batch_{r}").read_text() for r in (0, 1)] == ["False", "False"]
    assert summary_of(out)["exit_code"] == 0


def test_a_server_group_is_one_model_group(tiny: Path) -> None:
    from bernini.parallel import serving_topology
    from bernini.pipeline import resolve_sources

    sources = resolve_sources(str(tiny), None, None)
    assert serving_topology(env(4, 4), 2, 2, sources, "the demo renders each request").model_size == 4
    with pytest.raises(ValueError, match=re.escape("the demo renders each request with every rank: launch --nproc-per-node 2 "
                                                   "(--ulysses x --cfg_parallel = 2 x 1), not WORLD_SIZE 4")):
        serving_topology(env(4, 4), 2, 1, sources, "the demo renders each request")
