"""Every image mode Pillow reads decodes to the right 8-bit RGB; expected values come from the raw arrays (numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bernini.media import MediaError, load_image, open_rgb_image

H, W = 32, 48  # multiples of 16: load_image keeps the size, so its tensor is exactly the decoded pixels
RNG = np.random.default_rng(14)


def gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def ramp(high: float, dtype: type) -> np.ndarray:
    """A horizontal ramp 0..high plus noise rows, so means and extremes are both exercised."""
    row = np.linspace(0, high, W)
    image = np.tile(row, (H, 1))
    image[::3] = RNG.uniform(0, high, size=image[::3].shape)
    return image.astype(dtype)


def save(tmp_path: Path, image: Image.Image, suffix: str) -> Path:
    path = tmp_path / f"{len(list(tmp_path.iterdir())):02d}_{image.mode.replace(';', '_')}{suffix}"  # one file per case
    image.save(path)
    return path


def cases(tmp_path: Path) -> list[tuple[str, Path, np.ndarray]]:
    """(label, file, expected uint8 RGB) for each mode, expected computed from the raw array."""
    out = []
    bits = RNG.integers(0, 2, size=(H, W)).astype(bool)
    out.append(("1", save(tmp_path, Image.fromarray(bits), ".png"), gray(bits * 255)))
    lum = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    out.append(("L", save(tmp_path, Image.fromarray(lum), ".png"), gray(lum)))
    la = RNG.integers(0, 256, size=(H, W, 2), dtype=np.uint8)
    out.append(("LA", save(tmp_path, Image.fromarray(la, "LA"), ".png"), gray(la[..., 0])))  # alpha dropped, as upstream
    indices = RNG.integers(0, 256, size=(H, W), dtype=np.uint8)
    palette = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
    p = Image.fromarray(indices, "P")
    p.putpalette(palette.flatten().tolist())
    out.append(("P", save(tmp_path, p, ".png"), palette[indices]))
    rgb = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    out.append(("RGB", save(tmp_path, Image.fromarray(rgb), ".png"), rgb))
    rgba = RNG.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    out.append(("RGBA", save(tmp_path, Image.fromarray(rgba), ".png"), rgba[..., :3]))
    cmyk = RNG.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    out.append(("CMYK", save(tmp_path, Image.fromarray(cmyk, "CMYK"), ".tif"), np.round((255 - c) * (255 - k) / 255).astype(np.uint8)))
    sixteen = ramp(65535, np.uint16)
    out.append(("I;16", save(tmp_path, Image.fromarray(sixteen), ".png"), gray(np.round(sixteen / 257))))
    wide = ramp(65535, np.int32)
    out.append(("I 16-bit values", save(tmp_path, Image.fromarray(wide), ".tif"), gray(np.round(wide / 257))))
    small = ramp(255, np.int32)
    out.append(("I 8-bit values", save(tmp_path, Image.fromarray(small), ".tif"), gray(small)))
    signed = ramp(200000, np.int32) - 50000
    out.append(("I out of range", save(tmp_path, Image.fromarray(signed), ".tif"), gray(np.round((signed - signed.min()) * 255.0 / (signed.max() - signed.min())))))
    unit = ramp(1.0, np.float32)
    out.append(("F 0..1", save(tmp_path, Image.fromarray(unit), ".tif"), gray(np.round(unit.astype(np.float64) * 255))))
    byte = ramp(255.0, np.float32)
    out.append(("F 0..255", save(tmp_path, Image.fromarray(byte), ".tif"), gray(np.round(byte.astype(np.float64)))))
    return out


def test_each_mode_decodes_to_the_expected_rgb(tmp_path: Path) -> None:
    found = cases(tmp_path)
    modes = {Image.open(path).mode for _, path, _ in found}
    assert {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"} <= modes  # the files really hold every mode
    for label, path, expected in found:
        decoded = np.asarray(open_rgb_image(path))
        assert decoded.dtype == np.uint8 and decoded.shape == (H, W, 3), label
        tolerance = 1 if label == "CMYK" else 0  # Pillow's integer CMYK arithmetic rounds within 1
        assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= tolerance, label
        tensor = load_image(path, 848)  # what the VAE sees: [3, 1, H, W] in [-1, 1]
        want = (torch.from_numpy(np.asarray(open_rgb_image(path), dtype=np.float32)).permute(2, 0, 1) / 255.0 - 0.5) / 0.5
        assert torch.equal(tensor[:, 0], want), label


def test_sixteen_bit_gray_is_not_clipped_white(tmp_path: Path) -> None:
    values = ramp(65535, np.uint16)
    path = save(tmp_path, Image.fromarray(values), ".png")
    decoded = np.asarray(open_rgb_image(path))
    assert abs(decoded.mean() - values.mean() / 257) < 0.5 and 100 < decoded.mean() < 155  # not ~251 (clipped)
    assert decoded.min() == 0 and decoded.max() == 255


def test_non_finite_float_pixels_are_refused(tmp_path: Path) -> None:
    values = ramp(1.0, np.float32)
    values[3, 4] = np.nan
    path = save(tmp_path, Image.fromarray(values), ".tif")
    with pytest.raises(MediaError, match="NaN or infinite pixel values"):
        open_rgb_image(path)
