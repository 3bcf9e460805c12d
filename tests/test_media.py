"""Tests for bernini.media: size and frame rules, image/video loading, errors and atomic writes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from media_files import encode_audio_only, encode_video, gray_frames
from PIL import Image

from bernini import media
from bernini.media import (
    MediaError,
    coerce_num_frames,
    load_image,
    load_video,
    probe_video,
    read_video_frames_rgb,
    resize_dims,
    sample_frame_indices,
    sample_preview_frames,
    snap_to_16,
    verify_media,
    write_media,
)

# A phone's portrait clip: stored landscape, shown turned 90 degrees clockwise (`rotate=90`).
PHONE_PORTRAIT_MATRIX = (0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
NOISE = np.random.default_rng(2).bytes(4096)  # not any media format


def striped_frames(count: int, width: int, height: int) -> np.ndarray:
    """Black frames with a white band along the left edge, to check orientation after rotation."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    frames[:, :, : width // 4] = 255
    return frames


def mean_value(video: torch.Tensor, t: int) -> float:
    """Mean of frame t of a [3, T, H, W] tensor in [-1, 1], mapped back to 0..255."""
    return float(((video[:, t] + 1) / 2 * 255).mean())


@pytest.fixture
def clip30(tmp_path: Path) -> Path:
    """40 frames of 64x48 at 30 fps, frame i gray 6*i."""
    return encode_video(tmp_path / "clip30.mp4", gray_frames(40, 64, 48), fps=30)


# --- resize_dims -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "max_size", "expected"),
    [
        (1920, 1080, 848, (848, 480)),
        (1280, 720, 848, (848, 480)),
        (3840, 2160, 848, (848, 480)),
        (720, 1280, 848, (480, 848)),
        (1080, 1920, 848, (480, 848)),
        (1024, 1024, 848, (848, 848)),
        (640, 360, 848, (640, 352)),  # 360/16 = 22.5 rounds half to even -> 22
        (1920, 1080, 1280, (1280, 720)),
        (100, 50, 848, (96, 48)),  # never upscales
        (8, 4, 848, (16, 16)),  # at least 16
    ],
)
def test_resize_dims(width: int, height: int, max_size: int, expected: tuple[int, int]) -> None:
    assert resize_dims(width, height, max_size) == expected


def test_resize_dims_rejects_nonpositive() -> None:
    with pytest.raises(ValueError):
        resize_dims(0, 10, 848)


def test_snap_to_16_the_text_only_size_rule() -> None:
    # --width/--height of a task without media (scale 1): nearest multiple of 16, half to even, at least 16.
    assert [snap_to_16(side) for side in (360, 1000, 1016, 8, 24, 848)] == [352, 992, 1024, 16, 32, 848]


# --- frame sampling --------------------------------------------------------------------------


def test_coerce_num_frames() -> None:
    assert [coerce_num_frames(n) for n in (1, 4, 5, 80, 81, 84)] == [1, 5, 5, 81, 81, 85]


def test_sample_ten_seconds_at_30fps_covers_first_five_seconds() -> None:
    idx = sample_frame_indices(300, 30.0, 16.0, 81)
    assert len(idx) == 81
    assert idx[0] == 0
    assert 4.8 <= idx[-1] / 30.0 <= 5.1
    assert idx == sorted(idx)


@pytest.mark.parametrize(
    ("total", "video_fps", "expected_len", "expected_last"),
    [(72, 24.0, 49, 71), (40, 30.0, 21, 39)],
)
def test_sample_short_clips(
    total: int, video_fps: float, expected_len: int, expected_last: int
) -> None:
    idx = sample_frame_indices(total, video_fps, 16.0, 81)
    assert len(idx) == expected_len
    assert idx[0] == 0 and idx[-1] == expected_last


def test_sample_num_frames_80_behaves_as_81() -> None:
    assert sample_frame_indices(300, 30.0, 16.0, 80) == sample_frame_indices(300, 30.0, 16.0, 81)


def test_sample_same_fps_keeps_every_frame() -> None:
    assert sample_frame_indices(33, 16.0, 16.0, 81) == list(range(33))


