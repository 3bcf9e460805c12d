"""One expert forward at Wan shapes: our transformer per variant against both diffusers peers, in one run.

python benchmarks/bench_transformer.py                 # 33,390 and 66,780 tokens; about 5 minutes on an H200
python benchmarks/bench_transformer.py --tokens 33390 --variants fa4+compile fa4+compile+autotune --peers compiled
python benchmarks/bench_transformer.py --tokens 75600 --variants sdpa+compile fa4+compile

A variant is backend[+compile][+autotune][+unfused][+unfusedqkv]: autotune = regional compile in the mode
max-autotune-no-cudagraphs (inductor's Triton GEMM templates with pointwise epilogues, used where they beat
cuBLAS); unfused = the FFN's GELU as its own kernel instead of the GEMM's epilogue; unfusedqkv = three Q/K/V
GEMMs instead of the fused one. The default variants are the best backend here with compile, fused and unfused QKV.

The peers (diffusers' WanTransformer3DModel sharing our weight tensors): "eager" with its default SDPA dispatch, and
"compiled" = transformer.compile_repeated_blocks(fullgraph=True) on the best attention backend diffusers can use
here (FA3 if installed, else cuDNN SDPA; FA4 reaches diffusers only as a hub kernel, which needs a download).
Every ratio names its peer. The table is printed last; full numbers go to --json, or $OUT/bench_transformer.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch

from benchmarks.common import A14B, device_name, forward_flops, random_expert, rel_error, time_cuda, write_json
from bernini import attention
from bernini.models import rope_tables
from bernini.models.transformer import FeedForward, WanTransformer, compile_blocks, patchify, unpatchify

# tokens -> (condition grids, target grid): the layouts the renderer really runs
LAYOUTS = {
    33390: ([], (21, 30, 53)),  # 480p t2v, 81 frames
    66780: ([(21, 30, 53)], (21, 30, 53)),  # 480p v2v: source video + target
    75600: ([], (21, 45, 80)),  # 720p t2v
}
DIFFUSERS_COMPILED_BACKENDS = ("_flash_3", "_native_cudnn", "native")  # preference order for the compiled peer
AUTOTUNE = "max-autotune-no-cudagraphs"


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


def uncompile(blocks: torch.nn.ModuleList) -> None:
    for block in blocks:
        block._compiled_call_impl = None


def compiled_peer(ref, call, names: tuple[str, ...]) -> str | None:
    """Compile diffusers' blocks on the first attention backend that it accepts here and that compiles; runs the warm-up."""
    for name in names:
        uncompile(ref.blocks)
        try:
            ref.set_attention_backend(name)  # checks the backend's requirements
            ref.compile_repeated_blocks(fullgraph=True)
            with torch.no_grad():
                call()
            return name
        except Exception as exc:  # a missing package, or a graph break under fullgraph=True
            print(f"note: diffusers + compile on {name} unusable here: {str(exc).splitlines()[0][:200]}")
    return None


_FUSED_QKV: dict[int, torch.nn.Module] = {}


def fuse_qkv(model: WanTransformer, fused: bool) -> None:
    """Switch self-attention between the fused QKV GEMM and the three separate ones (both kept for the A/B)."""
    for block in model.blocks:
        attn = block.attn1
        if id(attn) not in _FUSED_QKV:
            attn.fuse_qkv(keep_separate=True)
            _FUSED_QKV[id(attn)] = attn.to_qkv
        attn.to_qkv = _FUSED_QKV[id(attn)] if fused else None


