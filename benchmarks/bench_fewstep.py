"""Few-step vs full: a 480p t2v case at 40 steps with guidance against 4 steps with every ω 1, and the LoRA merge cost.

python benchmarks/bench_fewstep.py [--steps 40] [--no-compile] [--json out.json]

Full-size random UMT5-XXL, VAE and both experts resident on one GPU (benchmarks/bench_pipeline.py). Each case is
timed as the second of a batch: a warm-up case of the same batch shape runs first, so compilation is done.
  guided: t2v_apg, the official ω, UniPC, --steps steps (2 passes a step, batched).
  fewstep: the lightning-4step numbers without its LoRAs (plain t2v, ω 1 on both experts, Euler on the 5-point
           grid: 4 moves, the 5th step at sigma 0 skipped), so pass skipping leaves 1 pass a step.
Then a random rank-64 LoRA in the Wan layout for every block Linear is written, hashed, checked and merged into
both experts the way the loader merges it (float32 per tensor, cast back to bf16): the load-time cost of a LoRA.
Needs a tiny checkpoint for the tokenizer and scheduler config (python -m bernini make-tiny .tiny). About 6 min on an H200.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/x.py`: the root holds benchmarks/ and bernini/

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.bench_pipeline import build_renderer, synthetic_case
from benchmarks.common import device_name, write_json
from bernini import attention, lora
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.pipeline import Renderer

WAN_LINEARS = {f"self_attn.{n}": f"attn1.{d}" for n, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)}
WAN_LINEARS |= {f"cross_attn.{n}": f"attn2.{d}" for n, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)}
WAN_LINEARS |= {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def count_passes(renderer: Renderer) -> list[int]:
    """Guidance passes (batch rows) of every expert forward; no synchronization, so timing is untouched."""
    rows: list[int] = []
    for model in renderer.experts.values():
        inner = model.forward
        model.forward = lambda tokens, *a, _f=inner, **k: (rows.append(tokens.shape[0]), _f(tokens, *a, **k))[1]
    return rows


def timed_case(renderer: Renderer, mode: str, settings: GenerationSettings, warmup: GenerationSettings, rows: list[int]) -> dict:
    """Warm up with a case of the same batch shape, then time one case end to end."""
    case, plan, _ = synthetic_case(mode, settings.num_frames, settings.height, settings.width)
    renderer.render(case, warmup, plan=plan)
    rows.clear()
    sync()
    start = time.perf_counter()
    out = renderer.render(case, settings, plan=plan)
    sync()
    seconds = time.perf_counter() - start
    return dict(mode=mode, steps=settings.num_inference_steps, solver=settings.solver, seconds=seconds, forwards=len(rows), passes=sum(rows),
                expert_steps=out.info["expert_steps"], phases={k: round(v, 3) for k, v in out.timings.items()})


def random_lora(folder: Path, experts: dict[str, torch.nn.Module], rank: int, seed: int = 0) -> Path:
    """Rank-`rank` factors for every block Linear in the original Wan layout, bf16, as published LoRAs are stored."""
    model = next(iter(experts.values()))
    device = model.proj_out.weight.device
    g = torch.Generator(device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        for wan, ours in WAN_LINEARS.items():
            out_f, in_f = block.get_submodule(ours).weight.shape
            name = f"diffusion_model.blocks.{i}.{wan}"
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g, device=device) / in_f**0.5).to(torch.bfloat16).cpu()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g, device=device) * 1e-3).to(torch.bfloat16).cpu()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path = folder / f"rank{rank}.safetensors"
    save_file(tensors, str(path))
    return path


def merge_cost(renderer: Renderer, rank: int) -> dict:
    """What --lora FILE adds to a load: hash, header check, reading the factors, merging every weight of both experts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = random_lora(Path(tmp), renderer.experts, rank)
        clock = time.perf_counter()
        refs = lora.resolve([("lora", str(path))])
        hashed = time.perf_counter() - clock
        clock = time.perf_counter()
        shapes = {name: {k: tuple(v.shape) for k, v in model.state_dict().items()} for name, model in renderer.experts.items()}
        loras = {}
        for name in renderer.experts:  # the check, against the full-size experts (the tiny config is not their shape)
            deltas = lora.read_lora(path, shapes_only=True)
            keys = lora.check(refs[0], deltas, shapes[name])
            loras[name] = lora.ExpertLoras(name, tuple(r for r in refs if r.expert == name), (keys,))
        checked = time.perf_counter() - clock
        per_expert = {}
        for name, model in renderer.experts.items():
            sync()
            clock = time.perf_counter()
            merge = lora.Merger(loras[name])
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key in merge.deltas:  # what the loader does with each tensor it reads, minus the disk read
                    params[key].copy_(merge(key, params[key]).to(params[key].dtype))
            merge.finish()
            sync()
            per_expert[name] = time.perf_counter() - clock
        return dict(rank=rank, file_gib=path.stat().st_size / 2**30, sha256_s=hashed, check_s=checked, merge_s=per_expert,
                    total_s=hashed + checked + sum(per_expert.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", type=Path, default=Path(".tiny/Bernini-R-Diffusers"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--attention", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runtime = RuntimeConfig(device="cuda", dtype="bfloat16", attention=args.attention, compile=args.compile)
    attention.select_backend(args.attention, "cuda")
    clock = time.perf_counter()
    renderer = build_renderer(args.tiny, runtime)
    print(f"device: {device_name()}  attention: {attention.current_backend()}  compile: {args.compile}  setup {time.perf_counter() - clock:.0f} s")
    rows = count_passes(renderer)
    size = dict(num_frames=args.frames, height=args.height, width=args.width)
    guided = GenerationSettings(num_inference_steps=args.steps, **size)
    ones = {f"omega_{t}{e}": 1.0 for t in ("vid", "img", "txt") for e in ("", "_low")}
    fewstep = GenerationSettings(num_inference_steps=5, use_unipc=False, flow_shift=5.0, guidance_mode="t2v", **ones, **size)
    results = {}
    # Warm-ups of the same batch shapes: 2 steps, one per expert (u/c batched), and the few-step case itself.
    results["guided"] = timed_case(renderer, "t2v_apg", guided, dataclasses.replace(guided, num_inference_steps=2, switch_step=1), rows)
    results["fewstep"] = timed_case(renderer, "t2v", fewstep, fewstep, rows)
    ratio = results["fewstep"]["seconds"] / results["guided"]["seconds"]
    for name, row in results.items():
        print(f"{name}: {row['mode']} {row['steps']} steps ({row['solver']}): {row['seconds']:.1f} s, {row['forwards']} forwards / {row['passes']} passes, "
              f"experts {row['expert_steps']} | " + " ".join(f"{k}={v:.2f}s" for k, v in row["phases"].items()))
    print(f"fewstep / guided = {ratio:.4f} (target <= 1/12 = {1 / 12:.4f}: {'met' if ratio <= 1 / 12 else 'NOT met'})")
    cost = merge_cost(renderer, args.rank)
    print(f"LoRA rank {cost['rank']} ({cost['file_gib']:.2f} GiB bf16): sha256 {cost['sha256_s']:.2f} s, check {cost['check_s']:.2f} s, "
          f"merge " + ", ".join(f"{k} {v:.2f} s" for k, v in cost["merge_s"].items()) + f"; total {cost['total_s']:.2f} s added to the load")
    write_json(args.json, {"device": device_name(), "cases": results, "ratio": ratio, "lora": cost})


if __name__ == "__main__":
    main()
