"""Load source images and videos into model tensors and write rendered frames atomically.

Exports what callers outside the package use; the helpers behind them stay in their modules
(probe, read, rules, write, container).
"""

from bernini.media.container import open_input
from bernini.media.errors import MediaError
from bernini.media.probe import VideoInfo, check_local_file, probe_video
from bernini.media.read import load_image, load_video, open_rgb_image, read_video_frames_rgb, sample_preview_frames
from bernini.media.rules import coerce_num_frames, resize_dims, sample_frame_indices, snap_to_16
from bernini.media.write import verify_media, write_media

__all__ = [
    "MediaError", "VideoInfo", "check_local_file", "coerce_num_frames", "load_image", "load_video", "open_input",
    "open_rgb_image", "probe_video", "read_video_frames_rgb", "resize_dims", "sample_frame_indices",
    "sample_preview_frames", "snap_to_16", "verify_media", "write_media",
]
