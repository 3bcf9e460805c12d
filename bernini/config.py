"""Frozen configuration: the renderer's config.json, generation settings and runtime choices."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bernini.tasks import DEFAULT_NEG_PROMPT

DEFAULT_CONFIG_DIR = "configs/bernini_renderer_wan22"


@dataclass(frozen=True)
class RendererConfig:
    """The renderer's config.json (model_type bernini_renderer)."""

    wan22_base: str = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    skip_transformer_1: bool = False
    skip_transformer_2: bool = False
    switch_dit_boundary: float = 0.875
    max_sequence_length: int = 512
    shift: float = 3.0  # overridden by --flow_shift, as the official CLI does
    use_unipc: bool = True
    use_src_id_rotary_emb: bool = True
    interpolate_src_id: bool = True
    max_trained_src_id: int = 5

    @classmethod
    def from_json(cls, path: Path) -> "RendererConfig":
        data = json.loads(path.read_text())
        if data.get("model_type", "bernini_renderer") != "bernini_renderer":
            raise ValueError(
                f"{path}: model_type {data['model_type']!r} is not supported; this toolkit runs the "
                "Bernini renderer (model_type 'bernini_renderer'), not the full Bernini planner"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def experts(self) -> tuple[str, ...]:
        """Expert names in sampling order: 'high' then 'low'."""
        names = []
        if not self.skip_transformer_1:
            names.append("high")
        if not self.skip_transformer_2:
            names.append("low")
        return tuple(names)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that shapes one render besides the case's routing and media (CLI defaults)."""

    neg_prompt: str = DEFAULT_NEG_PROMPT
    system_prompt: str = ""  # empty: from the task table
    num_frames: int = 81
    max_image_size: int = 848
    height: int = 480
    width: int = 848
    num_inference_steps: int = 40
    guidance_mode: str | None = None  # None: case file, then the task's default
    omega_vid: float = 1.25
    omega_img: float = 4.5
    omega_txt: float = 4.0
    omega_scale: float = 0.8
    flow_shift: float = 5.0
    seed: int = 42
    fps: float = 16.0
    eta: float = 0.5
    norm_threshold: tuple[float, ...] = (50.0, 50.0, 50.0)
    momentum: float = 0.0
    use_unipc: bool = True
    use_src_tgt_id: bool = True
    interpolate_src_id: bool = True
    max_trained_src_id: int = 5

    def __post_init__(self) -> None:
        checks = [
            (self.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
            (self.num_frames >= 1, "num_frames must be >= 1"),
            (self.max_image_size >= 16, "max_image_size must be >= 16"),
            (self.height >= 16 and self.width >= 16, "height and width must be >= 16"),
            (self.fps > 0, "fps must be > 0"),
            (self.flow_shift > 0, "flow_shift must be > 0"),
            (len(self.norm_threshold) >= 1, "norm_threshold needs at least one value"),
            (self.max_trained_src_id >= 1, "max_trained_src_id must be >= 1"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid generation setting: {rule}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the models run (not part of what a render means)."""

    device: str = "cuda"
    dtype: str = "bfloat16"
    attention: str = "auto"
    compile: bool | None = None  # None: on for CUDA devices, off on the CPU (compiling costs more than it saves there)
    batch_combos: bool = True  # run equal-length combos of one step as one batch
    offload: str = "auto"  # none | expert | block | auto
    t5_cpu: bool = False
    weights: str = "bf16"  # bf16 | fp8: block Linear weights stored as float8_e4m3fn (lossy, about half the memory)
    max_gpu_memory: float | None = None  # GiB the memory plan may use (None: what is free)
    vae_tiling: bool | None = None  # None: the memory plan decides
    host_ranks: int = 1  # processes sharing this host's RAM (torchrun's local ranks): each plans with its share
    fp8_gemm: str = "off"  # off | auto | scaled_mm | torchao: block Linears computed in FP8 (lossy, opt-in)
    fp8_attention: str = "off"  # off | auto | cudnn_fp8 | sage: 8-bit self-attention (lossy, opt-in)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for flag, value, choices in (("--fp8_gemm", self.fp8_gemm, FP8_GEMM_CHOICES), ("--fp8_attention", self.fp8_attention, FP8_ATTENTION_CHOICES)):
            if value not in choices:
                raise ValueError(f"invalid {flag} {value!r}; choose one of: {', '.join(choices)}")
        if self.fp8_gemm == "torchao" and self.weights == "fp8":
            raise ValueError("--fp8_gemm torchao quantizes bf16 weights, but --weights fp8 already stores them in FP8 "
                             "(and computes them with torch._scaled_mm where it can): drop one of the two flags")

    @property
    def lossy(self) -> bool:
        """Whether any opt-in reduced-precision option is on (the exact path is the default)."""
        return self.weights != "bf16" or self.fp8_gemm != "off" or self.fp8_attention != "off"


FP8_GEMM_CHOICES = ("off", "auto", "scaled_mm", "torchao")
FP8_ATTENTION_CHOICES = ("off", "auto", "cudnn_fp8", "sage")
# What --fast turns on: each option in its 'auto' form, which falls back to the exact path where the card or the
# installed packages lack it. Named flags override the preset; docs/performance.md has what each option measured.
FAST_PRESET: dict[str, str] = {"fp8_gemm": "auto", "fp8_attention": "auto"}
