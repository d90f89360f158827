"""Identity and motion metrics on real faces (scikit-image's astronaut and cameraman, matplotlib's Grace
Hopper) and on videos made here, plus the arithmetic of FaceSim and the copy-paste score on a toy backend."""

import io

import imageio.v2 as imageio
import numpy as np
import pytest
import skimage.data
from PIL import Image

from standin.eval import (
    copy_paste,
    evaluate_video,
    identity_scores,
    motion_amplitude,
    reference_embedding,
    video_face_similarity,
)
from standin.faces import Face, get_backend

BACKEND = "dlib-hog"


def grace_hopper() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    return np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS))


def astronaut_frames(count: int = 12, size=(200, 160), moving: bool = True) -> list[np.ndarray]:
    """The astronaut's head and shoulders drifting right and growing over white: a stand-in generated clip."""
    astronaut = skimage.data.astronaut()[:320, 60:400]
    frames = []
    for t in range(count):
        scale = 0.45 + (0.1 * t / count if moving else 0.0)
        person = resized(astronaut, scale)
        frame = np.full((size[1], size[0], 3), 255, np.uint8)
        x = 10 + (3 * t if moving else 0)
        frame[: min(size[1], person.shape[0]), x : x + person.shape[1]] = person[: size[1], : size[0] - x]
        frames.append(frame)
    return frames


def write_video(path, frames, fps: int = 25):
    with imageio.get_writer(str(path), fps=fps, macro_block_size=1, quality=8) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


@pytest.fixture(scope="module")
def astronaut_embedding():
    return reference_embedding(skimage.data.astronaut(), BACKEND)


def embedding_of(image: np.ndarray, backend=BACKEND) -> np.ndarray:
    return reference_embedding(image, backend)


def test_same_person_scores_clearly_higher_than_another_person(astronaut_embedding):
    astronaut = skimage.data.astronaut()
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, format="JPEG", quality=30)
    same_person = {
        "mirrored": np.ascontiguousarray(astronaut[:, ::-1]),
        "cropped": astronaut[40:300, 100:360],
        "half size": resized(astronaut, 0.5),
        "double size": resized(astronaut, 2.0),
        "grayscale": np.repeat(np.asarray(Image.fromarray(astronaut).convert("L"))[..., None], 3, 2),
        "jpeg q30": np.asarray(Image.open(buffer).convert("RGB")),
    }
    same = {name: float(astronaut_embedding @ embedding_of(image)) for name, image in same_person.items()}
    # the cameraman looks aside: only dlib's CNN detector (the "dlib" default's fallback) finds him
    cameraman = float(
        astronaut_embedding @ embedding_of(np.asarray(Image.fromarray(skimage.data.camera()).convert("RGB")), "dlib")
    )
    assert min(same.values()) > 0.97, same
    assert cameraman < 0.9
    assert min(same.values()) - cameraman > 0.07


def test_grace_hopper_is_not_the_astronaut(astronaut_embedding):
    grace = embedding_of(grace_hopper())
    assert float(astronaut_embedding @ grace) < 0.92
    assert float(grace @ embedding_of(resized(grace_hopper(), 0.6))) > 0.97


def test_face_similarity_on_a_video(tmp_path):
    video = write_video(tmp_path / "clip.mp4", astronaut_frames())
    astronaut = video_face_similarity(video, skimage.data.astronaut(), backend=BACKEND, num_frames=6)
    assert astronaut["frames_sampled"] == 6 and astronaut["face_rate"] == 1.0
    assert astronaut["face_sim"] > 0.97
    grace = video_face_similarity(video, grace_hopper(), backend=BACKEND, num_frames=6)
    assert grace["face_sim"] < astronaut["face_sim"] - 0.05


def test_frames_without_a_face_count_in_the_rate_not_the_mean():
    frames = astronaut_frames(8)
    for t in range(0, 8, 2):
        frames[t] = np.full_like(frames[t], 200)  # blank frames: no face
    scores = video_face_similarity(np.stack(frames), skimage.data.astronaut(), backend=BACKEND, num_frames=8)
    assert scores["frames_sampled"] == 8 and scores["frames_with_face"] == 4
    assert scores["face_rate"] == 0.5
    assert scores["face_sim"] > 0.97


