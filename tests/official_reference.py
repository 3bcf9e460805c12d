"""An independent re-implementation of the official Bernini-R renderer's sampling, for fidelity tests.

Written from the spec (/work/shared/docs/bernini-r-reference.md, sections 4, 5, 6 and 11), not from
`bernini`'s code: nothing here imports bernini's sampling, conditioning, guidance, RoPE or
transformer modules. The experts are plain diffusers ``WanTransformer3DModel``s; this file supplies
what the official code changes around them:

* the forward over a packed multi-source sequence ``[cond_1 ... cond_n, noisy target]``: every latent
  is patch-embedded with the model's Conv3d on its own grid, gets the standard Wan 3D RoPE from
  position 0 multiplied (complex, float64) by the source-id phase ``exp(i*sid*10000^(-2k/head_dim))``,
  all tokens share one timestep, attention is full over the whole sequence, and only the last
  ``L_target`` output tokens are kept (packed ``(t h w)(pt ph pw c)`` layout);
* source ids (target 0, conditions 1..n in the order videos, image, images; ``linspace(1, 5, n)``
  beyond ``max_trained_src_id``) and the none / V / I / VI passes;
* the seven renderer guidance formulas, the APG ones in x0 space in float64 on unpacked tensors;
* the UniPC loop with the expert switch at ``int(t) >= 875`` and the one-off omega scaling.

Timestep grid. The official renderer ran diffusers 0.35.2, whose UniPC flow sigmas are
``flip(shift(1 - linspace(1, 1/1000, N+1)))[:-1]`` (spec section 5.1; 40 steps at shift 5 give
t = 999, 994, 989, ..., 208, 113). Newer diffusers (0.42 here) build ``shift(linspace(1, 1/1000,
N+1)[:-1])`` instead, a different grid. ``grid="official"`` (the default) feeds the 0.35.2 raw sigmas
to ``set_timesteps(sigmas=...)`` so the installed diffusers reproduces the official grid; the UniPC
update itself is unchanged between those versions. ``grid="installed"`` uses plain
``set_timesteps(steps)`` of whatever diffusers is installed (only for diagnosing mismatches).
"""

from __future__ import annotations

import html
import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed

THETA = 10000.0
SWITCH_DIT_BOUNDARY = 0.875
NUM_TRAIN_TIMESTEPS = 1000
MAX_TRAINED_SRC_ID = 5

# Spec section 1.2: prepended verbatim (no separator) to the cleaned positive prompt.
_H = "You are a helpful assistant"
SYSTEM_PROMPTS: dict[str, str] = {
    "default": f"{_H}.",
    "t2i": f"{_H} specialized in text-to-image generation.",
    "t2v": f"{_H} specialized in text-to-video generation.",
    "i2i": f"{_H} specialized in image editing.",
    "r2i": f"{_H} specialized in subject-to-image generation.",
    "i2v": f"{_H} specialized in image-to-video generation.",
    "v2v": f"{_H} specialized in video editing.",
    "r2v": f"{_H} specialized in subject-to-video generation.",
    "vi2v": f"{_H} specialized in video editing on content propagation.",
    "rv2v": f"{_H} specialized in video editing with reference.",
    "ads2v": f"{_H} specialized in ads insertion.",
    "vrc2v": "You are a helpful assistant for editing. You may need to adjust the subject's action or position.",
    "mv2v": (
        "You are a helpful assistant for editing. You might need to adjust the video's style, lighting, "
        "colors, textures, and the subject's pose or action."
    ),
}

# Spec section 5.6.
DEFAULT_NEG_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Spec section 5.3: (visual part, text) passes each mode evaluates, in the official order.
MODE_PASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "rv2v": (("none", "u"), ("V", "u"), ("VI", "u"), ("VI", "c")),
    "v2v": (("VI", "u"), ("VI", "c")),
    "v2v_chain": (("none", "u"), ("V", "u"), ("VI", "c")),
    "t2v": (("none", "u"), ("none", "c")),
    "t2v_apg": (("none", "u"), ("none", "c")),
    "v2v_apg": (("VI", "u"), ("VI", "c")),
    "r2v_apg": (("none", "u"), ("I", "u"), ("I", "c")),
}
APG_MODES = ("t2v_apg", "v2v_apg", "r2v_apg")


