"""Frozen configuration: the renderer's config.json, generation settings and runtime choices."""

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from bernini.tasks import DEFAULT_NEG_PROMPT

if TYPE_CHECKING:
    from bernini.lora.files import LoraRef

DEFAULT_CONFIG_DIR = "configs/bernini_renderer_wan22"

# The longest render we accept. 1001 = 4*250 + 1 frames (62 s at 16 fps, 12x the 81 frames the model
# was trained on; the maintainers advise <= 121): 251 latent frames, 400k tokens a forward at 480p,
# hours a case even on 8 GPUs. Beyond it a typo (100000) would run until killed instead of failing now.
MAX_NUM_FRAMES = 1001
# UniPC's grid has 1000 training timesteps; more steps than that repeat integer timesteps.
MAX_STEPS = 1000
# Sides and long-side limits: the media pixel limit (4096x4096) bounds what can be read anyway.
MAX_SIDE = 4096
# torch.Generator.manual_seed takes -2**63 .. 2**64-1 (a negative seed wraps, as upstream's would).
SEED_RANGE = (-(2**63), 2**64 - 1)
NORM_THRESHOLD_VALUES = 3  # the official default gives three; the APG modes read at most two

# The choices of the string options. Each Literal is its field's type, so the field declares its choices once:
# argparse (bernini/cli.py) reads them from the type, the checks and their messages from RUNTIME_CHOICES.
Dtype = Literal["bfloat16", "float16", "float32"]
Attention = Literal["auto", "fa3", "fa4", "fa2", "sdpa"]
Offload = Literal["auto", "none", "expert", "block"]
Weights = Literal["bf16", "fp8"]
Fp8Gemm = Literal["off", "auto", "scaled_mm", "torchao"]
Fp8Attention = Literal["off", "auto", "cudnn_fp8", "sage"]
Solver = Literal["unipc", "euler"]  # GenerationSettings.use_unipc as a name (--solver)
SOLVERS: tuple[str, ...] = get_args(Solver)


@dataclass(frozen=True)
class Flag:
    """A settings field's command-line form; bernini/cli.py builds its argparse argument from this and the field's type."""

    group: str  # the --help group: model | generation | few-step | runtime | fast
    help: str  # one line: what the setting does
    aliases: tuple[str, ...] = ()  # older spellings that keep working (--omega_V for --omega_vid)
    default_text: str | None = None  # how --help names the default when the value says little (None, a long text)
    bare: str | None = None  # the value of the flag given alone (--fp8_gemm = --fp8_gemm auto); then unset means the default
    metavar: str | None = None


