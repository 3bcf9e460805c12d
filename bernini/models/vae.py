"""The Wan VAE in float32: encode to normalized latents (posterior mode), decode to frames in [0, 1]."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class VAE:
    """AutoencoderKLWan with the per-channel latent normalization of Wan."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        cfg = model.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def load(cls, base: Path, *, device: torch.device | str) -> "VAE":
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=torch.float32).to(device).eval()
        log.info("vae: %s (float32)", base / "vae")
        return cls(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [3, T, H, W] in [-1, 1] -> normalized latent [1, 16, T', H', W'] float32."""
        x = pixels[None].to(self.device, torch.float32)
        z = self.model.encode(x).latent_dist.mode()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """normalized latent [1, 16, T', H', W'] -> frames [T, H, W, 3] float32 in [0, 1]."""
        z = latent.to(self.device, torch.float32)
        z = z * self.std.to(z.device) + self.mean.to(z.device)
        video = self.model.decode(z).sample  # [1, 3, T, H, W] in [-1, 1]
        frames = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
        return frames.float().cpu().numpy()
