"""Peak GPU memory and seconds per step per memory plan, through the real pipeline with full-size random weights.

python benchmarks/bench_memory.py --modes t2v_apg v2v_apg --plans none expert block fp8-none fp8-block --steps 2 [--json out.json]
python benchmarks/bench_memory.py --modes t2v_apg --plans auto --max_gpu_memory 23   # what a 24 GB card gets
Plans: none | expert | block with bf16 weights, fp8-none | fp8-block with FP8 block weights, auto | fp8-auto as the runner
would choose for the free memory (capped by --max_gpu_memory). Peaks are also given per phase (text encoding, denoising
steps, decode). Each plan gets fresh experts
(same seeds, so the latents of lossless plans must equal none's: the table shows the difference). 2 steps are one
'high' and one 'low' step at 480p, so the expert switch is inside the measurement. --max_gpu_memory GiB caps the
allocator as a smaller card would. Needs a tiny checkpoint for the tokenizer and scheduler (python -m bernini.testing make-tiny .tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch

from benchmarks.bench_pipeline import UMT5_XXL, build_renderer, synthetic_case
from benchmarks.common import A14B, device_name, random_expert, rel_error, write_json
from bernini import attention, fp8, memory, offload
from bernini.conditioning import Conditions
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.models import WanTransformer, compile_blocks
from bernini.offload import ExpertStore, GiB, MemoryPlan
from bernini.pipeline import Renderer, cap_gpu_memory
from bernini.plan import CasePlan
from bernini.sampling import StepEvent

PLANS = {"none": ("none", "bf16"), "expert": ("expert", "bf16"), "block": ("block", "bf16"), "fp8-none": ("none", "fp8"), "fp8-block": ("block", "fp8"),
         "auto": ("auto", "bf16"), "fp8-auto": ("auto", "fp8")}
VAE_BYTES = 508 * 10**6  # the Wan2.1 VAE's safetensors


def a14b_sizes() -> memory.ModelSizes:
    tcfg = dict(dataclasses.asdict(A14B))
    return memory.ModelSizes(memory.transformer_params(tcfg), 2, memory.umt5_encoder_params({**UMT5_XXL, "model_type": "umt5"}),
                             VAE_BYTES, A14B.dim, A14B.ffn_dim, A14B.num_layers)


def build_experts(offload_mode: str, weights_format: str, device: torch.device, compile: bool) -> dict[str, WanTransformer]:
    """Fresh random experts in the plan's storage: each is converted and packed before the next one is made."""
    use_scaled_mm = weights_format == "fp8" and fp8.scaled_mm_supported(device)
    experts = {}
    for seed, name in enumerate(("high", "low")):
        model = random_expert(seed=seed)
        for block in model.blocks:
            if weights_format == "fp8":
                fp8.quantize_linears(block, use_scaled_mm)
            if offload_mode != "none":
                offload.host_copy(block, pin=True)
        if compile:
            compile_blocks(model)
        experts[name] = model
    return experts


def host_to_device_gbps(copy: offload.HostCopy, repeat: int = 3) -> float:
    """H2D bandwidth of one packed block from its (pinned) host buffer, as the store copies it."""
    target = torch.empty(copy.nbytes, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        target.copy_(copy.buffer, non_blocking=True)
    end.record()
    end.synchronize()
    return repeat * copy.nbytes / (start.elapsed_time(end) / 1000) / 1e9


def release(renderer: Renderer) -> None:
    """Drop the previous plan's experts (and their pinned host copies) before building the next."""
    renderer.experts = {}
    renderer.store = ExpertStore({})
    renderer.text_encoder.model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)