def test_evaluate_video_reports_every_metric(tmp_path):
    video = write_video(tmp_path / "clip.mp4", astronaut_frames())
    scores = evaluate_video(video, skimage.data.astronaut(), backend=BACKEND, num_frames=4).to_dict()
    assert set(scores) == {
        "face_sim",
        "face_rate",
        "frames_sampled",
        "frames_with_face",
        "inter_frame_sim",
        "copy_paste_score",
        "motion",
        "backend",
    }
    assert scores["backend"] == "dlib-hog" and scores["frames_sampled"] == 4
    # the clip is the reference photo itself, moved and scaled: as close to the photo as to its own frames
    assert scores["copy_paste_score"] > -0.03
    assert scores["motion"] > 0.3


def sliding_window(step: int, count: int = 6, size=(320, 240), zoom: float = 1.0) -> np.ndarray:
    """A window sliding right over a photo of grass by `step` pixels per frame: pure translation, known flow.
    (Grass is textured everywhere; on flat areas optical flow sees no motion, so real photos read lower.)"""
    photo = resized(np.repeat(skimage.data.grass()[..., None], 3, 2), zoom)
    w, h = size
    return np.stack([photo[40 : 40 + h, 20 + step * t : 20 + step * t + w] for t in range(count)])


def test_motion_amplitude_is_in_percent_of_the_diagonal_per_frame():
    # 2 px per frame in a 320x240 frame (diagonal 400): 0.5 % of the diagonal per frame
    small = motion_amplitude(sliding_window(2), num_pairs=3)
    assert abs(small - 0.5) < 0.03
    assert abs(motion_amplitude(sliding_window(6), num_pairs=3) - 1.5) < 0.08
    # the same motion at twice the resolution reads the same
    large = motion_amplitude(sliding_window(4, size=(640, 480), zoom=2.0), num_pairs=3)
    assert abs(large - small) < 0.03
    assert motion_amplitude(sliding_window(0), num_pairs=3) < 0.01
    assert motion_amplitude(sliding_window(0, count=1)) is None  # one frame: no motion to measure


def test_motion_of_a_moving_and_a_still_video_file(tmp_path):
    moving = write_video(tmp_path / "moving.mp4", astronaut_frames(10))
    still = write_video(tmp_path / "still.mp4", astronaut_frames(10, moving=False))
    assert motion_amplitude(moving, num_pairs=4) > 10 * motion_amplitude(still, num_pairs=4)


def test_identity_score_arithmetic():
    e = np.eye(3, dtype=np.float32)
    diagonal = np.array([1, 1, 0], np.float32) / np.sqrt(2)
    scores = identity_scores(e[0], [e[0], None, diagonal, None])
    assert scores["frames_sampled"] == 4 and scores["frames_with_face"] == 2 and scores["face_rate"] == 0.5
    assert scores["face_sim"] == pytest.approx((1 + 1 / np.sqrt(2)) / 2)
    assert scores["inter_frame_sim"] == pytest.approx(1 / np.sqrt(2))
    assert scores["copy_paste_score"] == pytest.approx(scores["face_sim"] - 1 / np.sqrt(2))
    nothing = identity_scores(e[0], [None, None])
    assert nothing["face_sim"] is None and nothing["face_rate"] == 0.0 and nothing["copy_paste_score"] is None


class ColourBackend:
    """A toy FaceBackend, like the mini world's own: a 'face' is any frame that is not black, its identity
    the direction of its mean colour."""

    name = "colour"

    def detect(self, image):
        return [] if image.max() == 0 else [Face(box=(0, 0, image.shape[1], image.shape[0]))]

    def embed(self, image, face):
        mean = image.reshape(-1, 3).mean(0).astype(np.float32)
        return mean / np.linalg.norm(mean)


def test_any_face_backend_plugs_into_the_metrics():
    red, green, black = (np.zeros((16, 16, 3), np.uint8) for _ in range(3))
    red[..., 0], green[..., 1] = 255, 255
    video = np.stack([red, green, black, red])
    scores = video_face_similarity(video, red, backend=ColourBackend(), num_frames=4)
    assert scores["face_rate"] == 0.75
    assert scores["face_sim"] == pytest.approx(2 / 3)  # cos 1, 0, 1 over the three frames with a face
    pasted = copy_paste(np.stack([red] * 4), red, backend=ColourBackend(), num_frames=4)
    assert pasted["copy_paste_score"] == pytest.approx(0.0)
    backend = ColourBackend()
    assert get_backend(backend) is backend
