"""Peak GPU and host memory and seconds per step per memory plan, through the real pipeline with full-size random weights.

python benchmarks/bench_memory.py --modes t2v_apg v2v_apg --plans none expert block fp8-none fp8-block --steps 2 [--json out.json]
python benchmarks/bench_memory.py --modes t2v_apg --plans auto --max_gpu_memory 23   # what a 24 GB card gets
python benchmarks/bench_memory.py --modes t2v_apg v2v_apg rv2v --steps 2 1 1 --plans none fp8-auto-disk auto-disk \\
    --max_gpu_memory 11 --host_memory 32                                              # a 12 GB card with 32 GB of host memory

Plans: none | expert | block with bf16 weights, fp8-none | fp8-block with FP8 block weights (all uncapped), auto | fp8-auto as
the runner would choose for the free memory, capped by --max_gpu_memory (the allocator too) and --host_memory, and
auto-disk | fp8-auto-disk the same with the experts in files the plan may read back block by block (bf16, and FP8 as
`bernini convert` writes it; the conversion is timed). Both experts share one set of random weights (one file serves
both; the switch still reads the other expert back), so every lossless plan's latents must equal none's: the table says.
Peaks per phase (text, media encode, denoise steps, decode) are the allocator's; host is the process's peak resident
memory (pinned buffers included) per plan, with the plan's expected peaks beside. --steps: one count, or one per mode;
2 steps are one 'high' and one 'low' step at 480p, so the expert switch is inside the measurement (a 40-step case
has the same two switches). Each plan first renders one step (warm-up: kernels, allocator, a block pool's first
fill); the expert files' page cache is dropped after it, so a switch reads from the disk.
Needs a tiny checkpoint for the tokenizer and scheduler (python -m bernini.testing make-tiny .tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import torch

from benchmarks.bench_pipeline import UMT5_XXL, build_renderer, synthetic_case
from benchmarks.common import A14B, device_name, random_expert, rel_error, write_json
from bernini import attention, convert, fp8, offload, weights
from bernini.cases import Case
from bernini.conditioning import Conditions
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.models import WanTransformer, compile_blocks, fuse_projections
from bernini.offload import ExpertStore, GiB, MemoryPlan, sizes
from bernini.pipeline import Renderer, block_finisher, cap_gpu_memory
from bernini.plan import CasePlan, MediaPlan, latent_grid
from bernini.sampling import StepEvent


@dataclasses.dataclass(frozen=True)
class Spec:
    offload: str  # none | expert | block | auto
    weights: str  # bf16 | fp8
    disk: bool = False  # the experts are files the plan may read back (else: built in memory, every expert pinned)

    @property
    def capped(self) -> bool:
        return self.offload == "auto"


PLANS = {"none": Spec("none", "bf16"), "expert": Spec("expert", "bf16"), "block": Spec("block", "bf16"), "fp8-none": Spec("none", "fp8"),
         "fp8-block": Spec("block", "fp8"), "auto": Spec("auto", "bf16"), "fp8-auto": Spec("auto", "fp8"),
         "auto-disk": Spec("auto", "bf16", True), "fp8-auto-disk": Spec("auto", "fp8", True)}
VAE_BYTES = 508 * 10**6  # the Wan2.1 VAE's safetensors
SEED = 0


def a14b_sizes() -> sizes.ModelSizes:
    tcfg = dict(dataclasses.asdict(A14B))
    text = {**UMT5_XXL, "model_type": "umt5"}
    return sizes.ModelSizes(sizes.transformer_params(tcfg), 2, sizes.umt5_encoder_params(text), VAE_BYTES, A14B.dim, A14B.ffn_dim, A14B.num_layers,
                            fp32_params=sizes.transformer_fp32_params(tcfg), text_unit_params=sizes.umt5_embedding_params(text))


# --------------------------------------------------------------------------- host memory of the process


def reset_host_peak() -> bool:
    """Reset the kernel's peak-resident counter (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def host_peak_gib() -> float:
    """Peak resident memory of this process since the last reset (pinned pages are resident pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


# --------------------------------------------------------------------------- experts: in memory, or files read back


@dataclasses.dataclass
class Files:
    """The experts written once: bf16 and FP8 (as `bernini convert` writes them), and how long the FP8 conversion took."""

    root: Path
    convert_s: float | None = None
    convert_gb: float = 0.0
    write_bf16_s: float | None = None

    def folder(self, weights_format: str) -> Path:
        return self.root / weights_format


def write_files(root: Path, formats: set[str]) -> Files:
    files = Files(root)
    need = {"bf16": 29e9, "fp8": 15e9}
    free = shutil.disk_usage(root).free
    if free < sum(need[f] for f in formats) * 1.05:
        raise SystemExit(f"{root}: {free / 1e9:.0f} GB free, {sum(need[f] for f in formats) / 1e9:.0f} GB needed for {sorted(formats)}; pass --files DIR elsewhere")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(A14B).items()}
    identity = {"random": f"seed {SEED}"}
    if "bf16" in formats:
        model = random_expert(seed=SEED)
        start = time.perf_counter()
        convert.write_expert(model, files.folder("bf16"), "bf16", config, identity)
        files.write_bf16_s = time.perf_counter() - start
        del model
    if "fp8" in formats:
        model = random_expert(seed=SEED)
        torch.cuda.synchronize()
        start = time.perf_counter()  # the one-time conversion: quantize each block on the GPU, write it
        files.convert_gb = convert.write_expert(model, files.folder("fp8"), "fp8", config, identity) / 1e9
        files.convert_s = time.perf_counter() - start
        del model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"files: bf16 written in {files.write_bf16_s or 0:.1f} s; fp8 conversion {files.convert_gb:.1f} GB in {files.convert_s or 0:.1f} s (one expert)", flush=True)
    return files


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the files' cached pages, so the first reads come from the disk (this host has more RAM than 32 GB)."""
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            try:
                os.fsync(f.fileno())  # dirty pages are not dropped
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError) as exc:
                print(f"cannot drop the page cache of {file.name} ({exc}): reads may come from memory", flush=True)
                return