def test_sample_minimum_five_and_clamped() -> None:
    idx = sample_frame_indices(2, 30.0, 16.0, 81)
    assert len(idx) == 5
    assert all(0 <= i <= 1 for i in idx)


# --- load_image ------------------------------------------------------------------------------


def test_load_image_shape_and_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)).save(path)
    image = load_image(path, 848)
    assert image.shape == (3, 1, 480, 848)
    assert image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_load_image_exact_values_without_resize(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[..., 0] = 255
    Image.fromarray(pixels).save(path)
    image = load_image(path, 848)
    assert torch.equal(image[0], torch.ones(1, 32, 48))
    assert torch.equal(image[1], -torch.ones(1, 32, 48))


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    stored = np.zeros((64, 96, 3), np.uint8)
    stored[:, :24] = 255  # white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display turned 90 degrees clockwise
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = load_image(path, 848)
    assert image.shape == (3, 1, 96, 64)  # portrait after orientation
    top, bottom = image[:, 0, :16].mean(), image[:, 0, -16:].mean()
    assert top > 0.8 and bottom < -0.8  # left edge turned clockwise becomes the top


def test_load_image_errors(tmp_path: Path) -> None:
    bad = tmp_path / "noise.png"
    bad.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(MediaError, match="noise.png.*could not be decoded"):
        load_image(bad, 848)
    with pytest.raises(MediaError, match="URLs are not accepted"):
        load_image("https://example.com/a.png", 848)


# --- probe_video / load_video ----------------------------------------------------------------


def test_probe_video(clip30: Path) -> None:
    info = probe_video(clip30)
    assert (info.width, info.height, info.frames, info.rotation) == (64, 48, 40, 0)
    assert info.fps == pytest.approx(30.0)
    assert info.duration == pytest.approx(40 / 30, abs=0.05)
    assert info.path == clip30


def test_probe_counts_frames_when_container_has_no_count(tmp_path: Path) -> None:
    frames = gray_frames(13, 32, 32)
    path = encode_video(tmp_path / "clip.mkv", frames, fps=24, container_format="matroska")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the premise: mkv stores no count
    assert probe_video(path).frames == 13


def test_load_video_shape_and_frame_choice(clip30: Path) -> None:
    video = load_video(clip30, fps=16, num_frames=81, max_size=848)
    assert video.shape == (3, 21, 48, 64)
    assert video.dtype == torch.float32
    assert -1.0 <= float(video.min()) and float(video.max()) <= 1.0
    expected = sample_frame_indices(40, 30.0, 16.0, 81)
    for t, index in enumerate(expected):
        assert mean_value(video, t) == pytest.approx(index * 6, abs=2.5)


def test_load_video_resizes(clip30: Path) -> None:
    video = load_video(clip30, fps=16, num_frames=5, max_size=32)
    assert video.shape == (3, 5, 32, 32)  # 64x48 * 0.5 = 32x24 -> 24/16 = 1.5 rounds to 2 -> 32


def test_load_video_decodes_only_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = encode_video(tmp_path / "long.mp4", gray_frames(120, 32, 32, step=2), fps=30)
    decoded: list[int] = []
    real = media.read.rotate_upright

    def counting(rgb: np.ndarray, rotation: int) -> np.ndarray:
        decoded.append(1)
        return real(rgb, rotation)

    monkeypatch.setattr("bernini.media.read.rotate_upright", counting)  # looked up by iter_decoded_frames
    video = load_video(path, fps=16, num_frames=17, max_size=848)
    needed = sample_frame_indices(120, 30.0, 16.0, 17)
    assert video.shape[1] == 17
    assert len(decoded) == needed[-1] + 1 < 120


def test_load_video_survives_an_over_reported_frame_count(
    clip30: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = load_video(clip30, fps=16, num_frames=81, max_size=848)
    real_probe = media.probe_video
    monkeypatch.setattr(  # looked up by load_video
        "bernini.media.read.probe_video", lambda path: dataclasses.replace(real_probe(path), frames=60)
    )
    assert torch.equal(load_video(clip30, fps=16, num_frames=81, max_size=848), honest)


def test_rotated_video_comes_out_upright(tmp_path: Path) -> None:
    frames = striped_frames(6, 64, 32)
    path = encode_video(tmp_path / "phone.mp4", frames, fps=30, display_matrix=PHONE_PORTRAIT_MATRIX)
    info = probe_video(path)
    assert info.rotation == 90
    assert (info.width, info.height) == (32, 64)
    video = load_video(path, fps=30, num_frames=5, max_size=848)
    assert video.shape == (3, 5, 64, 32)
    # The stored left band, turned 90 degrees clockwise, runs along the top.
    assert float(video[:, 0, :12].mean()) > 0.8
    assert float(video[:, 0, -40:].mean()) < -0.8


def test_rotated_180_video(tmp_path: Path) -> None:
    path = encode_video(tmp_path / "flip.mp4", striped_frames(5, 64, 32), fps=30, rotation=180)
    info = probe_video(path)
    assert info.rotation == 180 and (info.width, info.height) == (64, 32)
    video = load_video(path, fps=30, num_frames=5, max_size=848)
    assert float(video[:, 0, :, -12:].mean()) > 0.8  # left band ends on the right
    assert float(video[:, 0, :, :40].mean()) < -0.8


@pytest.mark.parametrize(
    ("matrix_ccw", "tag", "expected"),
    [(0, "90", 90), (0, "270", 270), (-90, None, 90), (90, None, 270), (180, None, 180), (-88, None, 90)],
)
def test_read_rotation(matrix_ccw: int, tag: str | None, expected: int) -> None:
    # Stand-ins: current FFmpeg turns a legacy `rotate` tag into a display matrix on read.
    frame = SimpleNamespace(rotation=matrix_ccw)
    stream = SimpleNamespace(metadata={"rotate": tag} if tag else {})
    assert media.probe.read_rotation(frame, stream, Path("v.mp4")) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("noise.mp4", lambda p: p.write_bytes(NOISE), "could not be decoded"),
        ("empty.mp4", lambda p: p.write_bytes(b""), "is empty"),
        ("voice.m4a", encode_audio_only, "has no video stream"),
    ],
)
def test_bad_videos_raise_media_error(
    tmp_path: Path, name: str, make: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(MediaError, match=message) as caught:
        load_video(path, fps=16, num_frames=81, max_size=848)
    text = str(caught.value)
    assert name in text and ("ffmpeg" in text or "re-" in text)  # names the file and a fix
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "url",
    ["http://example.com/a.mp4", "https://example.com/a.mp4", "rtsp://cam/live", "file:///tmp/a.mp4"],
)
def test_urls_are_refused(url: str) -> None:
    with pytest.raises(MediaError, match="URLs are not accepted; download the file first"):
        probe_video(url)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="nope.mp4' does not exist"):
        probe_video(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="not a regular file"):
        probe_video(tmp_path)


