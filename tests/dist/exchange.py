"""Ulysses attention and CFG exchange against single-device results, without models (test helper).

Runs on gloo (CPU) or, with --device cuda, on NCCL; prints OK from every rank on success.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from bernini.guidance import I_C, I_U, NONE_U
from bernini.models import LocalSequence
from bernini.parallel import CfgPasses
from bernini.parallel import LaunchEnv, build_topology, destroy_distributed, init_distributed
from bernini.parallel import UlyssesSequence


def check_ulysses(sequence: UlyssesSequence, device: torch.device, dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for length in (1, 7, 45):  # 1 and 7 leave ranks with padding only or uneven padding
        q, k, v = (torch.randn(2, length, 4, 24, generator=gen).to(device, dtype) for _ in range(3))
        angles = torch.randn(length, 12, generator=gen, dtype=torch.float64)
        cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
        want = LocalSequence().attend(q, k, v, cos, sin)
        shards = [sequence.shard(t) for t in (q.flatten(2), k.flatten(2), v.flatten(2))]
        local = [s.unflatten(2, (4, 24)) for s in shards]
        got = sequence.gather(sequence.attend(*local, cos, sin).flatten(2)).unflatten(2, (4, 24))
        err = (got.float() - want.float()).abs().max().item()
        assert got.shape == want.shape and err <= tol, f"Ulysses L={length} {dtype}: max error {err}"


def check_cfg(passes: CfgPasses, device: torch.device, dtype: torch.dtype) -> None:
    work = [(NONE_U, 45), (I_U, 105), (I_C, 105)]
    truth = {c: torch.full((1, 45, 64), float(i + 1), device=device, dtype=dtype) for i, (c, _) in enumerate(work)}
    mine = passes.select(work)
    got = passes.exchange({c: truth[c] for c in mine}, tuple(c for c, _ in work))
    assert all(torch.equal(got[c], truth[c]) for c in truth), "CFG exchange returned wrong predictions"
    single = [(I_C, 105)]  # fewer passes than cfg groups: an idle group still takes part
    mine = passes.select(single)
    got = passes.exchange({c: truth[c] for c in mine}, (I_C,))
    assert torch.equal(got[I_C], truth[I_C]), "CFG exchange with an idle group failed"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--cfg_parallel", type=int, default=1)
    args = parser.parse_args()
    env = LaunchEnv.from_environ()
    topology = build_topology(env, args.ulysses, args.cfg_parallel, 4)
    device = torch.device("cuda", env.local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = init_distributed(topology, env, device, 60)
    try:
        if groups.ulysses is not None:
            sequence = UlyssesSequence(groups.ulysses)
            check_ulysses(sequence, device, torch.float32, 1e-5)
            check_ulysses(sequence, device, torch.bfloat16, 2e-2)
        for dtype in (torch.float32, torch.bfloat16):
            check_cfg(CfgPasses(topology.cfg, topology.cfg_index, groups.cfg, device, dtype), device, dtype)
        dist.barrier(group=groups.control)
        print(f"OK rank {topology.rank}", flush=True)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
