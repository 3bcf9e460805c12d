"""Generate the example media of the bundled test cases (run: python tools/make_testcase_media.py).

Writes source.mp4, source_b.mp4, image.png, ref1.jpg, ref2.jpg and ref3.jpg into
assets/testcases/media/ (or --out DIR). Everything is drawn from fixed parameters and seeds, with
no network access; x264 runs single-threaded without SIMD, so reruns give the same bytes
(with the same FFmpeg/x264 build).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "testcases" / "media"
SEED = 20240607
# crf 24 keeps the files small (the cases only need recognisable content). x264's SIMD paths
# read uninitialised padding on this FFmpeg build, so only threads=1 with asm=0 gives the same
# bytes on every run; the clips are tiny, so the slower plain-C encode costs nothing.
X264_OPTIONS = {"crf": "24", "threads": "1", "x264-params": "asm=0"}


@dataclass(frozen=True)
class ClipSpec:
    """One generated clip: its file name, size, rate, length and frame painter."""

    name: str
    width: int
    height: int
    fps: int
    seconds: float
    paint: Callable[[int, int, int, int], Image.Image]


def gradient(
    width: int,
    height: int,
    start: tuple[int, int, int],
    end: tuple[int, int, int],
    direction: tuple[float, float] = (1.0, 0.3),
) -> np.ndarray:
    """A two-colour linear gradient as uint8 [H, W, 3], from top-left along (dx, dy)."""
    dx, dy = direction
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    t = ((dx * x + dy * y) / (dx + dy))[..., None]
    mixed = (1 - t) * np.array(start, np.float64) + t * np.array(end, np.float64)
    return mixed.round().astype(np.uint8)


def paint_source(index: int, total: int, width: int, height: int) -> Image.Image:
    """Dusk gradient with an orange ball bouncing left to right and a teal square drifting down."""
    phase = index / max(total - 1, 1)
    image = Image.fromarray(gradient(width, height, (28, 40, 110), (235, 140, 90)))
    draw = ImageDraw.Draw(image)
    radius = height // 6
    cx = radius + phase * (width - 2 * radius)
    cy = height * 0.65 - abs(math.sin(phase * 3 * math.pi)) * height * 0.4
    ball = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw.ellipse(ball, fill=(250, 170, 30), outline=(120, 60, 10), width=2)
    side = height // 5
    sx, sy = width * 0.75, 8 + phase * (height - side - 16)
    draw.rectangle((sx, sy, sx + side, sy + side), fill=(30, 170, 160))
    return image


def paint_source_b(index: int, total: int, width: int, height: int) -> Image.Image:
    """Green-to-violet gradient with a white bar turning like a clock hand around a yellow hub."""
    angle = 2 * math.pi * index / total
    image = Image.fromarray(gradient(width, height, (40, 120, 60), (120, 60, 160), (1.0, 1.0)))
    draw = ImageDraw.Draw(image)
    cx, cy, length = width / 2, height / 2, width * 0.4
    tip = (cx + length * math.cos(angle), cy + length * math.sin(angle))
    draw.line(((cx, cy), tip), fill=(245, 245, 245), width=max(width // 16, 2))
    hub = width // 10
    draw.ellipse((cx - hub, cy - hub, cx + hub, cy + hub), fill=(240, 210, 40))
    return image


def paint_landscape(width: int, height: int) -> Image.Image:
    """Sky, sun and two rows of rolling hills (the i2i source picture)."""
    image = Image.fromarray(gradient(width, height, (90, 150, 225), (215, 230, 245), (0.2, 1.0)))
    draw = ImageDraw.Draw(image)
    sun = height // 7
    sx, sy = width * 0.72, height * 0.25
    draw.ellipse((sx - sun, sy - sun, sx + sun, sy + sun), fill=(255, 225, 90))
    hills = ((0.62, 0.08, 1.3, (70, 140, 70)), (0.78, 0.06, 2.1, (40, 105, 50)))
    for base, amp, freq, colour in hills:
        ridge = [
            (x, height * (base + amp * math.sin(freq * 2 * math.pi * x / width)))
            for x in range(0, width + 1, 4)
        ]
        draw.polygon([(0, height), *ridge, (width, height)], fill=colour)
    return image


def paint_ref(kind: int, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Three distinct reference subjects: a red apple, a blue striped mug, a yellow star."""
    backgrounds = ((240, 236, 226), (222, 232, 240), (40, 40, 56))
    image = Image.new("RGB", (width, height), backgrounds[kind])
    draw = ImageDraw.Draw(image)
    cx, cy = width / 2, height / 2
    if kind == 0:
        r = width * 0.34
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 30, 40))
        draw.line(((cx, cy - r), (cx + 6, cy - r - 18)), fill=(90, 60, 20), width=4)
        draw.ellipse((cx + 6, cy - r - 20, cx + 30, cy - r - 8), fill=(60, 150, 50))
    elif kind == 1:
        box = (width * 0.2, height * 0.25, width * 0.72, height * 0.8)
        draw.rectangle(box, fill=(245, 245, 250))
        for y in np.arange(box[1] + 6, box[3] - 4, 12):
            draw.rectangle((box[0], y, box[2], y + 5), fill=(40, 80, 180))
        draw.arc((box[2] - 12, cy - 22, box[2] + 22, cy + 18), -90, 90, fill=(40, 80, 180), width=6)
    else:
        points = [
            (cx + (36 if i % 2 == 0 else 15) * math.sin(i * math.pi / 5),
             cy - (36 if i % 2 == 0 else 15) * math.cos(i * math.pi / 5))
            for i in range(10)
        ]
        draw.polygon(points, fill=(250, 205, 40))
    # A little seeded grain so the JPEGs look like photos rather than flat vector art.
    grain = rng.normal(0.0, 3.0, (height, width, 1))
    noisy = np.clip(np.asarray(image, np.float64) + grain, 0, 255).round().astype(np.uint8)
    return Image.fromarray(noisy).filter(ImageFilter.SMOOTH)


def write_clip(spec: ClipSpec, out: Path) -> Path:
    """Encode a clip with libx264 (yuv420p) using the reproducible X264_OPTIONS."""
    path = out / spec.name
    total = round(spec.fps * spec.seconds)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(
            "libx264", rate=Fraction(spec.fps), options=X264_OPTIONS
        )
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        for index in range(total):
            rgb = np.asarray(spec.paint(index, total, spec.width, spec.height).convert("RGB"))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def write_all(out: Path) -> list[Path]:
    """Generate every example file into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    written = [
        write_clip(ClipSpec("source.mp4", 256, 144, 24, 2.0, paint_source), out),
        write_clip(ClipSpec("source_b.mp4", 192, 192, 24, 2.0, paint_source_b), out),
    ]
    image_path = out / "image.png"
    paint_landscape(240, 160).save(image_path, optimize=True)
    written.append(image_path)
    for kind in range(3):
        ref_path = out / f"ref{kind + 1}.jpg"
        paint_ref(kind, 128, 160, rng).save(ref_path, quality=88, optimize=True)
        written.append(ref_path)
    return written


def main() -> None:
    """Command-line entry: generate the media and log each file's size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write_all(args.out)
    for path in paths:
        logger.info("%-14s %7.1f KB", path.name, path.stat().st_size / 1024)
    logger.info("total          %7.1f KB", sum(p.stat().st_size for p in paths) / 1024)


if __name__ == "__main__":
    main()
