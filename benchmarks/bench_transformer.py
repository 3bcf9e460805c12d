"""One expert forward at Wan shapes: our transformer per attention backend (eager and compiled) vs diffusers.

python benchmarks/bench_transformer.py [--tokens 33390 66780 75600] [--backends sdpa fa4] [--compile] [--json out.json]
python benchmarks/bench_transformer.py --variants sdpa+compile fa4+compile fa4+compile+unfused   # chosen rows only
A variant is backend[+compile][+unfused]; "unfused" runs the FFN's GELU as its own kernel instead of in the GEMM epilogue.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch

from benchmarks.common import A14B, device_name, forward_flops, random_expert, rel_error, time_cuda, write_json
from bernini import attention
from bernini.models.rope import rope_tables
from bernini.models.transformer import FeedForward, compile_blocks, patchify, unpatchify

# tokens -> (condition grids, target grid): the layouts the renderer really runs
LAYOUTS = {
    33390: ([], (21, 30, 53)),  # 480p t2v, 81 frames
    66780: ([(21, 30, 53)], (21, 30, 53)),  # 480p v2v: source video + target
    75600: ([], (21, 45, 80)),  # 720p t2v
}


def diffusers_model(ours: torch.nn.Module):
    """diffusers' WanTransformer3DModel sharing our weight tensors (no second copy)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        ref = WanTransformer3DModel()
    ref.load_state_dict(ours.state_dict(), assign=True, strict=True)
    return ref.eval()


def fresh_rope_buffers(ref) -> None:
    """init_empty_weights leaves the RoPE tables on meta; rebuild the rope module on the GPU."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    ref.rope = WanRotaryPosEmbed(A14B.attention_head_dim, A14B.patch_size, 1024).to("cuda")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[33390, 66780, 75600])
    p.add_argument("--backends", nargs="+", default=["sdpa", "fa4", "fa3"])
    p.add_argument("--compile", action="store_true", help="also time our model with regional torch.compile")
    p.add_argument("--variants", nargs="+", help="backend[+compile][+unfused] rows instead of --backends/--compile")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = random_expert()
    ref = None
    if not args.no_diffusers:
        ref = diffusers_model(ours)
        fresh_rope_buffers(ref)
    backends = [b for b in args.backends if attention.available_backends("cuda").get(b) is None]
    variants = args.variants or [b for b in backends] + ([f"{b}+compile" for b in backends] if args.compile else [])
    variants = [v for v in variants if v.split("+")[0] in backends]  # backends this machine lacks are left out
    rows, g = [], torch.Generator("cuda").manual_seed(1)
    print(f"device: {device_name()}")
    print(f"{'tokens':>7} {'model':28} {'s/fwd':>7} {'TFLOP/s':>8} {'peak GiB':>8} {'vs diffusers':>12} {'rel err':>8}")
    for tokens in args.tokens:
        conds, target = LAYOUTS[tokens]
        grids = conds + [target]
        text = torch.randn(1, 512, A14B.text_dim, generator=g, device="cuda", dtype=torch.bfloat16)
        latents = [torch.randn(1, 16, t, h * 2, w * 2, generator=g, device="cuda") for t, h, w in grids]
        t = torch.tensor([937.0], device="cuda")
        flops = forward_flops(tokens)
        base = None
        ref_out = None
        if ref is not None:
            torch.cuda.reset_peak_memory_stats()
            single = torch.cat(latents, dim=2).to(torch.bfloat16)  # one source of the same token count
            with torch.no_grad():
                sec, _ = time_cuda(lambda: ref(single, t, text, return_dict=False), repeat=args.repeat)
                if not conds:
                    ref_out = ref(single, t, text, return_dict=False)[0]
            base = sec
            rows.append(dict(tokens=tokens, model="diffusers", seconds=sec, tflops=flops / sec / 1e12, peak_gib=torch.cuda.max_memory_allocated() / 2**30))
            print(f"{tokens:>7} {'diffusers (sdpa dispatch)':28} {sec:7.3f} {flops / sec / 1e12:8.1f} {rows[-1]['peak_gib']:8.1f} {'1.00x':>12} {'':>8}")
        cos, sin = rope_tables(grids, [float(i + 1) for i in range(len(conds))] + [0.0], A14B.attention_head_dim, "cuda")
        with torch.no_grad():
            kv = ours.encode_text(text)
            tokens_in = torch.cat([ours.embed(patchify(x, (1, 2, 2))) for x in latents], dim=1)
        for variant in variants:
            backend, *options = variant.split("+")
            compiled = "compile" in options
            FeedForward.fuse_gelu = "unfused" not in options
            attention.select_backend(backend, "cuda")
            model = ours
            if compiled:
                compile_blocks(model)
            else:
                for block in ours.blocks:
                    block._compiled_call_impl = None
            torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                run = lambda: model(tokens_in, t, kv, (cos, sin))  # noqa: E731
                sec, _ = time_cuda(run, warmup=2 if compiled else 1, repeat=args.repeat)
                err = None
                if ref_out is not None:
                    out = unpatchify(run()[:, -target[0] * target[1] * target[2] :], target, (1, 2, 2))
                    err = rel_error(out, ref_out)
            name = f"bernini {variant}"
            row = dict(tokens=tokens, model=name, seconds=sec, tflops=flops / sec / 1e12, peak_gib=torch.cuda.max_memory_allocated() / 2**30, speedup=(base / sec if base else None), rel_err=err)
            rows.append(row)
            speed = f"{base / sec:.2f}x" if base else "-"
            print(f"{tokens:>7} {name:28} {sec:7.3f} {row['tflops']:8.1f} {row['peak_gib']:8.1f} {speed:>12} {'-' if err is None else f'{err:.1e}':>8}")
        if args.compile:  # back to eager blocks for the next size
            for block in ours.blocks:
                block._compiled_call_impl = None
        del text, latents, tokens_in, kv, ref_out
        torch.cuda.empty_cache()
    write_json(args.json, {"device": device_name(), "rows": rows})


if __name__ == "__main__":
    main()
