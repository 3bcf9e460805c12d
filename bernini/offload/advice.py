"""What would make a fitting plan faster, and the nearest settings under which one that does not fit would."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bernini.offload.options import CHUNKS, OFFLOADS, Judge, Option, Room, candidates, weight_sizes
from bernini.offload.sizes import GiB, ModelSizes, Workload

SIZE_STEPS = 24  # candidate scales between 1 and 1/4 when looking for a size that fits
CONVERT = "bernini convert --weights fp8 --output DIR once, then --high_noise_ckpt DIR --low_noise_ckpt DIR"


@dataclass(frozen=True)
class MemoryFlags:
    """The memory flags of the run (what the nearest settings may leave to the plan), and what the expert files hold."""

    offload: str
    t5_cpu: bool
    vae_tiling: bool | None
    batch_passes: bool
    weights: str
    stored: str | None


def faster_options(
    sizes: ModelSizes,
    load: Workload,
    dtype: str,
    weights_format: str,
    chosen: Option,
    room: Room,
    t5_cpu: bool,
    fits: bool | None,
    batch_passes: bool = True,
    stored: str | None = None,
) -> tuple[str, ...]:
    """What would make a fitting run faster: memory to free, or flags."""
    if room.gpu is None or fits is False:
        return ()
    judge = Judge(sizes, load, dtype, weight_sizes(sizes, dtype, weights_format), room)
    tips = [_shortfall(judge, _leanest(judge, Option(o, "visit", chosen.tiling)), f"--offload {o}") for o in OFFLOADS[: OFFLOADS.index(chosen.offload)]]
    if chosen.host != "pinned":
        tips.append(_shortfall(judge, replace(chosen, host="pinned"), "every expert pinned in host memory"))
    if chosen.text != "visit":
        what = "dropping --t5_cpu (encode on the GPU)" if t5_cpu and chosen.text == "cpu" else "the text encoder to visit the GPU whole"
        tips.append(_shortfall(judge, replace(chosen, text="visit"), what))
    if chosen.tiling:
        tips.append(_shortfall(judge, replace(chosen, tiling=False), "an untiled VAE"))
    if batch_passes and not chosen.batch:
        tips.append(_shortfall(judge, replace(chosen, batch=True, chunk=0), "batched guidance passes"))
    if chosen.chunk:
        tips.append(_shortfall(judge, replace(chosen, chunk=0), "whole-sequence activations"))
    if weights_format == "bf16":
        fp8 = Judge(sizes, load, dtype, weight_sizes(sizes, dtype, "fp8"), room)
        for files, how in ((stored, ""), ("fp8", f" from experts converted once ({CONVERT})")):
            better = fp8.first([o for o in candidates("auto", t5_cpu, chosen.tiling, batch_passes, files == "fp8") if o.cost < chosen.cost])
            if better is not None:
                tips.append(f"--weights fp8 (lossy){how} fits {_name(better)}")
                break
    return tuple(t for t in tips if t)


def _name(option: Option) -> str:
    host = "" if option.offload != "block" or option.host == "pinned" else f", host {option.host}"
    return f"--offload {option.offload}{host}"


def _leanest(judge: Judge, base: Option) -> Option:
    pool = [replace(base, text=t, batch=b, chunk=c) for t in ("visit", "stream", "cpu") for b in (True, False) for c in CHUNKS]
    return min(pool, key=judge.gpu)


def _shortfall(judge: Judge, option: Option, what: str) -> str:
    room = judge.room
    gpu_short = judge.gpu(option) - room.gpu if room.gpu is not None else 0.0
    host_short = judge.host(option) - room.host if room.host is not None else 0.0
    parts = [f"{gpu_short / GiB:.1f} GiB of GPU memory" + (" (raise --max_gpu_memory)" if room.capped else "")] if gpu_short > 0 else []
    parts += [f"{host_short / GiB:.1f} GiB of host memory"] if host_short > 0 else []
    return f"free {' and '.join(parts)} for {what}" if parts else ""


def nearest_settings(sizes: ModelSizes, load: Workload, dtype: str, room: Room, flags: MemoryFlags) -> tuple[str, ...]:
    """The nearest settings under which the run would fit: a lower-memory plan, fp8, a smaller size, fewer frames
    (fp8 together with a smaller size or fewer frames when no single change fits)."""
    def fits(weights: str, stored: str | None, work: Workload = load, **forced: Any) -> Option | None:
        judge = Judge(sizes, work, dtype, weight_sizes(sizes, dtype, weights), room)
        allowed = dict(offload=flags.offload, t5_cpu=flags.t5_cpu, vae_tiling=flags.vae_tiling, batch_passes=flags.batch_passes) | forced
        return judge.first(candidates(streamable=stored == weights, **allowed))

    def smaller(weights: str, stored: str | None) -> list[str]:
        found = []
        scale = next((s for s in (1 - 0.75 * i / SIZE_STEPS for i in range(1, SIZE_STEPS + 1)) if fits(weights, stored, load.scaled(s))), None)
        if scale is not None and load.max_side:
            side = max(16, int(load.max_side * scale) // 16 * 16)
            found.append(f"--max_image_size {side} (source media) or --height/--width with the longer side at most {side}")
        frames = next((f for f in range(load.frames - 4, 0, -4) if fits(weights, stored, load.scaled(1.0, f))), None)
        if frames is not None:
            found.append(f"--num_frames {frames}")
        return found

    convert = CONVERT
    judge = Judge(sizes, load, dtype, weight_sizes(sizes, dtype, flags.weights), room)
    leanest = min(candidates(flags.offload, flags.t5_cpu, flags.vae_tiling, flags.batch_passes, flags.stored == flags.weights), key=lambda o: (judge.gpu(o), judge.host(o)))
    tips = [_shortfall(judge, leanest, _name(leanest))]
    freed = fits(flags.weights, flags.stored, offload="auto", t5_cpu=False, vae_tiling=None, batch_passes=True)
    if freed is not None and (flags.offload != "auto" or flags.t5_cpu or flags.vae_tiling is not None or not flags.batch_passes):
        tips.append(f"{_name(freed)}: leave --offload, --t5_cpu, --vae_tiling and --batch_passes to the plan")
    fp8 = flags.weights == "bf16" or flags.stored != "fp8"
    if flags.weights == "bf16" and fits("fp8", flags.stored):
        tips.append("--weights fp8 (lossy)")
    elif fp8 and fits("fp8", "fp8"):
        tips.append(f"--weights fp8 (lossy) from experts converted so that only the one in use is held in host memory: {convert}")
    tips += smaller(flags.weights, flags.stored)
    if len(tips) == 1 and fp8:
        tips += [f"--weights fp8 (lossy, {convert}) and {tip}" for tip in smaller("fp8", "fp8")]
    return tuple(t for t in tips if t)
