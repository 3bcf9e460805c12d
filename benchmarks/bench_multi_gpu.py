"""Seconds per denoising step on 1 GPU vs Ulysses and CFG parallel, with parity, full-size random weights.

torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py [--tokens 33390 66780] [--json out.json]
A step is the two guidance passes of t2v_apg / v2v_apg (negative and positive text) of one expert.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch
import torch.distributed as dist

from benchmarks.bench_transformer import LAYOUTS
from benchmarks.common import A14B, device_name, random_expert, rel_error, time_cuda, write_json
from bernini import attention
from bernini.models import LocalSequence, patchify, rope_tables
from bernini.parallel import UlyssesSequence, all_gather_into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[33390, 66780])
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    attention.select_backend(args.attention, "cuda")
    model = random_expert(seed=0)  # same seed and card: identical weights on every rank
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 512, A14B.text_dim, generator=g).to("cuda", torch.bfloat16)  # rows: u, c
    rows = []
    if rank == 0:
        print(f"device: {device_name()} x{world}, attention {attention.current_backend()}, eager")
        print(f"{'tokens':>7} {'layout':14} {'s/step':>7} {'speedup':>8} {'efficiency':>10} {'rel err vs 1 GPU':>16}")
    with torch.no_grad():
        kv = model.encode_text(text)
        t = torch.full((2,), 937.0, device="cuda")
        for tokens in args.tokens:
            conds, target = LAYOUTS[tokens]
            grids = conds + [target]
            latents = [torch.randn(1, 16, a, b * 2, c * 2, generator=g).cuda() for a, b, c in grids]
            x = torch.cat([model.embed(patchify(lat, (1, 2, 2))) for lat in latents], dim=1)
            rope = rope_tables(grids, [float(i + 1) for i in range(len(conds))] + [0.0], A14B.attention_head_dim, "cuda")
            n_target = target[0] * target[1] * target[2]

            def one_gpu():
                return model(x.expand(2, -1, -1), t, kv, rope)[:, -n_target:]

            def cfg():
                mine = model(x, t[:1], [(k[rank : rank + 1], v[rank : rank + 1]) for k, v in kv], rope)[:, -n_target:]
                out = mine.new_empty(world, *mine.shape[1:])
                all_gather_into(out, mine.contiguous(), None)
                return out

            results = {}
            dist.barrier()
            if rank == 0:
                sec, _ = time_cuda(one_gpu, repeat=args.repeat)
                results["1 GPU"] = (sec, one_gpu())
            dist.barrier()
            model.sequence = UlyssesSequence(dist.group.WORLD)
            sec, _ = time_cuda(one_gpu, repeat=args.repeat)  # the same call, now sharded over the group
            results[f"ulysses {world}"] = (sec, one_gpu())
            model.sequence = LocalSequence()
            dist.barrier()
            sec, _ = time_cuda(cfg, repeat=args.repeat)
            results[f"cfg {world}"] = (sec, cfg())
            if rank == 0:
                base, ref = results["1 GPU"]
                for name, (sec, out) in results.items():
                    err = rel_error(out, ref)
                    rows.append(dict(tokens=tokens, layout=name, seconds_per_step=sec, speedup=base / sec, efficiency=base / sec / (1 if name == "1 GPU" else world), rel_err=err))
                    print(f"{tokens:>7} {name:14} {sec:7.3f} {base / sec:7.2f}x {100 * rows[-1]['efficiency']:9.1f}% {err:16.1e}")
            del results, x, latents
            torch.cuda.empty_cache()
    if rank == 0:
        write_json(args.json, {"device": device_name(), "world": world, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