def flag(default: Any, group: str, help: str, *aliases: str, default_text: str | None = None, bare: str | None = None,
         metavar: str | None = None) -> Any:
    """A dataclass field with its default and its flag (--<field name>, in metadata['flag']), declared together."""
    return field(default=default, metadata={"flag": Flag(group, help, aliases, default_text, bare, metavar)})


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

    def __post_init__(self) -> None:
        rules = [
            (isinstance(self.wan22_base, str) and bool(self.wan22_base), "wan22_base must name the Wan2.2 base (a folder or a hub id)"),
            (all(isinstance(v, bool) for v in (self.skip_transformer_1, self.skip_transformer_2, self.use_unipc, self.use_src_id_rotary_emb, self.interpolate_src_id)),
             "skip_transformer_1/2, use_unipc, use_src_id_rotary_emb and interpolate_src_id must be true or false"),
            (not (self.skip_transformer_1 and self.skip_transformer_2), "skip_transformer_1 and skip_transformer_2 cannot both be true: no expert would be left"),
            (_is_number(self.switch_dit_boundary) and 0 <= self.switch_dit_boundary <= 1, "switch_dit_boundary must be a number from 0 to 1 (0.875 for Wan2.2)"),
            (_is_int(self.max_sequence_length) and self.max_sequence_length >= 1, "max_sequence_length must be an integer >= 1 (512)"),
            (_is_number(self.shift) and self.shift > 0, "shift must be a number > 0"),
            (_is_int(self.max_trained_src_id) and self.max_trained_src_id >= 1, "max_trained_src_id must be an integer >= 1 (5)"),
        ]
        for ok, rule in rules:
            if not ok:
                raise ValueError(f"invalid renderer config: {rule}")

    @classmethod
    def from_json(cls, path: Path) -> "RendererConfig":
        """Read a config.json; any problem is a ValueError that names the file."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the renderer config ({exc}); restore the file (it holds model_type 'bernini_renderer')") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the renderer config must be a JSON object, got {type(data).__name__}")
        if data.get("model_type", "bernini_renderer") != "bernini_renderer":
            raise ValueError(
                f"{path}: model_type {data['model_type']!r} is not supported; this toolkit runs the "
                "Bernini renderer (model_type 'bernini_renderer'), not the full Bernini planner"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

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

    neg_prompt: str = flag(DEFAULT_NEG_PROMPT, "generation", "what the video should not show", default_text="the Wan2.2 negative prompt")
    system_prompt: str = flag("", "generation", "override the task's system prompt", default_text="the task's")
    num_frames: int = flag(81, "generation", "frames: 1 makes an image, 4k+1 a video (with a source video: at most this many)")
    max_image_size: int = flag(848, "generation", "long side, in pixels, the source videos and images are resized to")
    height: int = flag(480, "generation", "output height of the tasks without a source video or image (t2v, t2i, r2v)")
    width: int = flag(848, "generation", "output width of the tasks without a source video or image (t2v, t2i, r2v)")
    num_inference_steps: int = flag(40, "generation", "denoising steps")
    guidance_mode: str | None = flag(None, "generation", "how the guidance passes combine", default_text="the case file's, else the task's")
    omega_vid: float = flag(1.25, "generation", "guidance scale ω of the source video", "--omega_V")
    omega_img: float = flag(4.5, "generation", "guidance scale ω of the images", "--omega_I")
    omega_txt: float = flag(4.0, "generation", "guidance scale ω of the text", "--omega_TI")
    omega_scale: float = flag(0.8, "generation", "factor on each ω once the low-noise expert takes over")
    flow_shift: float = flag(5.0, "generation", "shift of the sampling schedule (replaces the config's shift)")
    seed: int = flag(42, "generation", "seed of the initial noise")
    fps: float = flag(16.0, "generation", "frames per second: resamples the source videos and times the output")
    eta: float = flag(0.5, "generation", "APG modes: weight of the guidance parallel to the prediction")
    norm_threshold: tuple[float, ...] = flag((50.0, 50.0, 50.0), "generation", "APG modes: per-frame norm limit of each guidance term (0 or less: no limit)")
    momentum: float = flag(0.0, "generation", "APG modes: momentum of the guidance terms across steps")
    use_unipc: bool = flag(True, "model", "the UniPC scheduler; --no-use_unipc: the official Euler fallback (= --solver euler)")
    use_src_tgt_id: bool = flag(True, "model", "source-id rotary embedding (tells the sources and the target apart)")
    interpolate_src_id: bool = flag(True, "model", "map more sources than --max_trained_src_id into the trained id range")
    max_trained_src_id: int = flag(5, "model", "source ids the model was trained with")
    # The low expert's ω; None: omega_* x omega_scale (the official switch rule).
    omega_vid_low: float | None = flag(None, "few-step", "the low-noise expert's ω video", default_text="--omega_vid x --omega_scale")
    omega_img_low: float | None = flag(None, "few-step", "the low-noise expert's ω image", default_text="--omega_img x --omega_scale")
    omega_txt_low: float | None = flag(None, "few-step", "the low-noise expert's ω text", default_text="--omega_txt x --omega_scale")
    switch_step: int | None = flag(None, "few-step", "run the high-noise expert for the first N steps", default_text="the boundary rule")
    # Lossless: passes of zero weight (and Euler steps of dt 0) are not run.
    skip_zero_passes: bool = flag(True, "few-step", "do not run guidance passes whose weight is zero (lossless)")
    # The --preset these values came from (bernini/presets.py), for the record.
    preset: str | None = flag(None, "few-step", "a published step-distillation recipe (README); explicit flags win", default_text="none")

    @property
    def solver(self) -> Solver:
        """'unipc' or 'euler' (the official --no-use_unipc scheduler)."""
        return "unipc" if self.use_unipc else "euler"

    def __post_init__(self) -> None:
        """Every value is checked before anything loads; the message names the flag, the rule and the fix."""
        for name in ("omega_vid", "omega_img", "omega_txt", "omega_scale", "flow_shift", "fps", "eta", "momentum"):
            _require(name, getattr(self, name), _is_number(getattr(self, name)), "must be a finite number")
        _require("flow_shift", self.flow_shift, self.flow_shift > 0, "must be > 0")
        _require("fps", self.fps, self.fps > 0, "must be > 0 (it resamples the source videos and times the output)")
        thresholds = self.norm_threshold
        _require("norm_threshold", list(thresholds), 1 <= len(thresholds) <= NORM_THRESHOLD_VALUES,
                 f"needs 1 to {NORM_THRESHOLD_VALUES} values (the APG modes use the first one or two)")
        for value in thresholds:
            _require("norm_threshold", value, _is_number(value), "values must be finite numbers (0 or less turns clipping off)")
        _require("seed", self.seed, _is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                 f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (torch's seed range)")
        _require("num_inference_steps", self.num_inference_steps, _is_int(self.num_inference_steps) and 1 <= self.num_inference_steps <= MAX_STEPS,
                 f"must be >= 1 and at most {MAX_STEPS} (an integer)")
        if not (_is_int(self.num_frames) and 1 <= self.num_frames <= MAX_NUM_FRAMES):
            nearest = f"{MAX_NUM_FRAMES}" if _is_int(self.num_frames) and self.num_frames > MAX_NUM_FRAMES else "1 (an image) or 5 (a video)"
            _require("num_frames", self.num_frames, False, f"must be >= 1 and at most {MAX_NUM_FRAMES} (videos take 4k+1 frames; "
                     f"above {MAX_NUM_FRAMES} a case runs for hours)", fix=f"nearest valid value: {nearest}")
        for name in ("max_image_size", "height", "width"):
            value = getattr(self, name)
            _require(name, value, _is_int(value) and 16 <= value <= MAX_SIDE, f"must be >= 16 and at most {MAX_SIDE} pixels (an integer)")
        _require("max_trained_src_id", self.max_trained_src_id, _is_int(self.max_trained_src_id) and self.max_trained_src_id >= 1, "must be an integer >= 1")
        if self.switch_step is not None:
            _require("switch_step", self.switch_step, _is_int(self.switch_step) and 0 <= self.switch_step <= self.num_inference_steps,
                     f"must be an integer from 0 to num_inference_steps ({self.num_inference_steps})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the models run (not part of what a render means)."""

    device: str = flag("cuda", "runtime", "cuda, cuda:N (the GPU index) or cpu")
    dtype: Dtype = flag("bfloat16", "runtime", "compute dtype of the models (float32 for exact CPU runs)")
    attention: Attention = flag("auto", "runtime", "attention kernel; auto: FA3 > FA4 > SDPA on Hopper, FA2 > SDPA on Ampere/Ada")
    compile: bool | None = flag(None, "runtime", "regional torch.compile of the blocks", default_text="on for CUDA, off on the CPU")
    batch_passes: bool = flag(True, "runtime", "run equal-length guidance passes of a step as one batch", "--batch_combos")  # --batch_combos: its earlier name
    offload: Offload = flag("auto", "runtime", "where the experts wait: none (on the GPU), expert, block; auto: the fastest that fits")
    t5_cpu: bool = flag(False, "runtime", "encode text on the CPU (otherwise UMT5 waits in pinned host memory and visits the GPU)")
    weights: Weights = flag("bf16", "runtime", "fp8: block Linear weights as float8_e4m3fn + per-channel scales (lossy, about half the memory)")
    max_gpu_memory: float | None = flag(None, "runtime", "plan for (and cap the allocator at) this much GPU memory", default_text="what is free", metavar="GiB")
    vae_tiling: bool | None = flag(None, "runtime", "tiled VAE encode/decode", default_text="when memory is short")
    host_memory: float | None = flag(None, "runtime", "plan for a machine with this much RAM", default_text="what is free now", metavar="GiB")
    host_ranks: int = 1  # set by the launcher, no flag: processes sharing this host's RAM (torchrun's local ranks), each plans with its share
    fp8_gemm: Fp8Gemm = flag("off", "fast", "block Linear layers in FP8 (per-token activation and per-channel weight scales)", bare="auto")
    fp8_attention: Fp8Attention = flag("off", "fast", "8-bit self-attention (cuDNN FP8 SDPA or SageAttention)", bare="auto")
    loras: tuple["LoraRef", ...] = ()  # from --lora/--lora_high/--lora_low: merged into the experts at load (bernini/lora), recorded in sidecars

    def __post_init__(self) -> None:
        _require("device", self.device, isinstance(self.device, str) and _DEVICE.match(self.device) is not None,
                 "must be cuda, cuda:N (N = the GPU index) or cpu")
        for name, choices in RUNTIME_CHOICES.items():
            value = getattr(self, name)
            _require(name, value, value in choices, f"must be one of {', '.join(choices)}")
        if self.max_gpu_memory is not None:
            _require("max_gpu_memory", self.max_gpu_memory, _is_number(self.max_gpu_memory) and self.max_gpu_memory > 0, "must be a finite number of GiB > 0")
        if self.host_memory is not None:
            _require("host_memory", self.host_memory, _is_number(self.host_memory) and self.host_memory > 0, "must be a finite number of GiB > 0")
        _require("host_ranks", self.host_ranks, _is_int(self.host_ranks) and self.host_ranks >= 1, "must be an integer >= 1")
        if self.fp8_gemm == "torchao" and self.weights == "fp8":
            raise ValueError("--fp8_gemm torchao quantizes bf16 weights, but --weights fp8 already stores them in FP8 "
                             "(and computes them with torch._scaled_mm where it can): drop one of the two flags")

    @property
    def lossy(self) -> bool:
        """Whether any opt-in reduced-precision option is on (the exact path is the default)."""
        return self.weights != "bf16" or self.fp8_gemm != "off" or self.fp8_attention != "off"


