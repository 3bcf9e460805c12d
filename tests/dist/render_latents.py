"""Render cases with the parallel renderer and save each final latent from its group leader (test helper)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from bernini.cases import load_case_file
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.parallel import LaunchEnv, build_topology, destroy_distributed, init_distributed
from bernini.parallel import assign_cases, expert_heads, placement_for
from bernini.pipeline import Renderer, resolve_sources
from bernini.plan import plan_case

# Small sizes with odd sequence lengths (45, 105, 165 tokens), so Ulysses 2 pads every case.
SETTINGS = GenerationSettings(num_inference_steps=3, height=48, width=80, max_image_size=80, num_frames=9)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", nargs="+", type=Path, required=True)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--cfg_parallel", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (collectives inside)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    env = LaunchEnv.from_environ()
    sources = resolve_sources(args.config)
    topology = build_topology(env, args.ulysses, args.cfg_parallel, expert_heads(sources))
    device = torch.device("cuda", env.local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = init_distributed(topology, env, device, 120)
    try:
        runtime = RuntimeConfig(device=str(device), dtype=args.dtype, compile=args.compile)
        renderer = Renderer.load(sources, runtime, placement=placement_for(topology, groups, runtime))
        cases = [load_case_file(path) for path in args.case]
        plans = [plan_case(case, SETTINGS) for case in cases]
        for i in assign_cases(plans, topology.dp)[topology.dp_index]:
            out = renderer.render(cases[i], SETTINGS, plan=plans[i])
            if topology.is_leader:
                with open(args.out / f"{cases[i].name}.pt", "xb") as f:  # "x": a second writer fails the test
                    torch.save({"latent": out.latent, "rank": topology.rank}, f)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
