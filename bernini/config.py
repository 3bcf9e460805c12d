"""Frozen configuration: the renderer's config.json, generation settings and runtime choices."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bernini.tasks import DEFAULT_NEG_PROMPT

if TYPE_CHECKING:
    from bernini.lora.files import LoraRef

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
    omega_vid_low: float | None = None  # the low expert's ω; None: omega_* x omega_scale (the official switch rule)
    omega_img_low: float | None = None
    omega_txt_low: float | None = None
    switch_step: int | None = None  # high-expert steps before the switch; None: the boundary rule
    skip_zero_passes: bool = True  # lossless: passes of zero weight (and Euler steps of dt 0) are not run
    preset: str | None = None  # the --preset these values came from (bernini/presets.py), for the record

    @property
    def solver(self) -> str:
        """'unipc' or 'euler' (the official --no-use_unipc scheduler)."""
        return "unipc" if self.use_unipc else "euler"

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
            (self.switch_step is None or 0 <= self.switch_step <= self.num_inference_steps,
             f"switch_step must be between 0 and num_inference_steps ({self.num_inference_steps}), got {self.switch_step}"),
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
    loras: tuple[LoraRef, ...] = ()  # merged into the experts' weights at load (bernini/lora), recorded in sidecars
    extra: dict[str, Any] = field(default_factory=dict)