def test_limits(clip30: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bernini.media.probe.MAX_FRAMES", 10)  # the limits live where they are checked
    with pytest.raises(MediaError, match="10-frame limit; trim"):
        probe_video(clip30)
    monkeypatch.setattr("bernini.media.probe.MAX_FRAMES", 10_000)
    monkeypatch.setattr("bernini.media.probe.MAX_PIXELS", 32 * 32)
    with pytest.raises(MediaError, match="pixels-per-frame limit.*downscale"):
        probe_video(clip30)
    monkeypatch.setattr("bernini.media.probe.MAX_PIXELS", 4096 * 4096)
    monkeypatch.setattr("bernini.media.probe.MAX_FILE_BYTES", 100)
    with pytest.raises(MediaError, match="file size limit"):
        probe_video(clip30)


# --- previews --------------------------------------------------------------------------------


def test_sample_preview_frames(clip30: Path) -> None:
    frames = sample_preview_frames(clip30)
    assert len(frames) == 3
    assert all(isinstance(f, Image.Image) for f in frames)
    assert all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    means = [float(np.asarray(f).mean()) for f in frames]
    for got, index in zip(means, (0, 20, 39)):  # round(i * 39 / 2): 0, 20 (19.5 -> 20), 39
        assert got == pytest.approx(index * 6, abs=2.5)


def test_read_video_frames_rgb(clip30: Path) -> None:
    frames = read_video_frames_rgb(clip30, [5, 2, 5])
    assert [round(float(np.asarray(f).mean()) / 6) for f in frames] == [5, 2, 5]
    with pytest.raises(MediaError, match="out of range"):
        read_video_frames_rgb(clip30, [40])


# --- write_media / verify_media --------------------------------------------------------------


def test_write_mp4_round_trip(tmp_path: Path) -> None:
    frames = gray_frames(9, 48, 32, step=25).astype(np.float32) / 255.0
    out = write_media(frames, tmp_path / "out" / "clip.mp4", fps=16)
    assert out == tmp_path / "out" / "clip.mp4"
    info = probe_video(out)
    assert (info.frames, info.width, info.height) == (9, 48, 32)
    assert info.fps == pytest.approx(16.0)
    assert verify_media(out, 9, 48, 32)
    decoded = read_video_frames_rgb(out, [4])[0]
    assert float(np.asarray(decoded).mean()) == pytest.approx(100, abs=2)
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_write_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (1, 16, 32, 3), dtype=np.uint8)
    out = write_media(frames, tmp_path / "still.png", fps=16)
    assert np.array_equal(np.asarray(Image.open(out)), frames[0])
    assert verify_media(out, 1, 32, 16)
    assert not verify_media(out, 1, 16, 32)


