"""Reading chosen frames of a video file (imageio with its ffmpeg plugin) or of frames already in memory."""

from pathlib import Path

import numpy as np


class VideoReadError(ValueError):
    """The input is not a readable video: missing, not a video, or without frames."""


def frame_count(video) -> int:
    """Number of frames of a video file (counted from its packets, no decoding) or of an in-memory sequence."""
    if not isinstance(video, (str, Path)):
        return len(_as_frames(video))
    import imageio_ffmpeg

    path = _existing_file(video)
    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError) as e:
        # ffmpeg's message is a long log; its last line says why
        raise VideoReadError(f"{path}: not a readable video ({_last_line(e)})") from None
    if count == 0:
        raise VideoReadError(f"{path}: the video has no frames")
    return count


def read_frames(video, indices) -> dict[int, np.ndarray]:
    """{index: RGB uint8 frame [H, W, 3]} for the wanted frame indices, in one sequential pass.

    video: path to a video file, or frames in memory ([T, H, W, 3] uint8 array or a list of such frames).
    Indices past the frames that can actually be decoded (a truncated file) are left out.
    """
    wanted = sorted({int(i) for i in indices})
    if not isinstance(video, (str, Path)):
        frames = _as_frames(video)
        return {i: frames[i] for i in wanted if 0 <= i < len(frames)}

    import imageio.v2 as imageio

    path = _existing_file(video)
    found = {}
    try:
        reader = imageio.get_reader(str(path), format="ffmpeg")
    except (OSError, RuntimeError, ValueError) as e:
        raise VideoReadError(f"{path}: not a readable video ({_last_line(e)})") from None
    try:
        for index, frame in enumerate(reader):
            if index in wanted:
                found[index] = np.ascontiguousarray(frame[..., :3])
            if index >= wanted[-1]:
                break
    except (OSError, RuntimeError, ValueError) as e:
        if not found:
            raise VideoReadError(f"{path}: cannot decode frames ({_last_line(e)})") from None
    finally:
        reader.close()
    if not found:
        raise VideoReadError(f"{path}: no frame could be decoded")
    return found


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
    return frames


def _existing_file(video) -> Path:
    path = Path(video)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    return path


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("===")]
    return lines[-1] if lines else type(error).__name__