def lazy_expert(folder: Path, weights_format: str, device: torch.device) -> WanTransformer:
    """An expert whose blocks stay in ``folder`` until the store reads them (what Renderer.load does for such plans)."""
    with torch.device("meta"):
        model = WanTransformer(A14B)
    keys = {k: (f, k) for k, f in weights.find_safetensors(folder).items()}
    if weights_format == "fp8":
        convert.fp8_shells(model, "fp8", device)
    fuse_projections(model)  # the empty blocks: the files' to_q, to_k and to_v rows are read into to_qkv
    offload.load_lazily(model, [keys], device=device, dtype=torch.bfloat16, keep_fp32=WanTransformer.keep_fp32 + fp8.KEEP_FP32)
    return model.eval().requires_grad_(False)


def memory_experts(plan: MemoryPlan, device: torch.device) -> dict[str, WanTransformer]:
    """Random experts in the plan's storage, built in memory: each block finished as Renderer.load does (fused QKV,
    FP8, a pinned host copy) before the next expert is made."""
    experts = {}
    for name in ("high", "low"):
        model = random_expert(seed=SEED)
        finish = block_finisher(model, plan, device)
        for block in model.blocks:
            finish(block)
        experts[name] = model
    return experts


# --------------------------------------------------------------------------- one plan


def release(renderer: Renderer) -> None:
    """Drop the previous plan's experts (and their pinned host copies) before building the next."""
    renderer.store.close()
    renderer.experts = {}
    renderer.store = ExpertStore({})
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)


def install(renderer: Renderer, name: str, load: sizes.Workload, args: argparse.Namespace, files: Files | None) -> MemoryPlan:
    """Plan for the free memory now, build the experts that way, and place UMT5 and the VAE as the plan says."""
    release(renderer)
    spec = PLANS[name]
    device = renderer.device
    stored = spec.weights if spec.disk else None
    plan = offload.plan_memory(a14b_sizes(), load, dtype="bfloat16", weights_format=spec.weights, offload=spec.offload, t5_cpu=args.t5_cpu,
                               gpu_free=sizes.gpu_free_bytes(str(device)), host_free=sizes.host_free_bytes(),
                               max_gpu_memory=args.max_gpu_memory if spec.capped else None, host_memory=args.host_memory if spec.capped else None, stored=stored)
    print(f"{name}: {plan.describe()}", flush=True)
    offload.require_fit(plan)
    clock = time.perf_counter()
    if plan.reads_blocks:
        assert files is not None
        experts = {e: lazy_expert(files.folder(spec.weights), spec.weights, device) for e in ("high", "low")}
    else:
        experts = memory_experts(plan, device)
    for model in experts.values():
        model.chunk_tokens = plan.chunk_tokens
        if args.compile:
            compile_blocks(model)
    renderer.experts = experts
    renderer.store = ExpertStore(experts, plan.offload, device, plan.prefetch_bytes, plan.host_blocks)
    renderer.memory_plan = plan
    renderer.runtime = dataclasses.replace(renderer.runtime, offload=plan.offload, weights=spec.weights, batch_passes=plan.batch_passes)
    renderer.place_text_encoder()
    (renderer.vae.model.enable_tiling if plan.vae_tiling else renderer.vae.model.disable_tiling)()
    if spec.capped:
        cap_gpu_memory(args.max_gpu_memory, device)
    torch.cuda.synchronize()
    print(f"{name}: experts built and placed in {time.perf_counter() - clock:.1f} s", flush=True)
    return plan


