"""The renderer: owns the text encoder, VAE and experts, and turns a case into frames in named phases."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bernini import attention, convert, fp8, lora, media, offload, weights
from bernini.cases import Case
from bernini.conditioning import Conditions, Source, SourceIdRule
from bernini.config import DEFAULT_CONFIG_DIR, GenerationSettings, RendererConfig, RuntimeConfig
from bernini.guidance import get_mode
from bernini.models import (
    VAE,
    LocalSequence,
    TextEncoder,
    TransformerConfig,
    WanTransformer,
    compile_blocks,
    fuse_projections,
    patchify,
    positive_text,
    unpatchify,
)
from bernini.offload import ExpertStore, MemoryPlan
from bernini.plan import PATCH, CasePlan, effective_settings, plan_case
from bernini.sampling import Denoiser, LocalPasses, SamplingPlan, StepEvent, initial_noise, sampling_plan

log = logging.getLogger(__name__)

EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is available; run with --device cpu (slow, for tiny checkpoints) or on a GPU machine")
    return device


@dataclass(frozen=True)
class ModelSources:
    """Where each component comes from, resolved before anything loads."""

    config_dir: Path
    renderer: RendererConfig
    base: Path  # tokenizer, text_encoder, vae, scheduler (and base transformer weights)
    expert_ckpts: dict[str, str | None]

    def identity(self) -> dict[str, Any]:
        return {
            "config": str(self.config_dir),
            "base": str(self.base),
            "experts": {k: v or str(self.base / EXPERT_FOLDERS[k]) for k, v in self.expert_ckpts.items()},
        }


def resolve_sources(config: str, high_noise_ckpt: str | None = None, low_noise_ckpt: str | None = None) -> ModelSources:
    """--config (our config folder, a Bernini-R-Diffusers folder or a hub id) + optional separate experts."""
    if (high_noise_ckpt is None) != (low_noise_ckpt is None):
        raise ValueError("--high_noise_ckpt and --low_noise_ckpt go together: give both or neither")
    config_dir = weights.resolve_model_dir(config)
    cfg_file = config_dir / "config.json"
    renderer = RendererConfig.from_json(cfg_file) if cfg_file.is_file() else RendererConfig(wan22_base=str(config_dir))
    # Like upstream: a config folder that holds the shared components is its own base.
    if all((config_dir / sub).is_dir() for sub in ("tokenizer", "text_encoder", "vae")):
        base = config_dir
    else:
        candidate = (config_dir / renderer.wan22_base) if not Path(renderer.wan22_base).is_absolute() else Path(renderer.wan22_base)
        base = weights.resolve_model_dir(str(candidate) if candidate.is_dir() else renderer.wan22_base)
    ckpts = {"high": high_noise_ckpt, "low": low_noise_ckpt}
    if high_noise_ckpt is None and base != config_dir:
        log.warning("no --high_noise_ckpt/--low_noise_ckpt given: the experts are the base weights of %s", base)
    return ModelSources(config_dir, renderer, base, {k: ckpts[k] for k in renderer.experts})


def expert_weight_sources(sources: ModelSources, name: str) -> list[dict[str, tuple[Path, str]]]:
    """Priority-ordered key maps (model key -> (file, key in file)) for one expert."""
    found: list[dict[str, tuple[Path, str]]] = []
    ckpt = sources.expert_ckpts.get(name)
    if ckpt:
        found.append(weights.find_expert_tensors(ckpt, name))
    folder = sources.base / EXPERT_FOLDERS[name]
    if folder.is_dir():
        files = weights.find_safetensors(folder)
        found.append({k: (f, k) for k, f in files.items()})
    if not found:
        raise weights.WeightsError(f"no weights for the {name!r} expert: {folder} is missing and no checkpoint was given")
    return found


def expert_configs(sources: ModelSources) -> dict[str, Path]:
    """Each expert's transformer config.json (what LoRAs are checked against before anything loads)."""
    return {name: sources.base / EXPERT_FOLDERS[name] / "config.json" for name in sources.renderer.experts}


