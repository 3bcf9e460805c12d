"""Named few-step recipes (--preset): published Wan2.2-T2V-A14B step-distillation settings, every number with its source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LIGHTNING_REPO = "lightx2v/Wan2.2-Lightning"
LIGHTNING_V11 = f"{LIGHTNING_REPO}/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"


@dataclass(frozen=True)
class Preset:
    """Flag values (argparse dests) a recipe sets, the LoRAs it merges, the tasks it is published for, its source."""

    name: str
    summary: str
    source: str
    tasks: tuple[str, ...]
    values: Mapping[str, Any] = field(default_factory=dict)
    lora_high: tuple[str, ...] = ()
    lora_low: tuple[str, ...] = ()


# Wan2.2-Lightning (ModelTC/lightx2v), README and wan/configs/wan_t2v_A14B.py + generate.py + wan/text2video.py:
# sample_steps 4, sample_shift 5.0, boundary 0.875, sample_guide_scale (1.0, 1.0) for (low, high), which skips
# the unconditional pass, and the Euler solver "used in distillation" on shifted linspace(1000, 0, steps + 1).
# That grid is the official --no-use_unipc one with one more step: its 5th step runs from sigma 0 to 0, is a no-op
# and is skipped (no forward). ω 1 for every term of plain t2v is Lightning's guidance scale 1.
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="lightning-4step",
            summary="Wan2.2-Lightning T2V-A14B V1.1: 4 Euler steps at shift 5, no guidance (one forward a step), its LoRAs",
            source="https://github.com/ModelTC/Wan2.2-Lightning (README, wan/configs/wan_t2v_A14B.py, generate.py); "
            f"LoRAs https://huggingface.co/{LIGHTNING_REPO}",
            tasks=("t2v",),
            values={
                "solver": "euler",
                "num_inference_steps": 5,  # the official Euler grid of 5 = Lightning's 4 moves, the 5th skipped
                "flow_shift": 5.0,
                "guidance_mode": "t2v",
                **{f"omega_{term}{expert}": 1.0 for term in ("vid", "img", "txt") for expert in ("", "_low")},
            },
            lora_high=(f"{LIGHTNING_V11}/high_noise_model.safetensors",),
            lora_low=(f"{LIGHTNING_V11}/low_noise_model.safetensors",),
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