def install(renderer: Renderer, name: str, load: memory.Workload, args: argparse.Namespace) -> MemoryPlan:
    """Plan for the free memory now, build the experts that way, and place UMT5 and the VAE as the plan says."""
    release(renderer)
    requested, weights_format = PLANS[name]
    device = renderer.device
    plan = offload.plan_memory(a14b_sizes(), load, dtype="bfloat16", weights_format=weights_format, offload=requested, t5_cpu=args.t5_cpu,
                               gpu_free=memory.gpu_free_bytes(str(device)), host_free=memory.host_free_bytes(), max_gpu_memory=args.max_gpu_memory)
    offload_mode = plan.offload
    logging.getLogger("bench").info("%s: %s", name, plan.describe())
    clock = time.perf_counter()
    experts = build_experts(offload_mode, weights_format, device, args.compile)
    renderer.experts = experts
    renderer.store = ExpertStore(experts, offload_mode, device, plan.prefetch_bytes)
    renderer.memory_plan = plan
    renderer.runtime = dataclasses.replace(renderer.runtime, offload=offload_mode, weights=weights_format, max_gpu_memory=args.max_gpu_memory,
                                           batch_combos=plan.batch_combos)
    renderer.place_text_encoder()
    (renderer.vae.model.enable_tiling if plan.vae_tiling else renderer.vae.model.disable_tiling)()
    cap_gpu_memory(args.max_gpu_memory, device)
    torch.cuda.synchronize()
    print(f"{name}: experts built and placed in {time.perf_counter() - clock:.1f} s")
    if offload_mode != "none":
        first = renderer.store.blocks["high"][0]
        print(f"{name}: block copy {first.nbytes / GiB:.2f} GiB, pinned {first.pinned}, host->GPU {host_to_device_gbps(first):.1f} GB/s")
    return plan


def use_source(renderer: Renderer, video: torch.Tensor | None) -> None:
    """The synthetic v2v case's source video, VAE-encoded where the renderer encodes its conditions."""
    if video is not None:
        renderer.encode_conditions = lambda c, s, _v=video: Conditions(videos=(renderer.encode_pixels(_v),))  # type: ignore[method-assign]


def render_case(renderer: Renderer, case_plan: tuple[Any, CasePlan, torch.Tensor | None], settings: GenerationSettings,
                on_step: Callable[[StepEvent], None] | None = None) -> tuple[Any, list[StepEvent]]:
    case, plan, video = case_plan
    if "encode_conditions" not in renderer.__dict__:
        use_source(renderer, video)
    steps: list[StepEvent] = []

    def step(event: StepEvent) -> None:
        steps.append(event)
        if on_step is not None:
            on_step(event)

    out = renderer.render(case, settings, plan=plan, on_step=step)
    renderer.__dict__.pop("encode_conditions", None)
    return out, steps


class PhasePeaks:
    """The allocator's peak per phase of a render: read and reset at each phase boundary."""

    def __init__(self, renderer: Renderer) -> None:
        self.gib: dict[str, float] = {}
        self._wrap(renderer, "encode_text", "text")
        self._wrap(renderer, "encode_conditions", "vae_encode")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def mark(self, phase: str) -> None:
        torch.cuda.synchronize()
        self.gib[phase] = max(self.gib.get(phase, 0.0), torch.cuda.max_memory_allocated() / GiB)
        torch.cuda.reset_peak_memory_stats()

    def _wrap(self, renderer: Renderer, method: str, phase: str) -> None:
        inner = getattr(renderer, method)

        def wrapped(*args: Any) -> Any:
            self.mark("before")
            result = inner(*args)
            self.mark(phase)
            return result

        setattr(renderer, method, wrapped)

    def unwrap(self, renderer: Renderer) -> None:
        for method in ("encode_text", "encode_conditions"):
            renderer.__dict__.pop(method, None)


