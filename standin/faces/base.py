"""The interface every face backend implements (dlib, insightface, the mini world's own model).

Preprocessing and the identity metrics only talk to this interface, so that the same FaceSim code path
measures real videos (real face recogniser) and mini-world videos (the mini world's identity model).
"""

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Face:
    """One detected face in an RGB uint8 image of shape [H, W, 3]."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float = 1.0
    # five points (left eye, right eye, nose, left mouth corner, right mouth corner) as [5, 2] x, y; may be None
    landmarks: np.ndarray | None = field(default=None, repr=False)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def largest_face(faces: list[Face]) -> Face | None:
    """The face with the largest box area (ties: the higher score), or None for an empty list."""
    return max(faces, key=lambda f: (f.area, f.score), default=None)


# Pixel sizes face code accepts. Face detectors rescale images (dlib's backend to a longer side of 400-1280
# px), and dlib's CNN detector corrupts memory and kills the process (double free, rc 134) when the short side
# of what it sees is 8 px or less, e.g. a 4000x20 photo. With the aspect ratio capped at 20, the short side
# after that rescaling is at least 20 px. The side cap bounds what padding to a square may allocate.
MAX_IMAGE_SIDE = 16384
MAX_ASPECT_RATIO = 20


def image_size_problem(width: int, height: int) -> str | None:
    """Why an image of width x height pixels cannot go to face detection, or None if it can."""
    if width < 1 or height < 1:
        return f"the image is empty ({width}x{height} px)"
    if max(width, height) > MAX_IMAGE_SIDE:
        return f"the image is {width}x{height} px, larger than the limit of {MAX_IMAGE_SIDE} px on a side"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (
            f"the image is {width}x{height} px, an aspect ratio of {ratio:.0f}:1; at most {MAX_ASPECT_RATIO}:1 "
            "is accepted (face detectors fail on such strips)"
        )
    return None


class FaceModelError(RuntimeError):
    """A face model cannot be used: optional package missing, weights file absent or not a model."""


class FaceBackend(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image [H, W, 3], any order."""
        ...

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """L2-normalised identity embedding (float32 vector) of `face` inside `image`."""
        ...
