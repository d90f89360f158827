"""Chosen frames of a video for the metrics: a video file (decoded by `standin.video.read_video_frames`, the
project's one frame reader) or frames already in memory.

Frames go to face detection, so their size is checked against `standin.faces.base.image_size_problem` first:
for a file from its header, before any frame is decoded.
"""

from pathlib import Path

import numpy as np

from standin.faces.base import image_size_problem
from standin.video import VideoReadError, read_video_frames, video_frame_count

__all__ = ["VideoReadError", "frame_count", "read_frames", "uniform_indices"]


def frame_count(video) -> int:
    """Number of frames of a video file (counted from its packets, no decoding) or of an in-memory sequence."""
    if not isinstance(video, (str, Path)):
        return len(_as_frames(video))
    return video_frame_count(video)


def read_frames(video, indices) -> dict[int, np.ndarray]:
    """{index: RGB uint8 frame [H, W, 3]} for the wanted frame indices, in one sequential pass.

    video: path to a video file, or frames in memory ([T, H, W, 3] uint8 array or a list of such frames).
    Indices past the frames that can actually be decoded (a truncated file) are left out.
    """
    if not isinstance(video, (str, Path)):
        frames = _as_frames(video)
        return {i: frames[i] for i in sorted({int(i) for i in indices}) if 0 <= i < len(frames)}

    def check_size(width: int, height: int) -> None:
        problem = image_size_problem(width, height)
        if problem:
            raise VideoReadError(f"{video}: frames: {problem}")

    return read_video_frames(video, indices, check_size=check_size)


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame (fewer if the video is shorter)."""
    if total <= 0:
        return []
    return sorted(set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()))


def _as_frames(video) -> list[np.ndarray]:
    frames = list(video) if not isinstance(video, np.ndarray) else video
    if len(frames) == 0:
        raise VideoReadError("the video has no frames")
    first = np.asarray(frames[0])
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise VideoReadError(f"frames must be RGB uint8 [H, W, 3], got {first.dtype} {first.shape}")
    problem = image_size_problem(first.shape[1], first.shape[0])
    if problem:
        raise VideoReadError(f"frames: {problem}")
    return frames