def measure(renderer: Renderer, name: str, mode: str, case_plan: Any, settings: GenerationSettings, plan: MemoryPlan) -> dict[str, Any]:
    use_source(renderer, case_plan[2])
    peaks = PhasePeaks(renderer)
    start = time.perf_counter()
    out, steps = render_case(renderer, case_plan, settings, on_step=lambda _e: peaks.mark("denoise"))
    peaks.mark("decode")
    peaks.unwrap(renderer)
    per = {e: [s.seconds for s in steps if s.expert == e] for e in ("high", "low")}
    return dict(  # noqa: C408 -- a row of keyword columns
        mode=mode, plan=name, offload=plan.offload, weights=plan.weights, text_encoder=plan.text_encoder, vae_tiling=plan.vae_tiling,
        steps=len(steps), total_s=time.perf_counter() - start, s_per_step=sum(s.seconds for s in steps) / len(steps),
        step_s=[round(s.seconds, 3) for s in steps], high_s_per_step=_mean(per["high"]), low_s_per_step=_mean(per["low"]),
        peak_gib=max(peaks.gib.values()), phase_peak_gib={k: round(v, 2) for k, v in peaks.gib.items()}, expected_peak_gib=plan.peak_bytes / GiB,
        copied_gib=out.info.get("memory_plan", {}).get("copied_gib"), phases=out.timings, latent=out.latent,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(rows: list[dict[str, Any]]) -> None:
    """Each row's latent against the 'none' plan's for the same mode: 0 for lossless plans."""
    reference = {r["mode"]: r["latent"] for r in rows if r["plan"] == "none"}
    for row in rows:
        latent = row.pop("latent")
        ref = reference.get(row["mode"])
        row["rel_err_vs_none"] = None if ref is None else rel_error(latent, ref)
        row["identical_to_none"] = None if ref is None else bool(torch.equal(latent, ref))


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'mode':8} {'plan':10} {'offload':7} {'T5':6} {'tiled':5} {'s/step':>7} {'high':>6} {'low':>6} {'peak GiB':>8} {'expect':>6} "
          f"{'text/denoise/decode GiB':>23} {'copied':>7} {'vs none':>9}")
    for r in rows:
        err = "n/a" if r["rel_err_vs_none"] is None else ("identical" if r["identical_to_none"] else f"{r['rel_err_vs_none']:.2e}")
        ph = r["phase_peak_gib"]
        phases = "/".join(f"{ph.get(k, 0):.1f}" for k in ("text", "denoise", "decode"))
        print(f"{r['mode']:8} {r['plan']:10} {r['offload']:7} {r['text_encoder']:6} {r['vae_tiling']!s:5} {r['s_per_step']:7.2f} {r['high_s_per_step'] or 0:6.2f} "
              f"{r['low_s_per_step'] or 0:6.2f} {r['peak_gib']:8.1f} {r['expected_peak_gib']:6.1f} {phases:>23} {r['copied_gib'] or 0:7.1f} {err:>9}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", type=Path, default=Path(".tiny/Bernini-R-Diffusers"))
    p.add_argument("--modes", nargs="+", default=["t2v_apg", "v2v_apg"])
    p.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    p.add_argument("--steps", type=int, default=2, help="2: one high and one low step, each paying its expert's text K/V pass")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument("--max_gpu_memory", type=float, help="GiB: plan for and cap the allocator at this much, as on a smaller card")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bernini").setLevel(logging.WARNING)
    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", attention=args.attention, compile=args.compile)
    attention.select_backend(args.attention, "cuda")
    clock = time.perf_counter()
    renderer = build_renderer(args.tiny, runtime, with_experts=False)  # each plan builds its own
    print(f"device: {device_name()}  attention: {attention.current_backend()}  compile: {args.compile}  "
          f"fp8 via _scaled_mm: {fp8.scaled_mm_supported(renderer.device)}  base built in {time.perf_counter() - clock:.1f} s")
    settings = GenerationSettings(num_inference_steps=args.steps, height=args.height, width=args.width, num_frames=args.frames)
    cases = {mode: synthetic_case(mode, args.frames, args.height, args.width) for mode in args.modes}
    load = memory.workload_of([c[1] for c in cases.values()], runtime.batch_combos)
    rows = []
    for index, name in enumerate(args.plans):
        plan = install(renderer, name, load, args)
        if index == 0 and args.warmup:  # kernels, cuDNN plans and allocator pools, once, outside the measurements
            render_case(renderer, cases[args.modes[0]], dataclasses.replace(settings, num_inference_steps=1))
        for mode in args.modes:
            rows.append(measure(renderer, name, mode, cases[mode], settings, plan))
            r = rows[-1]
            print(f"{mode} {name}: {r['s_per_step']:.2f} s/step (steps {r['step_s']}), peak {r['peak_gib']:.1f} GiB (expected {r['expected_peak_gib']:.1f})", flush=True)
    release(renderer)
    compare(rows)
    print_table(rows)
    write_json(args.json, {"device": device_name(), "attention": attention.current_backend(), "args": vars(args) | {"tiny": str(args.tiny)}, "rows": rows})


if __name__ == "__main__":
    main()