# --------------------------------------------------------------------------- cases


def rv2v_case(frames: int, height: int, width: int) -> tuple[Case, CasePlan, torch.Tensor, torch.Tensor]:
    """A source video and one reference image: rv2v's four passes over three layouts."""
    grid = latent_grid(frames, height, width)
    ref_grid = latent_grid(1, height, width)
    n, ref = grid[0] * grid[1] * grid[2], ref_grid[1] * ref_grid[2]
    case = Case(name="rv2v", source="<bench>", task_type="rv2v", prompt="replace the pattern with the reference", guidance_mode="rv2v")
    media = (MediaPlan("<synthetic>", "video", frames, width, height, grid), MediaPlan("<synthetic>", "image", 1, width, height, ref_grid))
    plan = CasePlan(case.name, "rv2v", "rv2v", frames, width, height, 16.0, grid, "<none>", media, 4, (n, 2 * n, 2 * n + ref, 2 * n + ref), 0)
    return case, plan, torch.rand(3, frames, height, width) * 2 - 1, torch.rand(3, 1, height, width) * 2 - 1


def synthetic(mode: str, args: argparse.Namespace) -> tuple[Case, CasePlan, Callable[[Renderer], Conditions] | None]:
    if mode == "rv2v":
        case, plan, video, image = rv2v_case(args.frames, args.height, args.width)
        return case, plan, lambda r: Conditions(videos=(r.encode_pixels(video),), images=(r.encode_pixels(image),))
    case, plan, video = synthetic_case(mode, args.frames, args.height, args.width)
    return case, plan, None if video is None else (lambda r, _v=video: Conditions(videos=(r.encode_pixels(_v),)))


class PhasePeaks:
    """The allocator's peak per phase of a render: read and reset at each phase boundary (reserved too)."""

    def __init__(self, renderer: Renderer, conditions: Callable[[Renderer], Conditions] | None) -> None:
        self.gib: dict[str, float] = {}
        self.reserved = 0.0
        encode_text = renderer.encode_text

        def text(*args: Any) -> Any:
            self.mark("before")
            out = encode_text(*args)
            self.mark("text")
            return out

        def media(case: Case, settings: GenerationSettings) -> Conditions:
            out = conditions(renderer)  # type: ignore[misc]
            self.mark("encode")
            return out

        renderer.encode_text = text  # type: ignore[method-assign]
        if conditions is not None:  # the synthetic case's media, VAE-encoded where the renderer encodes its conditions
            renderer.encode_conditions = media  # type: ignore[method-assign]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def mark(self, phase: str) -> None:
        torch.cuda.synchronize()
        self.gib[phase] = max(self.gib.get(phase, 0.0), torch.cuda.max_memory_allocated() / GiB)
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved() / GiB)
        torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def unwrap(renderer: Renderer) -> None:
        for method in ("encode_text", "encode_conditions"):
            renderer.__dict__.pop(method, None)


