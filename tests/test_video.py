"""Writing videos: frames checked first, what was written verified before it replaces anything, disk-full and
ffmpeg failures leave the previous file byte for byte, and every video is labelled as AI-generated. Reading:
one reader for mp4 and GIF, regular files only."""

import errno
import os
import subprocess

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest

import standin.video as video_module
from standin.video import (
    GENERATED_COMMENT,
    VideoReadError,
    VideoWriteError,
    read_video,
    read_video_frames,
    save_video,
    video_frame_count,
)


def frames(count=5, height=32, width=48, value=None):
    rng = np.random.default_rng(0)
    if value is not None:
        return np.full((count, height, width, 3), value, np.uint8)
    return rng.integers(0, 255, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture
def good(tmp_path):
    """An existing good video, and its bytes."""
    path = save_video(frames(), tmp_path / "keep.mp4")
    return path, path.read_bytes()


def metadata(path) -> str:
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.replace("\\", "")  # ffmetadata escapes = ; # and newlines


def test_a_written_video_reads_back_and_says_it_is_generated(good):
    path, _ = good
    assert read_video(path).shape == (5, 32, 48, 3)
    text = metadata(path)
    assert f"comment={GENERATED_COMMENT}" in text
    assert "AI-generated" in GENERATED_COMMENT and "standin" in GENERATED_COMMENT


@pytest.mark.parametrize("bad, message", [
    (frames(height=33, width=32), r"32x33 px .*even width and height"),
    (frames(height=32, width=31), r"31x32 px"),
    (frames(count=0), "at least one frame"),
])
def test_frames_h264_cannot_take_are_refused_and_the_old_file_kept(good, bad, message):
    path, before = good
    with pytest.raises(ValueError, match=message):
        save_video(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["keep.mp4"]


def test_a_name_ffmpeg_would_not_write_as_h264_is_refused(tmp_path):
    with pytest.raises(ValueError, match="written as H.264 in .mp4"):
        save_video(frames(), tmp_path / "clip.gif")
    assert not list(tmp_path.iterdir())


def test_disk_full_while_encoding_keeps_the_old_file_byte_identical(good, monkeypatch):
    path, before = good
    real_get_writer = imageio.get_writer

    class FullDisk:
        """The real writer, until the disk fills after the second frame."""

        def __init__(self, *args, **kwargs):
            self.writer, self.frames = real_get_writer(*args, **kwargs), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.writer.close()

        def append_data(self, frame):
            self.frames += 1
            if self.frames > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.writer.append_data(frame)

    monkeypatch.setattr(imageio, "get_writer", FullDisk)
    with pytest.raises(VideoWriteError, match="No space left") as caught:
        save_video(frames(value=200), path)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["keep.mp4"]  # no temporary left behind


def test_a_file_that_does_not_read_back_as_written_never_replaces_the_old_one(good, monkeypatch):
    path, before = good
    # ffmpeg "succeeds" but the file holds fewer frames than given (what a silently failing encoder leaves)
    real_encode = video_module._encode
    monkeypatch.setattr(video_module, "_encode", lambda f, temporary, fps, *tags: real_encode(f[:2], temporary, fps, *tags))
    with pytest.raises(VideoWriteError, match="reads back as 2 frames of 48x32 px, not 5 of 48x32"):
        save_video(frames(), path)
    assert path.read_bytes() == before

    monkeypatch.setattr(video_module, "_encode", lambda f, temporary, fps, *tags: None)  # a 0-byte file
    with pytest.raises(VideoWriteError, match="empty file"):
        save_video(frames(), path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["keep.mp4"]


def test_gif_frames_are_read(tmp_path):
    clip = [np.full((20, 30, 3), 40 * i, np.uint8) for i in range(4)]
    imageio.mimwrite(tmp_path / "a.gif", clip, duration=40, loop=0)
    assert video_frame_count(tmp_path / "a.gif") == 4
    read = read_video(tmp_path / "a.gif")
    assert read.shape == (4, 20, 30, 3) and read.dtype == np.uint8
    assert np.abs(read[:, 0, 0, 0].astype(int) - [0, 40, 80, 120]).max() <= 2
    assert sorted(read_video_frames(tmp_path / "a.gif", [3, 1])) == [1, 3]


def test_a_folder_or_a_fifo_is_refused_without_opening_it(tmp_path):
    with pytest.raises(VideoReadError, match="is a folder, not a video file"):
        read_video(tmp_path)
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block until someone writes
    with pytest.raises(VideoReadError, match="named pipe"):
        read_video(tmp_path / "pipe.mp4")
    with pytest.raises(VideoReadError, match="named pipe"):
        video_frame_count(tmp_path / "pipe.mp4")
    with pytest.raises(VideoReadError, match="no such video file"):
        read_video(tmp_path / "missing.mp4")


def test_the_size_check_runs_before_decoding(good):
    path, _ = good

    def refuse(width, height):
        raise VideoReadError(f"{width}x{height} refused")

    with pytest.raises(VideoReadError, match="48x32 refused"):
        read_video_frames(path, [0], check_size=refuse)
