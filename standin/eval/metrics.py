"""Identity and motion metrics of a generated video against its reference photo.

FaceSim (docs/method.md section 9): cosine similarity between the reference face's embedding and the embedding of the
largest face in each of N uniformly sampled frames, averaged over the frames where a face was found. The
published number (0.724) uses CurricularFace; the offline default here is dlib's ResNet, whose cosines sit on
a different scale (different people are often 0.8-0.9, the same person above about 0.93; dlib's own
same-person rule, distance < 0.6, is near cosine 0.91). Compare numbers only within one backend.

Copy-paste check: a model that pastes the reference photo makes every frame's face look like the photo as
much as like the other frames. copy_paste_score = mean cos(reference, frame) - mean cos(frame_i, frame_j):
near zero or above means the frames are as close to the photo as to each other (pasted look); clearly
negative means the video has its own consistent appearance of the person (new pose, light, expression).

Motion amplitude: mean Farneback optical-flow magnitude between consecutive frames (frame i and i+1 at N
evenly spread positions), computed on grayscale frames downscaled to 256 px on the longer side, reported in
percent of the frame diagonal per frame, so that it does not depend on the resolution (1.0 = content moves
by 1% of the diagonal each frame, about 9.6 px per frame at 832x480). Frame rate is not taken into account.
"""

import os
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from standin.eval.frames import VideoReadError, frame_count, read_frames, uniform_indices
from standin.faces import FaceBackend, get_backend, largest_face
from standin.faces.base import image_size_problem
from standin.preprocess.images import load_image

DEFAULT_NUM_FRAMES = 32
MOTION_SIZE = 256  # longer side of the frames optical flow runs on


class NoFaceError(ValueError):
    """The reference image has no detectable face, so identity similarity is undefined."""


@dataclass
class VideoScores:
    face_sim: float | None  # mean cosine(reference, frame face) over sampled frames with a face
    face_rate: float  # fraction of sampled frames with a face
    frames_sampled: int
    frames_with_face: int
    inter_frame_sim: float | None  # mean cosine between faces of different sampled frames
    copy_paste_score: float | None  # face_sim - inter_frame_sim, see the module docstring
    motion: float | None  # percent of the frame diagonal per frame
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


def reference_embedding(reference, backend: FaceBackend | str | None = None) -> np.ndarray:
    """Embedding of the largest face in the reference image; NoFaceError when there is none."""
    backend = get_backend(backend)
    image = np.asarray(load_image(reference))
    face = largest_face(backend.detect(image))
    if face is None:
        where = f"{reference}: " if isinstance(reference, (str, os.PathLike)) else ""
        raise NoFaceError(f"{where}no face found in the reference image; FaceSim needs a face to compare with")
    return backend.embed(image, face)


def frame_embeddings(frames, backend: FaceBackend | str | None = None) -> list[np.ndarray | None]:
    """Embedding of the largest face in each RGB uint8 frame, None where no face is found."""
    backend = get_backend(backend)
    embeddings = []
    for index, frame in enumerate(frames):
        problem = image_size_problem(frame.shape[1], frame.shape[0]) if frame.ndim >= 2 else "not an image"
        if problem:  # checked here too: these frames may come from anywhere, and dlib crashes on thin strips
            raise VideoReadError(f"frame {index}: {problem}")
        face = largest_face(backend.detect(frame))
        embeddings.append(None if face is None else backend.embed(frame, face))
    return embeddings


def identity_scores(reference: np.ndarray, embeddings: list[np.ndarray | None]) -> dict:
    """FaceSim, face rate and the copy-paste numbers from a reference embedding and per-frame embeddings."""
    found = [e for e in embeddings if e is not None]
    face_sim = float(np.mean([reference @ e for e in found])) if found else None
    inter_frame_sim = None
    if len(found) >= 2:
        stacked = np.stack(found)
        similarity = stacked @ stacked.T
        inter_frame_sim = float(similarity[np.triu_indices(len(found), k=1)].mean())
    return {
        "face_sim": face_sim,
        "face_rate": len(found) / len(embeddings) if embeddings else 0.0,
        "frames_sampled": len(embeddings),
        "frames_with_face": len(found),
        "inter_frame_sim": inter_frame_sim,
        "copy_paste_score": None if inter_frame_sim is None else face_sim - inter_frame_sim,
    }


def video_face_similarity(video, reference, *, backend=None, num_frames: int = DEFAULT_NUM_FRAMES) -> dict:
    """FaceSim of `video` (path or frames, `num_frames` sampled uniformly) against the `reference` photo.

    Returns {face_sim, face_rate, frames_sampled, frames_with_face}; face_sim is None when no frame has a face.
    """
    scores = _identity(video, reference, backend, num_frames)
    return {k: scores[k] for k in ("face_sim", "face_rate", "frames_sampled", "frames_with_face")}


def copy_paste(video, reference, *, backend=None, num_frames: int = DEFAULT_NUM_FRAMES) -> dict:
    """{face_sim (to the reference), inter_frame_sim, copy_paste_score}; see the module docstring."""
    scores = _identity(video, reference, backend, num_frames)
    return {k: scores[k] for k in ("face_sim", "inter_frame_sim", "copy_paste_score")}


def motion_amplitude(video, *, num_pairs: int = DEFAULT_NUM_FRAMES) -> float | None:
    """Mean optical-flow magnitude in percent of the frame diagonal per frame (None for a one-frame video)."""
    starts = uniform_indices(frame_count(video) - 1, num_pairs)
    frames = read_frames(video, starts + [i + 1 for i in starts])
    return _motion(frames, starts)


def evaluate_video(video, reference, *, backend=None, num_frames: int = DEFAULT_NUM_FRAMES) -> VideoScores:
    """All metrics of one video in one decoding pass: FaceSim, face rate, copy-paste, motion amplitude."""
    backend = get_backend(backend)
    ref = reference_embedding(reference, backend)
    total = frame_count(video)
    sampled = uniform_indices(total, num_frames)
    starts = uniform_indices(total - 1, num_frames)
    frames = read_frames(video, sampled + starts + [i + 1 for i in starts])
    sampled = [i for i in sampled if i in frames]
    scores = identity_scores(ref, frame_embeddings([frames[i] for i in sampled], backend))
    return VideoScores(
        **scores, motion=_motion(frames, starts), backend=getattr(backend, "name", type(backend).__name__)
    )


def _identity(video, reference, backend, num_frames: int) -> dict:
    backend = get_backend(backend)
    ref = reference_embedding(reference, backend)
    frames = read_frames(video, uniform_indices(frame_count(video), num_frames))
    return identity_scores(ref, frame_embeddings(list(frames.values()), backend))


def _motion(frames: dict[int, np.ndarray], starts: list[int]) -> float | None:
    magnitudes = [_flow_magnitude(frames[i], frames[i + 1]) for i in starts if i in frames and i + 1 in frames]
    return float(np.mean(magnitudes)) if magnitudes else None


def _flow_magnitude(a: np.ndarray, b: np.ndarray) -> float:
    """Mean flow magnitude between two frames, in percent of the frame diagonal."""
    h, w = a.shape[:2]
    scale = min(1.0, MOTION_SIZE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray_a, gray_b = (
        cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in (a, b)
    )
    flow = cv2.calcOpticalFlowFarneback(gray_a, gray_b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    magnitude = np.linalg.norm(flow, axis=2).mean()
    return float(100.0 * magnitude / np.hypot(*size))
