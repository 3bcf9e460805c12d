"""Load source images and videos into model tensors and write rendered frames atomically."""

from bernini.media.errors import MediaError, av, require_av
from bernini.media.probe import (
    MAX_FILE_BYTES,
    MAX_FRAMES,
    MAX_PIXELS,
    PathLike,
    VideoInfo,
    check_local_file,
    check_pixel_limit,
    count_frames,
    damaged_error,
    decode_first_frame,
    open_container,
    pick_video_stream,
    probe_video,
    raise_frame_limit,
    read_duration,
    read_fps,
    read_rotation,
)
from bernini.media.read import (
    decode_selected,
    iter_decoded_frames,
    load_image,
    load_video,
    open_rgb_image,
    read_video_frames_rgb,
    resize_frame,
    rotate_upright,
    sample_preview_frames,
)
from bernini.media.rules import (
    coerce_num_frames,
    resize_dims,
    sample_frame_indices,
    snap_to_16,
)
from bernini.media.write import (
    OUTPUT_CRF,
    check_output_path,
    encode_mp4,
    make_video_frame,
    quantize_frames,
    sync_file,
    verify_media,
    verify_video,
    write_media,
)

__all__ = [
    "MAX_FILE_BYTES", "MAX_FRAMES", "MAX_PIXELS", "OUTPUT_CRF", "MediaError", "PathLike", "VideoInfo", "av",
    "check_local_file", "check_output_path", "check_pixel_limit", "coerce_num_frames", "count_frames", "damaged_error",
    "decode_first_frame", "decode_selected", "encode_mp4", "iter_decoded_frames", "load_image", "load_video",
    "make_video_frame", "open_container", "open_rgb_image", "pick_video_stream", "probe_video", "quantize_frames",
    "raise_frame_limit", "read_duration", "read_fps", "read_rotation", "read_video_frames_rgb", "require_av",
    "resize_dims", "resize_frame", "rotate_upright", "sample_frame_indices", "sample_preview_frames", "snap_to_16",
    "sync_file", "verify_media", "verify_video", "write_media",
]