def test_write_quantizes_floats(tmp_path: Path) -> None:
    frames = np.full((1, 16, 16, 3), 0.5, np.float32)
    frames[0, 0, 0] = (-1.0, 2.0, 1.0 / 255 * 10.4)
    out = write_media(frames, tmp_path / "q.png", fps=16)
    pixels = np.asarray(Image.open(out))
    assert tuple(pixels[0, 0]) == (0, 255, 10)
    assert pixels[1, 1, 0] == 128  # round(127.5) half to even -> 128


def test_write_validates_paths_and_sizes(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="one-frame outputs are written as PNG; .* end in .png"):
        write_media(np.zeros((1, 16, 16, 3), np.uint8), tmp_path / "one.mp4", fps=16)
    with pytest.raises(MediaError, match="should end in .mp4"):
        write_media(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "many.png", fps=16)
    with pytest.raises(MediaError, match="odd side"):
        write_media(np.zeros((3, 15, 16, 3), np.uint8), tmp_path / "odd.mp4", fps=16)
    with pytest.raises(MediaError, match="NaN"):
        write_media(np.full((1, 16, 16, 3), np.nan, np.float32), tmp_path / "nan.png", fps=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("encoder died"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    final = tmp_path / "clip.mp4"
    calls: list[int] = []
    real = media.write.make_video_frame

    def flaky(rgb: np.ndarray) -> av.VideoFrame:
        calls.append(1)
        if len(calls) == 5:
            raise error
        return real(rgb)

    monkeypatch.setattr("bernini.media.write.make_video_frame", flaky)  # looked up by encode_mp4
    expected = MediaError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        write_media(np.zeros((9, 32, 32, 3), np.uint8), final, fps=16)
    if expected is MediaError:
        assert "clip.mp4" in str(caught.value)
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bernini.media.write.verify_media", lambda *args: False)  # looked up by write_media
    with pytest.raises(MediaError, match="did not read back"):
        write_media(np.zeros((3, 32, 32, 3), np.uint8), tmp_path / "clip.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_verify_media_false_for_truncated_or_mismatched(tmp_path: Path) -> None:
    out = write_media(np.zeros((9, 32, 32, 3), np.uint8), tmp_path / "clip.mp4", fps=16)
    assert verify_media(out, 9, 32, 32)
    assert not verify_media(out, 8, 32, 32)
    assert not verify_media(out, 9, 32, 16)
    assert not verify_media(tmp_path / "missing.mp4", 9, 32, 32)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    assert not verify_media(out, 9, 32, 32)
    out.write_bytes(data[: len(data) - 200])
    assert not verify_media(out, 9, 32, 32)
