"""The input video's playback rate and audio, and the audio copied into the swapped video.

Frames are read and written by standin.video (read_video_frames, save_video: H.264, verified, labelled as
AI-generated). The audio goes in afterwards with the ffmpeg that imageio-ffmpeg bundles: the video stream and the
file's metadata (the AI-generated label) are copied as they are, the input's audio streams are copied too, or
re-encoded to AAC when the container cannot hold them as they are (e.g. PCM from a .mov into an .mp4).
"""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from standin.io import atomic_write
from standin.video import VideoReadError, VideoWriteError, video_file


CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}  # what save_video writes


@dataclass
class VideoInfo:
    fps: float
    audio_codec: str | None  # None: no audio track


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Playback rate and audio codec of a video file, from its header. VideoReadError if it has neither."""
    path = video_file(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        try:
            with Image.open(path) as image:
                duration = image.info.get("duration") or 100  # milliseconds per frame
        except OSError as error:
            raise VideoReadError(f"{path}: not a readable video ({error})") from None
        return VideoInfo(fps=1000.0 / duration, audio_codec=None)
    import imageio.v2 as imageio

    try:
        reader = imageio.get_reader(str(path), format="ffmpeg")
        meta = reader.get_meta_data()
        reader.close()
    except (OSError, RuntimeError, ValueError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise VideoReadError(f"{path}: not a readable video ({lines[-1] if lines else type(error).__name__})") from None
    fps = meta.get("fps")
    if not fps or fps <= 0 or fps != fps:
        raise VideoReadError(f"{path}: no frame rate in the header")
    return VideoInfo(fps=float(fps), audio_codec=meta.get("audio_codec") or None)


def copy_audio(video: str | os.PathLike, source: str | os.PathLike) -> str:
    """Put the audio streams of `source` into `video` (replaced atomically; its video stream and metadata kept).
    Returns "copied" or "aac" (re-encoded); VideoWriteError when neither works (then `video` is as it was)."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    before, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    errors = []
    for codec, label in (("copy", "copied"), ("aac", "aac")):
        def write(temporary, codec=codec):
            muxer = CONTAINERS.get(Path(video).suffix.lower(), "mp4")
            command = [ffmpeg, "-y", "-v", "error", "-i", str(video), "-i", str(source), "-map", "0:v:0",
                       "-map", "1:a", "-c:v", "copy", "-c:a", codec, "-map_metadata", "0", "-f", muxer,
                       str(temporary)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise VideoWriteError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "ffmpeg")
            after, _ = imageio_ffmpeg.count_frames_and_secs(str(temporary))
            if after != before:
                raise VideoWriteError(f"{after} frames after adding the audio, {before} before")

        try:
            atomic_write(video, write)
            return label
        except VideoWriteError as error:
            errors.append(str(error))
    raise VideoWriteError(f"{video}: the audio of {source} could not be added ({errors[-1]})")