def load_expert(
    sources: ModelSources,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    plan: MemoryPlan | None = None,
    fp8_gemm: str | None = None,
    loras: lora.ExpertLoras | None = None,
    sequence: LocalSequence | None = None,
) -> WanTransformer:
    """One expert (with this rank's sequence hooks), each block finished as it lands (fused projections, FP8 conversions, a packed host copy).

    With fp8 weights or an offload plan it loads block by block; ``fp8_gemm``: the backend chosen by fp8.select_gemm.
    LoRAs are merged into each weight as it is read, in float32, before any of that.
    """
    folder = sources.base / EXPERT_FOLDERS[name]
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise weights.WeightsError(f"{cfg_path} is missing: the base model must provide the transformer config")
    cfg = TransformerConfig.from_dict(json.loads(cfg_path.read_text()))
    with torch.device("meta"):
        model = WanTransformer(cfg, sequence, chunk_tokens=plan.chunk_tokens if plan is not None else 0)
    keys = expert_weight_sources(sources, name)
    if convert.holds_fp8(keys):  # written by `bernini convert --weights fp8`: loaded as stored, never re-quantized
        convert.fp8_shells(model, plan.weights if plan is not None else "bf16", device)
    keep = WanTransformer.keep_fp32 + fp8.KEEP_FP32
    each_block = block_finisher(model, plan, device, fp8_gemm)
    merge = lora.Merger(loras) if loras is not None else None
    if plan is None or (plan.offload == "none" and plan.weights == "bf16"):
        weights.load_weights(model, keys, device=device, dtype=dtype, keep_fp32=keep, transform=merge)
        for block in model.blocks:
            each_block(block)
    elif plan.reads_blocks:  # the blocks stay on disk as stored; the store reads them as they are used
        if merge is not None or fp8_gemm is not None:
            raise ValueError("LoRAs and --fp8_gemm change the weights at load, so no block can be read back from the files as stored; "
                             "the memory plan keeps every block in host memory then (this plan was forced on it)")
        fuse_projections(model)  # on the empty blocks: the files' to_q, to_k and to_v rows are read into to_qkv
        offload.load_lazily(model, keys, device=device, dtype=dtype, keep_fp32=keep)
    else:
        offload.load_blockwise(model, keys, device=device, dtype=dtype, keep_fp32=keep, each_block=each_block, transform=merge)
    if merge is not None:
        merge.finish()
    return model.eval().requires_grad_(False)


def block_finisher(model: WanTransformer, plan: MemoryPlan | None, device: torch.device, fp8_gemm: str | None = None) -> Callable[[nn.Module], None]:
    """What happens to a block right after it loads: QKV fusion, FP8 conversions, then packing into (pinned) host memory."""
    weights_format = plan.weights if plan is not None else "bf16"
    use_scaled_mm = weights_format == "fp8" and fp8.scaled_mm_supported(device)
    blocks = list(model.blocks)  # load_blockwise swaps model.blocks out while the rest loads

    def finish(block: nn.Module) -> None:
        block.attn1.fuse_qkv()
        if fp8_gemm is not None:
            fp8.convert_gemms(block, fp8_gemm, next(i for i, b in enumerate(blocks) if b is block), len(blocks))
        if weights_format == "fp8":
            fp8.quantize_linears(block, use_scaled_mm)
        if plan is not None and plan.offload != "none":
            offload.host_copy(block, pin=device.type == "cuda")

    return finish


def cap_gpu_memory(max_gib: float | None, device: torch.device) -> None:
    """--max_gpu_memory binds the allocator too, so a smaller card's tier can be run on a bigger one."""
    if max_gib is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" alone names no index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max_gib * offload.GiB / total, 1.0), index)


def log_plan(plan: MemoryPlan) -> None:
    log.log(logging.WARNING if plan.fits is False else logging.INFO, "%s", plan.describe())


def prepare_expert(model: WanTransformer, runtime: RuntimeConfig) -> WanTransformer:
    if runtime.compile or (runtime.compile is None and next(model.parameters()).device.type == "cuda"):
        compile_blocks(model)
    return model


@dataclass(frozen=True)
class Placement:
    """This process's part in rendering a case; the default is a process that does all of it.

    bernini.parallel builds one per rank of a model group and passes it to Renderer.load; nothing
    is set on a renderer afterwards.
    """

    sequence: LocalSequence = field(default_factory=LocalSequence)  # Ulysses: shard, attend and gather over the group
    passes: LocalPasses = field(default_factory=LocalPasses)  # CFG parallel: which guidance passes run here
    decodes: bool = True  # False on ranks that help a group but do not decode or write