def positive_prompt(task_type: str, prompt: str) -> str:
    """System prefix + Wan's prompt cleaning (ftfy, html-unescape twice, collapse whitespace)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()
    text = re.sub(r"\s+", " ", text).strip()
    return SYSTEM_PROMPTS.get(task_type, SYSTEM_PROMPTS["default"]) + text


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------


def official_raw_sigmas(steps: int) -> np.ndarray:
    """diffusers 0.35.2 UniPC flow sigmas before the shift: flip(1 - linspace(1, 1/1000, N+1))[:-1]."""
    alphas = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, steps + 1)
    return np.flip(1.0 - alphas)[:-1].copy()


def make_scheduler(scheduler_dir: str | Path, flow_shift: float, steps: int, grid: str = "official") -> UniPCMultistepScheduler:
    scheduler = UniPCMultistepScheduler.from_pretrained(str(scheduler_dir), flow_shift=flow_shift)
    if grid == "official":
        if "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
            # The shift is monotone, so shifting the flipped grid equals flipping the shifted one.
            scheduler.set_timesteps(sigmas=official_raw_sigmas(steps))
        else:  # diffusers <= 0.35 builds the official grid itself and takes no custom sigmas
            scheduler.set_timesteps(steps)
        raw = official_raw_sigmas(steps)
        expected = flow_shift * raw / (1 + (flow_shift - 1) * raw)
        got = scheduler.sigmas.double().numpy()
        if len(got) != steps + 1 or not np.allclose(got[:-1], expected, rtol=1e-6, atol=0) or got[-1] != 0:
            raise AssertionError(f"could not reproduce the official UniPC sigma grid: {got} vs {expected}")
    elif grid == "installed":
        scheduler.set_timesteps(steps)
    else:
        raise ValueError(f"unknown grid {grid!r}")
    return scheduler


def expert_for(t: torch.Tensor | int, boundary: float = SWITCH_DIT_BOUNDARY) -> str:
    return "high" if int(t) >= boundary * NUM_TRAIN_TIMESTEPS else "low"


# ---------------------------------------------------------------------------------------------
# Packing (diffusers' unpatchify layout (t h w)(pt ph pw c))
# ---------------------------------------------------------------------------------------------


def unpack(packed: torch.Tensor, latent_shape: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> torch.Tensor:
    """[1, L, pt*ph*pw*C] -> [1, C, T, H, W], exactly the reshape/permute of diffusers' Wan forward."""
    c, t, h, w = latent_shape
    pt, ph, pw = patch
    x = packed.reshape(packed.shape[0], t // pt, h // ph, w // pw, pt, ph, pw, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ---------------------------------------------------------------------------------------------
# RoPE with source ids (complex, float64)
# ---------------------------------------------------------------------------------------------


def grid_freqs(frames: int, height: int, width: int, head_dim: int) -> torch.Tensor:
    """Standard Wan 3D RoPE for one token grid starting at 0: complex128 [F*H*W, head_dim/2]."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim

    def axis(n: int, dim: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        return get_1d_rotary_pos_embed(dim, pos, theta=THETA, use_real=False, freqs_dtype=torch.float64)

    ft, fh, fw = axis(frames, t_dim), axis(height, h_dim), axis(width, w_dim)
    full = torch.cat(
        [
            ft[:, None, None, :].expand(frames, height, width, -1),
            fh[None, :, None, :].expand(frames, height, width, -1),
            fw[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return full.reshape(frames * height * width, head_dim // 2)


def source_phase(source_id: float, head_dim: int) -> torch.Tensor:
    """exp(i * sid * 10000^(-2k/head_dim)), k = 0..head_dim/2-1: complex128 [1, head_dim/2]."""
    pos = torch.tensor([float(source_id)], dtype=torch.float64)
    return get_1d_rotary_pos_embed(head_dim, pos, theta=THETA, use_real=False, freqs_dtype=torch.float64)


def apply_complex_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] real; interleaved pairs as complex in float64, times freqs [L, D/2]."""
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)
    return out.type_as(x)


