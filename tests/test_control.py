"""`standin control VIDEO --pose`: a pose control video from an ordinary video, with MediaPipe's bundled Pose
model (offline), on a real photo of a person (scikit-image's astronaut: head and shoulders).

MediaPipe (the [pose] extra) asks numpy<2, so the README's test command, which tests the numpy 2 stack users get,
does not install it and skips the tests that run it; CI runs this file again with `pip install -e ".[test,pose]"`
and fails on any skip (.ci/run)."""

import importlib.util
import json
import sys

import numpy as np
import PIL.Image
import pytest

from standin.cli import main
from standin.control import COLOURS, PoseError, pose_video
from standin.video import read_video, save_video

needs_mediapipe = pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None,
                                     reason="MediaPipe (the [pose] extra) is not installed")


@pytest.fixture(scope="module")
def person():
    """Five 192x192 frames of a person drifting to the right by 4 px a frame."""
    from skimage import data

    photo = np.asarray(PIL.Image.fromarray(data.astronaut()).resize((192, 192), PIL.Image.BICUBIC))
    return np.stack([np.roll(photo, 4 * k, axis=1) for k in range(5)])


def joint(pose: np.ndarray, index: int) -> np.ndarray:
    """(x, y) centre of the pixels of keypoint `index`'s exact colour (the joints are drawn in full colour)."""
    ys, xs = np.nonzero(np.all(pose == COLOURS[index], axis=-1))
    assert len(xs), f"keypoint {index} not drawn"
    return np.array([xs.mean(), ys.mean()])


@needs_mediapipe
def test_keypoints_land_on_the_person_in_openpose_order(person):
    poses, found = pose_video(person)
    assert found == len(person) and poses.shape == person.shape
    size = person.shape[2]
    # Where MediaPipe finds them on this photo: the nose at (0.44, 0.25) of the frame; the person's right
    # shoulder (OpenPose keypoint 2) on the image's left at (0.22, 0.47), the left one (5) at (0.60, 0.50).
    for index, expected in ((0, (0.44, 0.25)), (2, (0.22, 0.47)), (5, (0.60, 0.50))):
        assert np.abs(joint(poses[0], index) / size - expected).max() < 0.06, index
    # The skeleton follows the person: 16 px to the right after four frames.
    assert abs((joint(poses[4], 0) - joint(poses[0], 0))[0] - 16) < 4
    assert (poses[0] == 0).all(axis=-1).mean() > 0.8  # on black


@needs_mediapipe
def test_control_command_writes_the_pose_video(person, tmp_path, capsys):
    save_video(person, tmp_path / "person.mp4", fps=12, generated=False)
    assert main(["control", str(tmp_path / "person.mp4"), "--pose", "-o", str(tmp_path / "pose.mp4")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["frames"] == 5 and report["frames_with_a_person"] == 5 and report["fps"] == 12
    written = read_video(tmp_path / "pose.mp4")
    assert written.shape == person.shape and written.max() > 100


@pytest.mark.parametrize("make, arguments, message", [
    pytest.param("blank", ["--pose"], "no person found in any of its 5 frames", marks=needs_mediapipe),
    ("broken", ["--pose"], "not"),
    ("blank", [], "--pose"),
])
def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, capsys, make, arguments, message):
    video = tmp_path / "in.mp4"
    if make == "blank":
        save_video(np.full((5, 64, 64, 3), 40, np.uint8), video, fps=8, generated=False)
    else:
        video.write_text("not a video")
    before = set(tmp_path.iterdir())
    assert main(["control", str(video), *arguments, "-o", str(tmp_path / "pose.mp4")]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and message in errors[0]
    assert set(tmp_path.iterdir()) == before


def test_without_mediapipe_the_error_says_what_to_install(monkeypatch, person):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(PoseError, match=r"standin\[pose\]"):
        pose_video(person)