@dataclass
class Prepared:
    """A case ready to denoise: the prompt, text embeddings, condition latents, noise and sampling plan."""

    case: Case
    plan: CasePlan
    prompt_used: str
    text: dict[str, torch.Tensor]  # {'u': negative, 'c': positive} [1, 512, D]
    conditions: Conditions
    noise: torch.Tensor  # packed [1, L_target, F] float32
    sampling: SamplingPlan
    rule: SourceIdRule
    timings: dict[str, float] = field(default_factory=dict)
    copied_bytes: int = 0  # the expert store's copy counter when the case started


@dataclass
class Denoised:
    """The final latent of a case and what its denoising did."""

    latent: torch.Tensor  # normalized latent [1, 16, T', H', W']
    expert_steps: dict[str, int]
    scales: dict[str, dict[str, float]]  # the guidance scales each expert used
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RenderOutput:
    frames: np.ndarray  # [T, H, W, 3] float32 in [0, 1]; empty on a rank that does not decode
    plan: CasePlan
    prompt_used: str
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    latent: torch.Tensor | None = None  # final normalized latent [1, 16, T', H', W']


def memory_plan_for(sources: ModelSources, runtime: RuntimeConfig, workload: offload.Workload | None = None) -> MemoryPlan:
    """The memory plan Renderer.load would follow on this machine (and what the expert files hold); known before anything loads."""
    device = resolve_device(runtime.device)
    stored = offload.stored_format([expert_weight_sources(sources, name) for name in sources.renderer.experts])
    return offload.plan_for_run(sources.base, len(sources.renderer.experts), runtime, device, workload, sources.renderer.max_sequence_length, stored)


