"""Where one compiled expert forward spends its time: each component timed alone at the forward's shapes, and the
profiler's kernel time by kind, so the part that is neither attention nor a GEMM is measured, not guessed.

python benchmarks/profile_forward.py --tokens 66780 --backend sdpa [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch
import torch.nn.functional as F

from benchmarks.bench_transformer import LAYOUTS
from benchmarks.common import A14B, device_name, forward_flops, random_expert, time_cuda, write_json
from bernini import attention
from bernini.models import compile_blocks, patchify, rope_tables

KINDS = (  # kernel name -> kind, first match wins (inductor names its kernels after the ops they feed, attention included)
    ("fused elementwise (triton)", re.compile(r"triton", re.I)),
    ("attention", re.compile(r"fmha|flash|cudnn|attn|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|sm90_", re.I)),
)


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "other")


def components(tokens: int, text: int = 512) -> dict[str, float]:
    """Seconds per forward of each heavy component, run alone with the forward's shapes and counts."""
    d, f, heads, layers = A14B.dim, A14B.ffn_dim, A14B.num_attention_heads, A14B.num_layers
    g = torch.Generator("cuda").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    x, hidden = rand(tokens, d), rand(tokens, f)
    w_dd, w_fd, w_df, b_f = rand(d, d), rand(f, d), rand(d, f), rand(f)
    q, kv = rand(1, tokens, heads, d // heads), rand(1, text, heads, d // heads)
    with torch.no_grad():
        parts = {
            "self-attention": time_cuda(lambda: attention.attention(q, q, q))[0],
            "cross-attention (512 keys)": time_cuda(lambda: attention.attention(q, kv, kv))[0],
            "6 d x d GEMMs (q k v o, cross q o)": 6 * time_cuda(lambda: F.linear(x, w_dd))[0],
            "FFN up + GELU epilogue": time_cuda(lambda: torch._addmm_activation(b_f, x, w_fd.t(), use_gelu=True))[0],
            "FFN down": time_cuda(lambda: F.linear(hidden, w_df))[0],
        }
    return {name: seconds * layers for name, seconds in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=66780, choices=sorted(LAYOUTS))
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compare-opaque-sdpa", action="store_true", help="only time the forward with SDPA traced by inductor, then as an opaque op")
    p.add_argument("--json")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    attention.select_backend(args.backend, "cuda")
    conds, target = LAYOUTS[args.tokens]
    grids = conds + [target]
    model = random_expert()
    if args.compile:
        compile_blocks(model)
    g = torch.Generator("cuda").manual_seed(1)
    with torch.no_grad():
        text = torch.randn(1, 512, A14B.text_dim, generator=g, device="cuda", dtype=torch.bfloat16)
        latents = [torch.randn(1, 16, t, h * 2, w * 2, generator=g, device="cuda") for t, h, w in grids]
        cos, sin = rope_tables(grids, [float(i + 1) for i in range(len(conds))] + [0.0], A14B.attention_head_dim, "cuda")
        kv = model.encode_text(text)
        tokens_in = torch.cat([model.embed(patchify(x, (1, 2, 2))) for x in latents], dim=1)
        t = torch.tensor([937.0], device="cuda")

        def forward() -> torch.Tensor:
            return model(tokens_in, t, kv, (cos, sin))

        total, _ = time_cuda(forward, warmup=2, repeat=2)
        if args.compare_opaque_sdpa:
            from bernini.models import transformer

            transformer.attention = attention._kernel  # the cuDNN call as inductor cannot see or re-layout it
            opaque, _ = time_cuda(forward, warmup=1, repeat=2)
            print(f"forward at {args.tokens} tokens: SDPA traced {total:.3f} s, SDPA opaque {opaque:.3f} s ({total / opaque:.3f}x)")
            write_json(args.json, {"device": device_name(), "tokens": args.tokens, "traced_s": total, "opaque_s": opaque})
            return
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(event.name)] += event.device_time_total / 1e6
    alone = components(args.tokens)
    rest = total - sum(alone.values())
    print(f"device: {device_name()}  backend: {attention.current_backend()}  compile: {args.compile}  tokens: {args.tokens}")
    print(f"forward: {total:.3f} s  ({forward_flops(args.tokens) / total / 1e12:.1f} TFLOP/s)")
    print("components run alone, per forward:")
    for name, seconds in alone.items():
        print(f"  {name:38} {seconds:7.3f} s  {seconds / total:6.1%}")
    print(f"  {'everything else (norms, RoPE, gates...)':38} {rest:7.3f} s  {rest / total:6.1%}")
    print("profiled kernel time by kind:")
    for kind, seconds in sorted(by_kind.items(), key=lambda kv_: -kv_[1]):
        print(f"  {kind:38} {seconds:7.3f} s  {seconds / total:6.1%}")
    top = sorted(((e.key, e.device_time_total / 1e6, e.count) for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda r: -r[1])[:15]
    print("top kernels:")
    for name, seconds, count in top:
        print(f"  {seconds:7.3f} s  x{count:<4} [{kind_of(name)}] {name[:110]}")
    write_json(args.json, {"device": device_name(), "backend": attention.current_backend(), "tokens": args.tokens, "forward_s": total,
                           "components_s": alone, "rest_s": rest, "kernels_by_kind_s": dict(by_kind),
                           "top_kernels": [{"name": n, "s": s, "count": c} for n, s, c in top]})


if __name__ == "__main__":
    main()
