"""Build each rank's engine the way infer_multi_gpu.py does and report what the rank was built to do (test helper).

Usage: placement.py OUT_DIR CASE --config DIR [--cfg_parallel C] [--ulysses U]
Every rank renders CASE once and writes OUT_DIR/rank_<rank>.json: its placement and the guidance passes it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from bernini.cases import load_case_file
from bernini.config import RuntimeConfig
from bernini.parallel import LaunchEnv, build_topology, destroy_distributed, init_distributed
from bernini.parallel import DistWorld, expert_heads
from bernini.pipeline import resolve_sources
from bernini.plan import plan_case

sys.path.insert(0, str(Path(__file__).parent))
from render_latents import SETTINGS as PARITY_SETTINGS  # noqa: E402  (odd sequence lengths: rv2v is 45/90/110/110 tokens)

# Every pass of every step runs, so the placement of all four rv2v passes is what the last step reports
# (with zero-weight passes skipped, the low expert's ω_vid 1.25 x 0.8 = 1 drops none·u).
SETTINGS = dataclasses.replace(PARITY_SETTINGS, skip_zero_passes=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("case", type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cfg_parallel", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    env = LaunchEnv.from_environ()
    sources = resolve_sources(args.config)
    topology = build_topology(env, args.ulysses, args.cfg_parallel, expert_heads(sources))
    device = torch.device("cpu")
    groups = init_distributed(topology, env, device, 120)
    try:
        world = DistWorld(topology, groups, device)
        case = load_case_file(args.case)
        plan = plan_case(case, SETTINGS)
        engine = world.load(sources, RuntimeConfig(device="cpu", dtype="float32"), SETTINGS, {}, [plan])
        result = engine.render(case, SETTINGS, plan=plan)  # the render path every batch case takes on this rank
        placement = engine.renderer.placement
        report = {
            "rank": topology.rank,
            "sequence": type(placement.sequence).__name__,
            "passes": type(placement.passes).__name__,
            "decodes": placement.decodes,
            # The CFG groups' passes of the last step, as the Denoiser asked the placement for them.
            "table": [[str(c) for c in group] for group in getattr(placement.passes, "table", [])],
            "cfg_index": topology.cfg_index,
            "frames": None if result is None else list(result.frames.shape),
        }
        (args.out / f"rank_{topology.rank}.json").write_text(json.dumps(report))
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
