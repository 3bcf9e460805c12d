"""The fast mode's A/B harness: what each lossy option costs in accuracy and buys in speed, against the exact path.

python benchmarks/bench_fast.py forward [--tokens 33390 66780] [--configs exact gemm:auto attn:auto fast]
python benchmarks/bench_fast.py e2e --modes t2v_apg [--steps 10] [--configs exact fast]

forward: one full-size A14B expert (random weights, built on the GPU, never zeros) at Wan's token layouts,
regional compile on the best exact attention backend here; each config's velocity prediction against the exact
one from the same weights and inputs: max relative error (max |d| / max |exact|), mean relative error
(mean |d| / mean |exact|), cosine similarity, and seconds per forward.
e2e: the real Renderer.render of a 480p case (random full-size UMT5-XXL, VAE and both experts, bench_pipeline's
setup) per config with the same seed: PSNR and SSIM of the decoded video against the exact render, and the
seconds per case after a 2-step warm-up render that compiles. Random weights have none of the real weights'
outlier channels: these numbers bound the numerics, not the quality of real renders.

A config is exact | fast | gemm:BACKEND[:all] | attn:BACKEND, or several joined by '+' (gemm:scaled_mm+attn:sage):
gemm backends auto | scaled_mm | torchao ("all": no block kept in bf16), attention backends auto | cudnn_fp8 | sage.
The table is printed last; full numbers go to --json, or $OUT/bench_fast.json when $OUT is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import argparse
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_pipeline import build_renderer, synthetic_case
from benchmarks.bench_transformer import LAYOUTS
from benchmarks.common import A14B, device_name, forward_flops, random_expert, time_cuda, write_json
from bernini import attention, fp8
from bernini.conditioning import Conditions
from bernini.config import FAST_PRESET, GenerationSettings, RuntimeConfig
from bernini.models import WanTransformer, compile_blocks, fuse_projections, patchify, rope_tables


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    gemm: str = "off"
    attention: str = "off"
    policy: fp8.GemmPolicy = fp8.DEFAULT_POLICY


def parse_config(spec: str) -> Config:
    if spec == "exact":
        return Config(spec)
    if spec == "fast":
        return Config(spec, FAST_PRESET["fp8_gemm"], FAST_PRESET["fp8_attention"])
    config = Config(spec)
    for part in spec.split("+"):
        kind, _, rest = part.partition(":")
        backend, _, scope = rest.partition(":")
        if kind == "gemm" and backend in ("auto", *fp8.GEMM_BACKENDS) and scope in ("", "all"):
            policy = fp8.GemmPolicy(keep_blocks=()) if scope == "all" else fp8.DEFAULT_POLICY
            config = dataclasses.replace(config, gemm=backend, policy=policy)
        elif kind == "attn" and backend in ("auto", *attention.FP8_BACKENDS) and not scope:
            config = dataclasses.replace(config, attention=backend)
        else:
            raise SystemExit(f"bad config {spec!r}: use exact, fast, gemm:auto|scaled_mm|torchao[:all], attn:auto|cudnn_fp8|sage, joined by '+'")
    return config


def apply(models: list[WanTransformer], config: Config) -> tuple[str | None, str | None] | None:
    """Fuse, convert (in place) and choose kernels for ``config``; None when this machine cannot run it."""
    try:
        gemm = fp8.select_gemm(config.gemm, "cuda")
        attn = attention.select_fp8_attention(config.attention, "cuda")
    except ValueError as exc:
        print(f"note: {config.name} left out: {exc}")
        return None
    if (config.gemm != "off" and gemm is None) or (config.attention != "off" and attn is None):
        print(f"note: {config.name} left out: its option fell back to the exact path here")
        return None
    for model in models:
        fuse_projections(model)
        if gemm is not None:
            for i, block in enumerate(model.blocks):
                fp8.convert_gemms(block, gemm, i, len(model.blocks), config.policy)
        compile_blocks(model)
    return gemm, attn


def errors(out: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    d, e = (out.float() - exact.float()).abs(), exact.float()
    return {"max_rel": float(d.max() / e.abs().max()), "mean_rel": float(d.mean() / e.abs().mean()),
            "cosine": float(F.cosine_similarity(out.float().flatten(), e.flatten(), dim=0))}


# --------------------------------------------------------------------------- per forward


def forward_rows(args: argparse.Namespace) -> list[dict]:
    configs = [parse_config(c) for c in args.configs]
    if configs[0].name != "exact":
        configs.insert(0, Config("exact"))
    attention.select_backend("auto", "cuda")
    exact_backend = attention.current_backend()
    g = torch.Generator("cuda").manual_seed(1)
    inputs = {}
    for tokens in args.tokens:
        conds, target = LAYOUTS[tokens]
        grids = conds + [target]
        latents = [torch.randn(1, 16, t, h * 2, w * 2, generator=g, device="cuda") for t, h, w in grids]
        text = torch.randn(1, 512, A14B.text_dim, generator=g, device="cuda", dtype=torch.bfloat16)
        rope = rope_tables(grids, [float(i + 1) for i in range(len(conds))] + [0.0], A14B.attention_head_dim, "cuda")
        inputs[tokens] = (latents, text, rope)
    t = torch.tensor([900.0], device="cuda")
    rows, exact_out, exact_sec = [], {}, {}
    for config in configs:
        attention.select_backend(exact_backend, "cuda")
        model = random_expert()  # seed 0: the same weights for every config
        chosen = apply([model], config)
        if chosen is None:
            continue
        for tokens, (latents, text, rope) in inputs.items():
            with torch.no_grad():
                x = torch.cat([model.embed(patchify(lat, (1, 2, 2))) for lat in latents], dim=1)
                kv = model.encode_text(text)
                run = lambda: model(x, t, kv, rope)  # noqa: E731
                torch.cuda.reset_peak_memory_stats()
                out = run()[:, -math.prod(LAYOUTS[tokens][1]) :].float()  # warm-up (and the compile); the target's prediction
                sec, _ = time_cuda(run, warmup=0, repeat=args.repeat)
            if config.name == "exact":
                exact_out[tokens], exact_sec[tokens] = out, sec
            row = dict(config=config.name, tokens=tokens, gemm=chosen[0], attention=chosen[1] or exact_backend, seconds=sec,
                       tflops=forward_flops(tokens) / sec / 1e12, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       speedup=exact_sec[tokens] / sec, **errors(out, exact_out[tokens]))
            rows.append(row)
            print(f"  {config.name} {tokens}: {sec:.3f} s, cosine {row['cosine']:.5f}", flush=True)
            del x, kv, out
        del model
        torch.cuda.empty_cache()
    return rows


def print_forward(rows: list[dict]) -> None:
    print(f"\n{device_name()}: one A14B expert forward, random weights; speed-up and errors against the exact path of the same run")
    print(f"{'config':26} {'tokens':>7} {'gemm':>9} {'attention':>10} {'s/fwd':>7} {'TFLOP/s':>8} {'vs exact':>8} {'max rel':>8} {'mean rel':>8} {'cosine':>8}")
    for r in rows:
        print(f"{r['config']:26} {r['tokens']:>7} {str(r['gemm'] or '-'):>9} {r['attention']:>10} {r['seconds']:7.3f} {r['tflops']:8.1f} "
              f"{r['speedup']:7.2f}x {r['max_rel']:8.1e} {r['mean_rel']:8.1e} {r['cosine']:8.5f}")


# --------------------------------------------------------------------------- end to end


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Frames in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames and channels (Gaussian window 11, sigma 1.5; Wang et al. 2004), frames [T, H, W, 3] in [0, 1].

    Written here because the GPU machine has no image-metrics package (scikit-image, torchmetrics).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = (torch.from_numpy(f).to(device, torch.float64).permute(0, 3, 1, 2).reshape(-1, 1, *f.shape[1:3]) for f in (a, b))
    r = torch.arange(11, dtype=torch.float64, device=device) - 5
    w = torch.exp(-(r**2) / (2 * 1.5**2))
    w = (w / w.sum())[:, None] * (w / w.sum())[None, :]
    blur = lambda z: F.conv2d(z, w[None, None])  # noqa: E731  ("valid" windows, as skimage's default crop)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def e2e_rows(args: argparse.Namespace) -> list[dict]:
    configs = [parse_config(c) for c in args.configs]
    if configs[0].name != "exact":
        configs.insert(0, Config("exact"))
    if any(c.gemm == "off" for c in configs[1:]) and any(c.gemm != "off" for c in configs[1:]):
        configs[1:] = sorted(configs[1:], key=lambda c: c.gemm != "off")  # converted weights cannot go back: bf16 configs first
    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", attention="auto", compile=False)
    attention.select_backend("auto", "cuda")
    renderer = build_renderer(args.tiny, runtime)
    settings = GenerationSettings(num_inference_steps=args.steps, height=480, width=848, num_frames=81)
    warm = dataclasses.replace(settings, num_inference_steps=2)  # one high and one low step: both experts compile
    rows, exact = [], {}
    converted: str | None = None
    for config in configs:
        if converted is not None and config.gemm == "off":
            print(f"note: {config.name} left out: the experts' weights were converted for an earlier config")
            continue
        models = list(renderer.experts.values())
        gemm_config = config if converted is None else dataclasses.replace(config, gemm="off")
        chosen = apply(models, gemm_config)
        if chosen is None:
            continue
        converted = converted or chosen[0]
        for mode in args.modes:
            case, plan, video = synthetic_case(mode, 81, 480, 848)
            if video is not None:
                renderer.encode_conditions = lambda c, s, _v=video: Conditions(videos=(renderer.encode_pixels(_v),))
            renderer.render(case, warm, plan=plan)
            torch.cuda.synchronize()
            start = time.perf_counter()
            frames = renderer.render(case, settings, plan=plan).frames
            torch.cuda.synchronize()
            sec = time.perf_counter() - start
            if config.name == "exact":
                exact[mode] = (frames, sec)
            ref, ref_sec = exact[mode]
            rows.append(dict(config=config.name, mode=mode, steps=args.steps, gemm=converted, attention=attention.current_fp8_backend() or attention.current_backend(),
                             seconds=sec, speedup=ref_sec / sec, psnr=psnr(frames, ref), ssim=ssim(frames, ref)))
            print(f"  {config.name} {mode}: {sec:.1f} s, PSNR {rows[-1]['psnr']:.2f} dB", flush=True)
    return rows


def print_e2e(rows: list[dict]) -> None:
    print(f"\n{device_name()}: whole 480p cases (81 frames), random weights, same seed; against the exact render of the same run")
    print(f"{'config':26} {'mode':>8} {'steps':>5} {'gemm':>9} {'attention':>10} {'s/case':>7} {'vs exact':>8} {'PSNR dB':>8} {'SSIM':>7}")
    for r in rows:
        print(f"{r['config']:26} {r['mode']:>8} {r['steps']:>5} {str(r['gemm'] or '-'):>9} {r['attention']:>10} {r['seconds']:7.1f} "
              f"{r['speedup']:7.2f}x {r['psnr']:8.2f} {r['ssim']:7.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("forward", help="per forward at Wan shapes: errors and seconds per config")
    f.add_argument("--tokens", type=int, nargs="+", default=[33390, 66780], choices=sorted(LAYOUTS))
    f.add_argument("--configs", nargs="+", default=["exact", "gemm:auto", "attn:auto", "fast"])
    f.add_argument("--repeat", type=int, default=2)
    e = sub.add_parser("e2e", help="whole 480p cases: PSNR/SSIM against the exact render, seconds per case")
    e.add_argument("--modes", nargs="+", default=["t2v_apg"], choices=["t2v_apg", "v2v_apg"])
    e.add_argument("--steps", type=int, default=40)
    e.add_argument("--configs", nargs="+", default=["exact", "fast"])
    e.add_argument("--tiny", type=Path, default=Path(".tiny/Bernini-R-Diffusers"), help="tokenizer and scheduler config (python -m bernini.testing make-tiny .tiny)")
    for sp in (f, e):
        sp.add_argument("--json", help="where the full numbers go (default: $OUT/bench_fast.json when $OUT is set)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bernini").setLevel(logging.INFO)  # the chosen kernels and fallbacks
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = forward_rows(args) if args.what == "forward" else e2e_rows(args)
    out_path = args.json or (os.path.join(os.environ["OUT"], f"bench_fast_{args.what}.json") if os.environ.get("OUT") else None)
    write_json(out_path, {"device": device_name(), "what": args.what, "rows": rows})
    (print_forward if args.what == "forward" else print_e2e)(rows)


if __name__ == "__main__":
    main()