def value_type(cls: type, name: str) -> Any:
    """A settings field's type without its None (int | None -> int): what a value given as text converts to."""
    kind = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    if get_origin(kind) in (Union, UnionType):
        rest = [k for k in get_args(kind) if k is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind


def flags_of(cls: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of a settings dataclass that have a command-line flag, in declaration order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


RUNTIME_CHOICES: dict[str, tuple[str, ...]] = {f.name: get_args(f.type) for f in dataclasses.fields(RuntimeConfig) if get_origin(f.type) is Literal}
# What --fast turns on: each option in its 'auto' form, which falls back to the exact path where the card or the
# installed packages lack it. Named flags override the preset; docs/performance.md has what each option measured.
FAST_PRESET: dict[str, str] = {"fp8_gemm": "auto", "fp8_attention": "auto"}

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _is_number(value: Any) -> bool:
    """A real, finite number (bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(name: str, value: Any, ok: bool, rule: str, fix: str | None = None) -> None:
    """ValueError naming the setting, the rule, the flag as given and the fix (by default: the default value)."""
    if ok:
        return
    runtime = {f.name: f.default for f in dataclasses.fields(RuntimeConfig)}
    defaults = {**{f.name: f.default for f in dataclasses.fields(GenerationSettings)}, **runtime}
    default = defaults.get(name, dataclasses.MISSING)
    if isinstance(default, tuple):
        default = " ".join(f"{v:g}" for v in default)
    hint = f"; the default is --{name} {default}" if default not in (dataclasses.MISSING, None) else ""
    hint = f"; {fix}" if fix else hint
    kind = "runtime" if name in runtime else "generation"
    raise ValueError(f"invalid {kind} setting: {name} {rule}, got --{name} {value}{hint}")