class Renderer:
    """Loads once, renders many cases in named phases: prepare, denoise, decode. Experts are named 'high' and 'low'."""

    def __init__(
        self,
        sources: ModelSources,
        text_encoder: TextEncoder,
        vae: VAE,
        experts: dict[str, WanTransformer],
        scheduler_config: dict[str, Any],
        runtime: RuntimeConfig,
        device: torch.device,
        store: ExpertStore | None = None,
        memory_plan: MemoryPlan | None = None,
        placement: Placement | None = None,
    ):
        self.sources = sources
        self.text_encoder = text_encoder
        self.vae = vae
        self.experts = experts
        self.store = store or ExpertStore(experts)  # what the Denoiser asks for an expert; keeps the memory plan
        self.memory_plan = memory_plan
        self.scheduler_config = scheduler_config
        self.runtime = runtime
        self.device = device
        self.placement = placement or Placement()
        self.load_seconds = 0.0
        self.text_visit: offload.HostModule | None = None  # UMT5's pinned host copy when it visits the GPU to encode
        self.fp8_gemm: str | None = None  # the --fp8_gemm backend the experts were converted for (None: exact GEMMs)

    @classmethod
    def from_pretrained(
        cls,
        config: str = DEFAULT_CONFIG_DIR,
        *,
        high_noise_ckpt: str | None = None,
        low_noise_ckpt: str | None = None,
        runtime: RuntimeConfig = RuntimeConfig(),
        workload: offload.Workload | None = None,
    ) -> "Renderer":
        return cls.load(resolve_sources(config, high_noise_ckpt, low_noise_ckpt), runtime, workload)

    @classmethod
    def load(
        cls,
        sources: ModelSources,
        runtime: RuntimeConfig = RuntimeConfig(),
        workload: offload.Workload | None = None,
        *,
        placement: Placement | None = None,
        memory_plan: MemoryPlan | None = None,
    ) -> "Renderer":
        """Load everything where the memory plan says (``memory_plan``, else planned here for ``workload``:
        the batch's largest case, 480p when None), with ``placement``'s part of each case.

        A plan that does not fit is refused here (MemoryPlanError, with the nearest settings that would), before any model loads."""
        weights.preflight(sources)  # headers, keys, shapes, configs: before the 11 GB text encoder loads
        start = time.perf_counter()
        device = resolve_device(runtime.device)
        dtype = torch_dtype(runtime.dtype)
        placement = placement or Placement()
        attention.select_backend(runtime.attention, device)
        attention.select_fp8_attention(runtime.fp8_attention, device)
        experts_named = sources.renderer.experts
        loras = lora.prepare(runtime.loras, expert_configs(sources))  # every LoRA checked before anything loads
        plan = memory_plan or memory_plan_for(sources, runtime, workload)
        log_plan(plan)
        offload.require_fit(plan)  # refused before anything loads, with the nearest settings that fit
        gemm = fp8.select_gemm(runtime.fp8_gemm, device, resident=plan.offload == "none")
        if gemm == "torchao" and plan.offload != "none":
            raise ValueError(f"--fp8_gemm torchao needs the experts resident, but the memory plan is --offload {plan.offload}; "
                             "use --fp8_gemm scaled_mm (it works with every offload plan) or free GPU memory")
        runtime = dataclasses.replace(runtime, batch_passes=plan.batch_passes)  # unbatched when only that fits
        cap_gpu_memory(runtime.max_gpu_memory, device)
        text_encoder = TextEncoder.load(sources.base, dtype=dtype, device="cpu", max_length=sources.renderer.max_sequence_length)
        vae = VAE.load(sources.base, device=device)
        if plan.vae_tiling:
            vae.model.enable_tiling()
        experts = {
            name: prepare_expert(load_expert(sources, name, device=device, dtype=dtype, plan=plan, fp8_gemm=gemm, loras=loras.get(name), sequence=placement.sequence), runtime)
            for name in experts_named
        }
        store = ExpertStore(experts, plan.offload, device, plan.prefetch_bytes, plan.host_blocks)
        from diffusers import UniPCMultistepScheduler

        scheduler_config = dict(UniPCMultistepScheduler.load_config(sources.base / "scheduler"))
        renderer = cls(sources, text_encoder, vae, experts, scheduler_config, runtime, device, store, plan, placement)
        renderer.fp8_gemm = gemm
        renderer.place_text_encoder()
        renderer.load_seconds = time.perf_counter() - start
        log.info("models loaded in %.1f s (experts: %s, device %s, %s, %s weights, offload %s)", renderer.load_seconds, ", ".join(experts), device, dtype, plan.weights, plan.offload)
        return renderer

    def place_text_encoder(self) -> None:
        """UMT5 encodes on the CPU (--t5_cpu, or no GPU room) or waits in pinned host memory and visits the GPU to encode.

        It never stays on the GPU: its 11 GB are worth more to the experts and activations than the ~0.3 s a
        pinned copy takes per case, and leaving is free (the module points back at its host copy).
        """
        model = self.text_encoder.model
        where = self.memory_plan.text_encoder if self.memory_plan is not None else ("cpu" if self.runtime.t5_cpu else "visit")
        if self.device.type != "cuda" or where == "cpu":
            model.to("cpu" if where == "cpu" else self.device)
            self.text_visit = None
        elif self.text_visit is None:  # packed and pinned once; a later placement keeps the copy
            model.to("cpu")
            self.text_visit = offload.HostModule(model, pin=True, pieces=offload.text_pieces(model))
        if self.text_visit is not None:
            self.text_visit.stream = where == "stream"  # a layer at a time, where the whole would not fit beside the experts

    @property
    def head_dim(self) -> int:
        return next(iter(self.experts.values())).cfg.attention_head_dim

    def encode_pixels(self, pixels: torch.Tensor) -> Source:
        """pixels [3, T, H, W] in [-1, 1] -> a condition source (clean latent, packed)."""
        latent = self.vae.encode(pixels)
        grid = (latent.shape[2] // PATCH[0], latent.shape[3] // PATCH[1], latent.shape[4] // PATCH[2])
        return Source(patchify(latent, PATCH), grid)

    def encode_conditions(self, case: Case, settings: GenerationSettings) -> Conditions:
        size = settings.max_image_size
        videos = tuple(self.encode_pixels(media.load_video(p, settings.fps, settings.num_frames, size)) for p in case.videos)
        image = self.encode_pixels(media.load_image(case.image, size)) if case.image else None
        images = tuple(self.encode_pixels(media.load_image(p, size)) for p in case.images)
        return Conditions(videos, image, images)

    def encode_text(self, prompt_used: str, neg_prompt: str) -> dict[str, torch.Tensor]:
        """{'u': negative, 'c': positive} embeddings [1, 512, D] on the render device."""
        with self.text_visit.visit(self.device) if self.text_visit is not None else contextlib.nullcontext():
            embeds = self.text_encoder.encode([neg_prompt, prompt_used])
        dtype = torch_dtype(self.runtime.dtype)
        return {"u": embeds[0:1].to(self.device, dtype), "c": embeds[1:2].to(self.device, dtype)}

    # ------------------------------------------------------------ phases

    @torch.no_grad()
    def prepare(self, case: Case, settings: GenerationSettings, *, plan: CasePlan | None = None, prompt: str | None = None) -> Prepared:
        """Phase 1: text embeddings, condition latents, noise and the sampling plan of one case."""
        settings = effective_settings(case, settings)  # image tasks read their videos as one frame
        plan = plan or plan_case(case, settings)
        clock = time.perf_counter()
        prompt_used = positive_text(settings.system_prompt or case.task.system_prompt, prompt or case.prompt)
        copied = self.store.copied_bytes
        self.store.bring_in(next(iter(self.experts)))  # the first expert's copy overlaps text and VAE encoding
        text = self.encode_text(prompt_used, settings.neg_prompt)
        encoded = time.perf_counter()
        conditions = self.encode_conditions(case, settings)
        timings = {"text_encode": encoded - clock, "vae_encode": time.perf_counter() - encoded}
        grid = plan.grid
        noise = initial_noise(settings.seed, (1, 16, grid[0] * PATCH[0], grid[1] * PATCH[1], grid[2] * PATCH[2]))
        sampling = sampling_plan(settings, get_mode(plan.guidance_mode), self.sources.renderer.switch_dit_boundary, self.runtime.batch_passes)
        rule = SourceIdRule(settings.use_src_tgt_id, settings.interpolate_src_id, settings.max_trained_src_id)
        return Prepared(case, plan, prompt_used, text, conditions, patchify(noise, PATCH), sampling, rule, timings, copied)

    @torch.no_grad()
    def denoise(self, prepared: Prepared, on_step: Callable[[StepEvent], None] | None = None) -> Denoised:
        """Phase 2: the denoise loop; ``on_step`` hears every step and may raise to stop the case."""
        passes = self.placement.passes
        denoiser = Denoiser(self.store, tuple(self.experts), self.scheduler_config, self.head_dim, self.device, passes, self.store.prefetch)
        grid = prepared.plan.grid
        result = denoiser.run(prepared.sampling, prepared.conditions, prepared.rule, grid, prepared.noise, prepared.text, on_step)
        timings = {f"denoise_{name}": seconds for name, seconds in result.expert_seconds.items()}
        return Denoised(unpatchify(result.latent, grid, PATCH), result.expert_steps, result.scales, timings)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Phase 3: latent [1, 16, T', H', W'] -> frames [T, H, W, 3] float32 in [0, 1]."""
        return self.vae.decode(latent)

    def finish(self, prepared: Prepared, denoised: Denoised) -> RenderOutput:
        """Decode (where this rank decodes) and gather what the sidecar records of the render."""
        clock = time.perf_counter()
        frames = self.decode(denoised.latent) if self.placement.decodes else np.zeros((0,), np.float32)
        timings = {**prepared.timings, **denoised.timings, "decode": time.perf_counter() - clock}
        info: dict[str, Any] = {
            "guidance_per_expert": denoised.scales,
            "expert_steps": denoised.expert_steps,
            "attention_backend": attention.current_backend(),
            "fp8_gemm": self.fp8_gemm,
            "fp8_attention": attention.current_fp8_backend(),
            "dtype": self.runtime.dtype,
            "device": str(self.device),
        }
        if self.memory_plan is not None:
            info["memory_plan"] = {**self.memory_plan.to_info(), "copied_gib": round((self.store.copied_bytes - prepared.copied_bytes) / offload.GiB, 2)}
        return RenderOutput(frames, prepared.plan, prepared.prompt_used, timings, info, latent=denoised.latent.cpu())

    def render(
        self,
        case: Case,
        settings: GenerationSettings,
        *,
        plan: CasePlan | None = None,
        prompt: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> RenderOutput:
        """Render one case to frames, all phases in a row (no file is written here)."""
        prepared = self.prepare(case, settings, plan=plan, prompt=prompt)
        return self.finish(prepared, self.denoise(prepared, on_step))
