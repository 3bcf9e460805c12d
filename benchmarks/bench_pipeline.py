"""A whole case through the real pipeline with full-size random weights: time per phase, share outside forwards.

python benchmarks/bench_pipeline.py --modes t2v_apg v2v_apg [--steps 40] [--compile] [--json out.json]
Needs a tiny checkpoint for the tokenizer and scheduler config (python -m bernini.testing make-tiny .tiny).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch

from benchmarks.common import device_name, random_expert, write_json
from bernini import attention
from bernini.cases import Case
from bernini.conditioning import Conditions
from bernini.config import GenerationSettings, RendererConfig, RuntimeConfig
from bernini.models import VAE, TextEncoder, compile_blocks
from bernini.pipeline import ModelSources, Renderer
from bernini.plan import CasePlan, MediaPlan, latent_grid

UMT5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=256384,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)


def random_fill(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator("cuda").manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32).mul_(0.02).add_(1.0 if p.ndim == 1 else 0.0))
    return module


def build_renderer(tiny: Path, runtime: RuntimeConfig, with_experts: bool = True) -> Renderer:
    """Random full-size UMT5-XXL, VAE and (unless the caller places its own) both experts resident on the GPU."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        t5 = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    t5 = random_fill(t5.to_empty(device="cuda"), 3).to(torch.bfloat16).eval().to("cpu")
    t5.encoder.embed_tokens.weight = t5.shared.weight  # a move between devices unties them (two 2 GB copies), a load does not
    text = TextEncoder(AutoTokenizer.from_pretrained(tiny / "tokenizer"), t5)
    vae = VAE(random_fill(AutoencoderKLWan().to("cuda"), 4).eval())
    experts = {"high": random_expert(seed=0), "low": random_expert(seed=1)} if with_experts else {}
    if runtime.compile:
        for model in experts.values():
            compile_blocks(model)
    sources = ModelSources(tiny, RendererConfig(), tiny, {"high": "random", "low": "random"})
    sched = dict(UniPCMultistepScheduler.load_config(tiny / "scheduler"))
    renderer = Renderer(sources, text, vae, experts, sched, runtime, torch.device("cuda"))
    renderer.place_text_encoder()
    return renderer


def synthetic_case(mode: str, frames: int, height: int, width: int) -> tuple[Case, CasePlan, torch.Tensor | None]:
    task = "t2v" if mode.startswith("t2v") else "v2v"
    case = Case(name=f"{mode}", source="<bench>", task_type=task, prompt="a boat on a river at dawn", guidance_mode=mode)
    grid = latent_grid(frames, height, width)
    sources = () if task == "t2v" else (MediaPlan("<synthetic>", "video", frames, width, height, grid),)
    tokens = grid[0] * grid[1] * grid[2] * (1 if task == "t2v" else 2)
    plan = CasePlan(case.name, task, mode, frames, width, height, 16.0, grid, "<none>", sources, 2, (tokens, tokens), 0)
    video = None if task == "t2v" else torch.rand(3, frames, height, width) * 2 - 1
    return case, plan, video


def timed_forwards(renderer: Renderer) -> list[float]:
    """Wrap each expert's forward with synchronized timers; returns the list they append to."""
    spent: list[float] = []
    for model in renderer.experts.values():
        inner = model.forward

        def timed(*a, _inner=inner, **k):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = _inner(*a, **k)
            torch.cuda.synchronize()
            spent.append(time.perf_counter() - start)
            return out

        model.forward = timed
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", type=Path, default=Path(".tiny/Bernini-R-Diffusers"))
    p.add_argument("--modes", nargs="+", default=["t2v_apg", "v2v_apg"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-batch-passes", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", attention=args.attention, compile=args.compile, batch_passes=not args.no_batch_passes)
    attention.select_backend(args.attention, "cuda")
    renderer = build_renderer(args.tiny, runtime)
    spent = timed_forwards(renderer)
    settings = GenerationSettings(num_inference_steps=args.steps, height=args.height, width=args.width, num_frames=args.frames)
    rows = []
    print(f"device: {device_name()}  attention: {attention.current_backend()}  compile: {args.compile}")
    for mode in args.modes:
        case, plan, video = synthetic_case(mode, args.frames, args.height, args.width)
        if video is not None:
            renderer.encode_conditions = lambda c, s, _v=video: Conditions(videos=(renderer.encode_pixels(_v),))
        spent.clear()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = renderer.render(case, settings, plan=plan)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        forwards = sum(spent)
        row = dict(mode=mode, steps=args.steps, total_s=total, forward_s=forwards, forwards=len(spent),
                   outside_share=(total - forwards) / total, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   phases=out.timings, s_per_step=sum(v for k, v in out.timings.items() if k.startswith("denoise")) / args.steps)
        rows.append(row)
        phases = " ".join(f"{k}={v:.2f}s" for k, v in out.timings.items())
        print(f"{mode}: total {total:.1f} s, forwards {forwards:.1f} s in {len(spent)} calls, outside {100 * row['outside_share']:.2f}%, "
              f"{row['s_per_step']:.2f} s/step, peak {row['peak_gib']:.1f} GiB | {phases}")
    write_json(args.json, {"device": device_name(), "rows": rows})


if __name__ == "__main__":
    main()
