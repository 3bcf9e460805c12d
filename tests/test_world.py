"""What each rank of a model group is built to do, read from the renderer torchrun builds (nothing patched)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RV2V = ROOT / "assets" / "testcases" / "rv2v" / "rv2v_case1.json"


@pytest.fixture(scope="module")
def tiny() -> Path:
    from bernini.testing import tiny_checkpoints

    return tiny_checkpoints().diffusers


def build_group(tiny: Path, out: Path, *flags: str) -> dict[int, dict]:
    """torchrun 2 ranks of tests/dist/placement.py; each rank's report by rank."""
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "dist" / "placement.py"),
               str(out), str(RV2V), "--config", str(tiny), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the 2-rank group did not finish in 180 s (hang?)")
    assert proc.returncode == 0, log[-4000:]
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in out.glob("rank_*.json")}


def test_cfg_parallel_2_gives_each_rank_its_own_guidance_passes(tiny: Path, tmp_path: Path) -> None:
    ranks = build_group(tiny, tmp_path / "cfg2", "--cfg_parallel", "2")
    assert sorted(ranks) == [0, 1]
    # rv2v's four passes at these settings: none·u 45 tokens, V·u 90, VI·u 110, VI·c 110. Longest first onto the
    # lighter group (ties to the lower index): VI·u -> 0, VI·c -> 1, V·u -> 0 (110 = 110), none·u -> 1 (155 < 200);
    # each group keeps the mode's order.
    expected = [["V·u", "VI·u"], ["none·u", "VI·c"]]
    for rank, report in ranks.items():
        assert report["cfg_index"] == rank and report["passes"] == "CfgPasses" and report["sequence"] == "LocalSequence"
        assert report["table"] == expected, f"rank {rank}"
    assert set(expected[0]).isdisjoint(expected[1]) and set(expected[0]) | set(expected[1]) == {"none·u", "V·u", "VI·u", "VI·c"}
    assert (ranks[0]["decodes"], ranks[1]["decodes"]) == (True, False)  # only the group leader decodes and returns frames
    assert ranks[0]["frames"] == [9, 48, 80, 3] and ranks[1]["frames"] is None


def test_ulysses_2_shares_every_pass_and_shards_the_sequence(tiny: Path, tmp_path: Path) -> None:
    ranks = build_group(tiny, tmp_path / "ulysses2", "--ulysses", "2")
    for rank, report in ranks.items():
        assert report["sequence"] == "UlyssesSequence" and report["cfg_index"] == 0
        assert report["table"] == [["none·u", "V·u", "VI·u", "VI·c"]], f"rank {rank}"  # one CFG group runs all four
    assert (ranks[0]["decodes"], ranks[1]["decodes"]) == (True, False)
