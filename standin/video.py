"""Writing generated videos: an mp4 (H.264 through imageio-ffmpeg) and a contact sheet PNG of its frames."""

import os
from pathlib import Path

import imageio
import numpy as np
from PIL import Image

from standin.io import atomic_write


def companion_paths(video: str | os.PathLike) -> tuple[Path, Path]:
    """The files that go with a generated video `name.mp4`: `name.reference.png` (the reference exactly as the
    model saw it; what `standin eval` pairs the video with) and `name.sheet.png` (a contact sheet of its frames)."""
    video = Path(video)
    return video.with_name(f"{video.stem}.reference.png"), video.with_name(f"{video.stem}.sheet.png")


def to_uint8(frames) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (the pipeline's "np" output) or uint8 -> uint8."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {frames.shape}")
    return frames


def save_video(frames, path: str | os.PathLike, fps: int = 25):
    frames = to_uint8(frames)

    def write(temporary):
        # macro_block_size=1: never rescale; our sizes are multiples of 16, which H.264 / yuv420p needs anyway.
        with imageio.get_writer(temporary, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1, pixelformat="yuv420p") as writer:
            for frame in frames:
                writer.append_data(frame)

    return atomic_write(path, write)


def read_video(path: str | os.PathLike) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])


def contact_sheet(frames, columns: int = 8, max_frames: int = 16) -> Image.Image:
    """Up to `max_frames` evenly spaced frames in a grid, for a glance at a whole clip."""
    frames = to_uint8(frames)
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    columns = min(columns, len(picks))
    rows = -(-len(picks) // columns)
    height, width = frames.shape[1:3]
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for slot, index in enumerate(picks):
        sheet.paste(Image.fromarray(frames[index]), ((slot % columns) * width, (slot // columns) * height))
    return sheet