def default_variants() -> list[str]:
    best = next((b for b in ("fa4", "fa3") if attention.available_backends("cuda").get(b) is None), "sdpa")
    return [f"{best}+compile", f"{best}+compile+unfusedqkv"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[33390, 66780], choices=sorted(LAYOUTS))
    p.add_argument("--variants", nargs="+", help="backend[+compile][+autotune][+unfused][+unfusedqkv] (default: best backend, compiled, QKV fused and not)")
    p.add_argument("--backends", nargs="+", help="older form: these backends eager (and compiled with --compile)")
    p.add_argument("--compile", action="store_true", help="with --backends: also the compiled rows")
    p.add_argument("--peers", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"], help="diffusers rows to time (none: --peers)")
    p.add_argument("--diffusers-backends", nargs="+", default=list(DIFFUSERS_COMPILED_BACKENDS), help="candidates for the compiled peer, best first")
    p.add_argument("--no-diffusers", action="store_true", help="same as --peers with nothing after it")
    p.add_argument("--repeat", type=int, default=2, help="timed calls per row after one warm-up call (median)")
    p.add_argument("--json", help="where the full numbers go (default: $OUT/bench_transformer.json when $OUT is set)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.backends.cuda.matmul.allow_tf32 = False
    peers = [] if args.no_diffusers else args.peers
    ours = random_expert()
    ref = None
    if peers:
        ref = diffusers_model(ours)
        fresh_rope_buffers(ref)
    usable = {b for b, why in attention.available_backends("cuda").items() if why is None}
    if args.variants:
        variants = args.variants
    elif args.backends:
        variants = list(args.backends) + ([f"{b}+compile" for b in args.backends] if args.compile else [])
    else:
        variants = default_variants()
    skipped = [v for v in variants if v.split("+")[0] not in usable]
    variants = [v for v in variants if v not in skipped]
    rows, g = [], torch.Generator("cuda").manual_seed(1)
    print(f"device: {device_name()}; variants: {variants}; left out (backend missing): {skipped or 'none'}")
    for tokens in args.tokens:
        conds, target = LAYOUTS[tokens]
        grids = conds + [target]
        text = torch.randn(1, 512, A14B.text_dim, generator=g, device="cuda", dtype=torch.bfloat16)
        latents = [torch.randn(1, 16, t, h * 2, w * 2, generator=g, device="cuda") for t, h, w in grids]
        t = torch.tensor([937.0], device="cuda")
        flops = forward_flops(tokens)
        base: dict[str, float] = {}
        ref_out = None

        def row(model: str, sec: float, err: float | None = None) -> None:
            rows.append(dict(tokens=tokens, model=model, seconds=sec, tflops=flops / sec / 1e12, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                             vs_diffusers_eager=base["eager"] / sec if "eager" in base else None,
                             vs_diffusers_compiled=base["compiled"] / sec if "compiled" in base else None, rel_err=err))
            print(f"  {tokens} {model}: {sec:.3f} s", flush=True)

        if ref is not None:
            single = torch.cat(latents, dim=2).to(torch.bfloat16)  # one source of the same token count
            call = lambda: ref(single, t, text, return_dict=False)  # noqa: E731
            for peer in peers:
                uncompile(ref.blocks)
                torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    if peer == "eager":
                        ref.set_attention_backend("native")
                        name = "diffusers eager (SDPA dispatch)"
                        out = call()[0]  # warm-up
                        ref_out = out if not conds else None
                        del out
                    else:
                        backend = compiled_peer(ref, call, tuple(args.diffusers_backends))  # compiles and warms up
                        if backend is None:
                            continue
                        name = f"diffusers + compile_repeated_blocks ({backend})"
                    base[peer], _ = time_cuda(call, warmup=0, repeat=args.repeat)
                row(name, base[peer])
            uncompile(ref.blocks)
        cos, sin = rope_tables(grids, [float(i + 1) for i in range(len(conds))] + [0.0], A14B.attention_head_dim, "cuda")
        with torch.no_grad():
            kv = ours.encode_text(text)
            tokens_in = torch.cat([ours.embed(patchify(x, (1, 2, 2))) for x in latents], dim=1)
        for variant in variants:
            backend, *options = variant.split("+")
            FeedForward.fuse_gelu = "unfused" not in options
            fuse_qkv(ours, "unfusedqkv" not in options)
            attention.select_backend(backend, "cuda")
            uncompile(ours.blocks)
            if "compile" in options or "autotune" in options:
                compile_blocks(ours, mode=AUTOTUNE if "autotune" in options else None)
            torch.cuda.reset_peak_memory_stats()
            run = lambda: ours(tokens_in, t, kv, (cos, sin))  # noqa: E731
            with torch.no_grad():
                out = run()  # warm-up (and the compile)
                err = None if ref_out is None else rel_error(unpatchify(out[:, -target[0] * target[1] * target[2] :], target, (1, 2, 2)), ref_out)
                del out
                sec, _ = time_cuda(run, warmup=0, repeat=args.repeat)
            row(f"bernini {variant}", sec, err)
        uncompile(ours.blocks)
        del text, latents, tokens_in, kv, ref_out
        torch.cuda.empty_cache()
    FeedForward.fuse_gelu = True
    out_path = args.json or (os.path.join(os.environ["OUT"], "bench_transformer.json") if os.environ.get("OUT") else None)
    write_json(out_path, {"device": device_name(), "rows": rows})
    print(f"\n{device_name()}  (vs eager / vs compiled: speed-up over diffusers eager / diffusers + compile_repeated_blocks)")
    print(f"{'tokens':>7} {'model':52} {'s/fwd':>7} {'TFLOP/s':>8} {'GiB':>5} {'vs eager':>8} {'vs compiled':>11} {'rel err':>8}")
    for r in rows:
        ratio = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"{r['tokens']:>7} {r['model']:52} {r['seconds']:7.3f} {r['tflops']:8.1f} {r['peak_gib']:5.1f} {ratio(r['vs_diffusers_eager']):>8} {ratio(r['vs_diffusers_compiled']):>11} {err:>8}")


if __name__ == "__main__":
    main()