def measure(renderer: Renderer, name: str, mode: str, case: tuple, settings: GenerationSettings, plan: MemoryPlan) -> dict[str, Any]:
    the_case, case_plan, conditions = case
    peaks = PhasePeaks(renderer, conditions)
    reset = reset_host_peak()
    copied, read = renderer.store.copied_bytes, renderer.store.read_bytes
    steps: list[StepEvent] = []
    start = time.perf_counter()
    out = renderer.render(the_case, settings, plan=case_plan, on_step=lambda e: (steps.append(e), peaks.mark("denoise")))
    peaks.mark("decode")
    peaks.unwrap(renderer)
    per = {e: [s.seconds for s in steps if s.expert == e] for e in ("high", "low")}
    expected = plan.phases or offload.Phases(0, 0, 0, 0)
    return dict(  # noqa: C408 -- a row of keyword columns
        mode=mode, plan=name, offload=plan.offload, host=plan.host, weights=plan.weights, text_encoder=plan.text_encoder, vae_tiling=plan.vae_tiling,
        batch_passes=plan.batch_passes, chunk_tokens=plan.chunk_tokens, steps=len(steps), total_s=time.perf_counter() - start,
        s_per_step=sum(s.seconds for s in steps) / len(steps), step_s=[round(s.seconds, 3) for s in steps], high_s_per_step=_mean(per["high"]),
        low_s_per_step=_mean(per["low"]), peak_gib=max(peaks.gib.values()), reserved_gib=peaks.reserved, expected_peak_gib=plan.peak_bytes / GiB,
        phase_peak_gib={k: round(v, 2) for k, v in peaks.gib.items() if k != "before"},
        expected_phase_gib={k: round(getattr(expected, k) / GiB, 2) for k in ("text", "encode", "denoise", "decode")},
        host_peak_gib=host_peak_gib(), host_peak_is_per_plan=reset, expected_host_gib=plan.host_bytes / GiB,
        copied_gib=(renderer.store.copied_bytes - copied) / GiB, read_gib=(renderer.store.read_bytes - read) / GiB, phases=out.timings, latent=out.latent,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(rows: list[dict[str, Any]]) -> None:
    """Each row's latent and seconds per step against the 'none' plan's for the same mode (lossless plans: identical)."""
    reference = {r["mode"]: r for r in rows if r["plan"] == "none"}
    for row in rows:
        ref = reference.get(row["mode"])
        row["rel_err_vs_none"] = None if ref is None else rel_error(row["latent"], ref["latent"])
        row["identical_to_none"] = None if ref is None else bool(torch.equal(row["latent"], ref["latent"]))
        row["vs_none"] = None if ref is None else row["s_per_step"] / ref["s_per_step"]
    for row in rows:
        row.pop("latent")


def print_table(rows: list[dict[str, Any]], files: Files | None) -> None:
    print(f"\n{'mode':8} {'plan':13} {'placement':31} {'s/step':>7} {'vs none':>7} {'GPU peak':>8} {'expect':>6} {'reserved':>8} "
          f"{'text/encode/denoise/decode GiB (expected)':>47} {'host GiB':>8} {'expect':>6} {'read':>5} {'latent':>9}")
    for r in rows:
        err = "n/a" if r["rel_err_vs_none"] is None else ("identical" if r["identical_to_none"] else f"{r['rel_err_vs_none']:.2e}")
        ph, ex = r["phase_peak_gib"], r["expected_phase_gib"]
        phases = "/".join(f"{ph.get(k, 0):.1f}" for k in ("text", "encode", "denoise", "decode"))
        phases += " (" + "/".join(f"{ex[k]:.1f}" for k in ("text", "encode", "denoise", "decode")) + ")"
        place = f"{r['offload']}/{r['host']}/{r['weights']}/T5 {r['text_encoder']}/{'tiled' if r['vae_tiling'] else 'untiled'}"
        place += f"/{'b' if r['batch_passes'] else 'u'}{'/c' + str(r['chunk_tokens']) if r['chunk_tokens'] else ''}"
        ratio = "" if r["vs_none"] is None else f"{r['vs_none']:.2f}x"
        print(f"{r['mode']:8} {r['plan']:13} {place:31} {r['s_per_step']:7.2f} {ratio:>7} {r['peak_gib']:8.2f} {r['expected_peak_gib']:6.2f} {r['reserved_gib']:8.2f} "
              f"{phases:>47} {r['host_peak_gib']:8.1f} {r['expected_host_gib']:6.1f} {r['read_gib']:5.1f} {err:>9}")
    if files is not None and files.convert_s is not None:
        print(f"one-time conversion to FP8 (bernini convert's writer, from a bf16 expert on the GPU): {files.convert_gb:.1f} GB in {files.convert_s:.1f} s per expert")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", type=Path, default=Path(".tiny/Bernini-R-Diffusers"))
    p.add_argument("--modes", nargs="+", default=["t2v_apg", "v2v_apg"], choices=["t2v_apg", "v2v_apg", "rv2v"])
    p.add_argument("--plans", nargs="+", default=["none", "expert", "block", "fp8-none", "fp8-block"], choices=list(PLANS))
    p.add_argument("--steps", type=int, nargs="+", default=[2], help="one count for every mode, or one per mode")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument("--max_gpu_memory", type=float, help="GiB: the auto plans plan for and cap the allocator at this much, as on a smaller card")
    p.add_argument("--host_memory", type=float, help="GiB: the auto plans plan for a host with this much RAM")
    p.add_argument("--files", type=Path, help="where the *-disk plans' expert files go (default: a temporary folder, removed at the end)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json")
    args = p.parse_args()
    steps = dict(zip(args.modes, args.steps if len(args.steps) == len(args.modes) else [args.steps[0]] * len(args.modes), strict=True))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bernini").setLevel(logging.WARNING)
    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", attention=args.attention, compile=args.compile)
    attention.select_backend(args.attention, "cuda")
    clock = time.perf_counter()
    renderer = build_renderer(args.tiny, runtime, with_experts=False)  # each plan builds its own
    print(f"device: {device_name()}  attention: {attention.current_backend()}  compile: {args.compile}  "
          f"fp8 via _scaled_mm: {fp8.scaled_mm_supported(renderer.device)}  base built in {time.perf_counter() - clock:.1f} s", flush=True)
    cases = {mode: synthetic(mode, args) for mode in args.modes}
    load = sizes.workload_of([c[1] for c in cases.values()], runtime.batch_passes)
    disk = {PLANS[n].weights for n in args.plans if PLANS[n].disk}
    root = args.files or Path(tempfile.mkdtemp(prefix="bernini-bench-experts-"))
    files = write_files(root, disk) if disk else None
    rows = []
    try:
        for index, name in enumerate(args.plans):
            try:
                plan = install(renderer, name, load, args, files)
            except offload.MemoryPlanError as exc:  # refused before anything is built: the next plan may fit
                print(f"{name}: skipped: {exc}", flush=True)
                continue
            if args.warmup:  # kernels, cuDNN plans, allocator pools and a pool's first fill, outside the measurements
                first = cases[args.modes[0]]
                PhasePeaks(renderer, first[2])
                renderer.render(first[0], GenerationSettings(num_inference_steps=1, height=args.height, width=args.width, num_frames=args.frames), plan=first[1])
                PhasePeaks.unwrap(renderer)
            if renderer.store.pool is not None and files is not None:  # what the measured switches read comes from the disk
                drop_page_cache(files.folder(PLANS[name].weights))
            for mode in args.modes:
                settings = GenerationSettings(num_inference_steps=steps[mode], height=args.height, width=args.width, num_frames=args.frames)
                row = measure(renderer, name, mode, cases[mode], settings, plan)
                rows.append(row)
                snapshot(args, rows, files)  # what is measured so far survives a time limit
                print(f"{mode} {name}: {row['s_per_step']:.2f} s/step (steps {row['step_s']}), GPU peak {row['peak_gib']:.2f} GiB (expected "
                      f"{row['expected_peak_gib']:.2f}), host peak {row['host_peak_gib']:.1f} GiB (expected {row['expected_host_gib']:.1f}), "
                      f"read {row['read_gib']:.1f} GiB from disk", flush=True)
        release(renderer)
    finally:
        if args.files is None:
            shutil.rmtree(root, ignore_errors=True)
    compare(rows)
    snapshot(args, rows, files)
    print_table(rows, files)


def snapshot(args: argparse.Namespace, rows: list[dict[str, Any]], files: Files | None) -> None:
    """The rows so far (latents left out) to --json, else $OUT/bench_memory.json when $OUT is set."""
    out = os.environ.get("OUT")
    write_json(args.json or (str(Path(out) / "bench_memory.json") if out else None),
               {"device": device_name(), "attention": attention.current_backend(), "args": {k: str(v) for k, v in vars(args).items()},
                "rows": [{k: v for k, v in r.items() if k != "latent"} for r in rows],
                "conversion": None if files is None else {"fp8_seconds": files.convert_s, "fp8_gb": files.convert_gb, "bf16_write_seconds": files.write_bf16_s}})


if __name__ == "__main__":
    main()
