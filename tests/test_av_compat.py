"""Media I/O on every PyAV we admit: the 19.x av.open (no `metadata_errors`) and the older one (strict unless told)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from media_files import encode_video, gray_frames
from PIL import Image

from bernini.doctor import check_codecs
from bernini.media import load_video, open_input, probe_video, read_video_frames_rgb, sample_frame_indices, sample_preview_frames, verify_media, write_media
from bernini.prompt_enhancer import build_messages

REAL_OPEN = av.open


def latin1_titled_clip(path: Path) -> Path:
    """A clip whose `encoder` tag holds a Latin-1 byte (0xE9), as some cameras and old muxers write."""
    encode_video(path, gray_frames(9, 64, 32, step=20), fps=16)
    data = path.read_bytes()
    marker = b"Lavf"  # the muxer's own `encoder` tag, stored as raw bytes in the udta atom
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, b"L\xe9vf"))
    return path


def open_without_metadata_errors(*args: Any, **kwargs: Any) -> Any:
    """av.open as PyAV 19 has it: the keyword is gone and passing it is a TypeError."""
    if "metadata_errors" in kwargs:
        raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
    return REAL_OPEN(*args, **kwargs)


def test_a_clip_with_non_utf8_metadata_opens_on_the_installed_pyav(tmp_path: Path) -> None:
    # On PyAV < 19 this needs metadata_errors="replace" (strict decoding raises UnicodeDecodeError);
    # on 19 the metadata is decoded leniently whatever we pass.
    clip = latin1_titled_clip(tmp_path / "latin1.mp4")
    info = probe_video(clip)
    assert (info.width, info.height, info.frames) == (64, 32, 9)
    video = load_video(clip, fps=16, num_frames=5, max_size=64)
    assert video.shape == (3, 5, 32, 64)
    with open_input(clip) as container:
        assert "\ufffd" in container.metadata["encoder"] or "\udce9" in container.metadata["encoder"]


def test_every_media_path_works_through_the_19x_av_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return open_without_metadata_errors(*args, **kwargs)

    monkeypatch.setattr(av, "open", recording_open)
    clip = encode_video(tmp_path / "clip.mp4", gray_frames(12, 64, 32, step=20), fps=16)

    info = probe_video(clip)  # probe
    assert (info.width, info.height, info.frames, info.fps) == (64, 32, 12, 16.0)
    video = load_video(clip, fps=16, num_frames=9, max_size=64)  # read
    assert video.shape == (3, 9, 32, 64)
    frame_means = [float(((video[:, t] + 1) / 2 * 255).mean()) for t in range(9)]
    wanted = sample_frame_indices(12, 16.0, 16.0, 9)  # frame i of the clip is gray 20*i
    assert frame_means == pytest.approx([20.0 * i for i in wanted], abs=1.5)  # the right frames, in order
    assert [im.size for im in read_video_frames_rgb(clip, [0, 11])] == [(64, 32), (64, 32)]
    assert len(sample_preview_frames(clip)) == 3

    out = tmp_path / "out.mp4"
    frames = np.repeat(np.linspace(0, 1, 5, dtype=np.float32)[:, None, None, None], 3, axis=3) * np.ones((5, 32, 48, 3), np.float32)
    assert write_media(frames, out, fps=16) == out  # write, which verifies by reading back
    assert verify_media(out, 5, 48, 32)  # verify
    assert not verify_media(out, 6, 48, 32)
    assert check_codecs()["decode_h264"] == "yes"  # the doctor's own probe

    assert any("metadata_errors" in kw for kw in calls)  # the old keyword was tried, refused, and dropped


def sent_levels(clip: Path) -> list[int]:
    """The gray level of each video frame the prompt enhancer would send for a v2v task."""
    messages, _ = build_messages("v2v", "x", videos=[clip])
    urls = [part["image_url"]["url"] for part in messages[1]["content"] if part["type"] == "image_url"]
    return [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L").getpixel((32, 16)) for url in urls]


def test_the_prompt_enhancer_reads_video_frames_on_every_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its frames come through bernini.media, so a Latin-1 tag (strict on PyAV < 19) opens, and so
    # does any clip through the 19.x av.open. Frame i of both clips is gray 20*i, 9 frames.
    assert sent_levels(latin1_titled_clip(tmp_path / "latin1.mp4")) == pytest.approx([0, 80, 160], abs=3)
    monkeypatch.setattr(av, "open", open_without_metadata_errors)
    clip = encode_video(tmp_path / "clip.mp4", gray_frames(9, 64, 32, step=20), fps=16)
    assert sent_levels(clip) == pytest.approx([0, 80, 160], abs=3)  # first, middle, last


def test_other_type_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_open(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("open() argument 'file' must be str")

    monkeypatch.setattr(av, "open", broken_open)
    with pytest.raises(TypeError, match="must be str"):
        open_input(tmp_path / "x.mp4")