class OfficialAttnProcessor:
    """Full attention over the packed sequence; RoPE (if given) is the complex float64 table."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = apply_complex_rope(q, rotary_emb), apply_complex_rope(k, rotary_emb)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def install_official_attention(model: WanTransformer3DModel) -> None:
    for block in model.blocks:
        for attn in (block.attn1, block.attn2):
            if not isinstance(attn.processor, OfficialAttnProcessor):
                attn.set_processor(OfficialAttnProcessor())


@torch.no_grad()
def official_forward(
    model: WanTransformer3DModel,
    latents: Sequence[torch.Tensor],
    source_ids: Sequence[float],
    timestep: torch.Tensor | float,
    text_embeds: torch.Tensor,
) -> torch.Tensor:
    """latents: [1,16,T,H,W] each, conditions in order then the noisy target last -> packed target prediction."""
    if len(latents) != len(source_ids):
        raise ValueError("one source id per latent")
    install_official_attention(model)
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    head_dim = cfg.attention_head_dim
    dtype = model.patch_embedding.weight.dtype
    tokens, freqs = [], []
    for latent, sid in zip(latents, source_ids):
        _, _, t, h, w = latent.shape
        freqs.append(grid_freqs(t // pt, h // ph, w // pw, head_dim) * source_phase(sid, head_dim))
        tokens.append(model.patch_embedding(latent.to(dtype)).flatten(2).transpose(1, 2))
    x = torch.cat(tokens, dim=1).contiguous()
    rope = torch.cat(freqs, dim=0)
    t = torch.as_tensor(timestep).reshape(-1)[:1]  # the official t.expand(1): one timestep for all tokens
    temb, timestep_proj, context, _ = model.condition_embedder(t, text_embeds.to(dtype))
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    for block in model.blocks:
        x = block(x, context, timestep_proj, rope)
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
    out = model.proj_out(x)
    target = latents[-1]
    n_target = (target.shape[2] // pt) * (target.shape[3] // ph) * (target.shape[4] // pw)
    return out[:, -n_target:]


# ---------------------------------------------------------------------------------------------
# Source ids and passes
# ---------------------------------------------------------------------------------------------


def source_ids(count: int, max_trained: int = MAX_TRAINED_SRC_ID, interpolate: bool = True) -> list[float]:
    if interpolate and count > max_trained:
        return [float(v) for v in np.linspace(1, max_trained, count)]
    return [float(i) for i in range(1, count + 1)]


def pass_sources(
    visual: str, videos: Sequence[torch.Tensor], image: torch.Tensor | None, images: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[float]]:
    refs = ([image] if image is not None else []) + list(images)
    everything = list(videos) + refs
    if visual == "none":
        return [], []
    if visual == "V":
        return list(videos[:1]), source_ids(len(everything))[: min(1, len(videos))]
    if visual == "I":
        return refs, source_ids(len(refs))
    if visual == "VI":
        return everything, source_ids(len(everything))
    raise ValueError(visual)


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------

_FRAME_DIMS = (1, 3, 4)  # C, H, W of an unpacked [B, C, T, H, W] tensor: the norm is per (batch, frame)


@dataclass
class APGState:
    momentum_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    clipped_frames: int = 0  # how many (term, frame) slices the threshold actually scaled down


def normalized_guidance(d: torch.Tensor, base: torch.Tensor, *, eta: float, threshold: float, momentum: float,
                        state: APGState, term: str) -> torch.Tensor:
    """N(d; base) in float64: momentum, per-frame norm clip, remove (1-eta) of the part parallel to base."""
    d = d.to(torch.float64)
    base = base.to(torch.float64)
    previous = state.momentum_buffers.get(term)
    avg = d if previous is None else d + momentum * previous  # the buffer starts at zero
    state.momentum_buffers[term] = avg
    d = avg
    if threshold > 0:
        norm = d.pow(2).sum(dim=_FRAME_DIMS, keepdim=True).sqrt()
        factor = torch.clamp(threshold / norm, max=1.0)
        state.clipped_frames += int((factor < 1).sum())
        d = d * factor
    b_hat = base / base.pow(2).sum(dim=_FRAME_DIMS, keepdim=True).sqrt().clamp_min(1e-12)
    d_par = (d * b_hat).sum(dim=_FRAME_DIMS, keepdim=True) * b_hat
    return (d - d_par) + eta * d_par


def guide(mode: str, e: Mapping[tuple[str, str], torch.Tensor], x_t: torch.Tensor, sigma: float, omegas: tuple[float, float, float],
          *, eta: float, norm_threshold: Sequence[float], momentum: float, state: APGState) -> torch.Tensor:
    """The section 5.3 formulas on unpacked float32 velocities e[(visual, text)] -> velocity."""
    w_vid, w_img, w_txt = omegas
    if mode == "rv2v":
        return (e["none", "u"] + w_vid * (e["V", "u"] - e["none", "u"]) + w_img * (e["VI", "u"] - e["V", "u"])
                + w_txt * (e["VI", "c"] - e["VI", "u"]))
    if mode == "v2v":
        return e["VI", "u"] + w_txt * (e["VI", "c"] - e["VI", "u"])
    if mode == "v2v_chain":
        return e["none", "u"] + w_vid * (e["V", "u"] - e["none", "u"]) + w_txt * (e["VI", "c"] - e["V", "u"])
    if mode == "t2v":
        return e["none", "u"] + w_txt * (e["none", "c"] - e["none", "u"])
    if mode not in APG_MODES:
        raise ValueError(mode)
    x = {k: (x_t.to(torch.float64) - sigma * v.to(torch.float64)) for k, v in e.items()}  # x0 estimates
    kw = dict(eta=eta, momentum=momentum, state=state)
    if mode in ("t2v_apg", "v2v_apg"):
        vis = "none" if mode == "t2v_apg" else "VI"
        xu, xc = x[vis, "u"], x[vis, "c"]
        guided = xu + w_txt * normalized_guidance(xc - xu, xc, threshold=norm_threshold[0], term="txt", **kw)
    else:  # r2v_apg
        x0, xi, xit = x["none", "u"], x["I", "u"], x["I", "c"]
        guided = (x0 + w_img * normalized_guidance(xi - x0, xi, threshold=norm_threshold[0], term="img", **kw)
                  + w_txt * normalized_guidance(xit - xi, xit, threshold=norm_threshold[1], term="txt", **kw))
    return ((x_t.to(torch.float64) - guided) / sigma).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


@dataclass
class OfficialExperts:
    high: WanTransformer3DModel
    low: WanTransformer3DModel
    scheduler_dir: Path


def load_official(diffusers_dir: str | Path) -> OfficialExperts:
    root = Path(diffusers_dir)
    experts = []
    for sub in ("transformer", "transformer_2"):
        model = WanTransformer3DModel.from_pretrained(str(root / sub), torch_dtype=torch.float32).eval().requires_grad_(False)
        install_official_attention(model)
        experts.append(model)
    return OfficialExperts(experts[0], experts[1], root / "scheduler")


@dataclass
class SampleResult:
    latent: torch.Tensor  # [1, 16, T, H, W] float32
    timesteps: list[int]
    sigmas: list[float]
    experts: list[str]
    omegas: dict[str, tuple[float, float, float]]
    clipped_frames: int


def initial_noise(seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    return torch.randn([1, *latent_shape], generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def sample(
    experts: OfficialExperts,
    *,
    mode: str,
    videos: Sequence[torch.Tensor],
    image: torch.Tensor | None,
    images: Sequence[torch.Tensor],
    text: Mapping[str, torch.Tensor],
    latent_shape: Sequence[int],
    seed: int,
    steps: int,
    flow_shift: float,
    omega_vid: float = 1.25,
    omega_img: float = 4.5,
    omega_txt: float = 4.0,
    omega_scale: float = 0.8,
    eta: float = 0.5,
    norm_threshold: Sequence[float] = (50.0, 50.0, 50.0),
    momentum: float = 0.0,
    grid: str = "official",
) -> SampleResult:
    """The official GEN_Wanx22.sample loop. latent_shape = (16, T', H', W'); text = {'u': [1,512,D], 'c': ...}."""
    scheduler = make_scheduler(experts.scheduler_dir, flow_shift, steps, grid)
    sigmas = scheduler.sigmas.tolist()
    x = initial_noise(seed, latent_shape)
    omegas = (omega_vid, omega_img, omega_txt)
    switched = False
    state = APGState()
    used, seen_omegas = [], {}
    for i, t in enumerate(scheduler.timesteps):
        name = expert_for(t)
        if name == "low" and not switched:
            switched = True
            omegas = tuple(w * omega_scale for w in omegas)
        seen_omegas.setdefault(name, omegas)
        model = experts.high if name == "high" else experts.low
        e = {}
        for visual, txt in MODE_PASSES[mode]:
            conds, ids = pass_sources(visual, videos, image, images)
            packed = official_forward(model, conds + [x], ids + [0.0], t, text[txt])
            e[visual, txt] = unpack(packed.float(), latent_shape)
        v = guide(mode, e, x, sigmas[i], omegas, eta=eta, norm_threshold=norm_threshold, momentum=momentum, state=state)
        x = scheduler.step(v, t, x).prev_sample
        used.append(name)
    return SampleResult(x, [int(t) for t in scheduler.timesteps], sigmas, used, seen_omegas, state.clipped_frames)
