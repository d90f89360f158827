"""Step 1 and 2 of the face swap (docs/swap.md): the face to paste, and the pasted video with its masks.

The reference face is the reference exactly as the model sees it (the preprocessed square crop on white), with an
alpha mask of the person: everything that is not the white background connected to the crop's border
(preprocessing paints the background pure white, by GrabCut or a parsing model; the mini world's references are
drawn that way; `reference_face(alpha=...)` takes another). The published code uses the parsing model's
non-background classes on the same crop. Its five landmarks come from the face backend.

In each frame the largest face's five landmarks place the reference by a similarity transform estimated robustly
(cv2.estimateAffinePartial2D, least median of squares, as published). A backend without landmarks (or a failed
estimate) falls back to the transform that maps the reference's face box onto the frame's: centres aligned, the
longer sides equal, no rotation. The face is alpha-blended with its warped alpha; the frame's mask is the warped
alpha, dilated and feathered by amounts proportional to the face's size in the frame (the published code uses
10 px and 21 px at 480p, where faces are ~150 px; it leaves the landmark path's mask undilated, we dilate both).
Frames without a face are left as they are, with an empty mask.
"""

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from standin.faces import Face, FaceBackend, get_backend, largest_face

# A pixel of the reference whose three channels are all at least this is white (background when connected to the
# border). Preprocessing writes 255; area resizing and anti-aliasing leave a few near-white pixels at the edge.
WHITE_LEVEL = 248
# Mask growth around the warped alpha, in units of the face's size in the frame (its box's longer side).
DILATION = 0.05
FEATHER = 0.08


class NoReferenceFaceError(ValueError):
    """The reference image has no detectable face: nothing to paste."""


class NoFaceInVideoError(ValueError):
    """No frame of the video has a detectable face: nothing to swap."""


@dataclass
class ReferenceFace:
    image: np.ndarray  # [S, S, 3] uint8 RGB, the reference as the model sees it
    alpha: np.ndarray  # [S, S] float32 in [0, 1]: the person
    face: Face  # its largest face (box, landmarks)


def person_alpha(image: np.ndarray, white_level: int = WHITE_LEVEL) -> np.ndarray:
    """[H, W] float32 alpha of a picture on a white background: 0 on the white pixels connected to the border,
    1 elsewhere (white inside the person, eyes or teeth, stays 1)."""
    white = (image >= white_level).all(axis=2).astype(np.uint8)
    count, labels = cv2.connectedComponents(white, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0]) & (white > 0)
    return (~background).astype(np.float32)


def reference_face(image, backend: FaceBackend | str | None = None, alpha: np.ndarray | None = None) -> ReferenceFace:
    """The face to paste from the reference as the model sees it (PIL image or RGB array). `alpha` ([H, W] in
    [0, 1]) overrides the white-background rule. NoReferenceFaceError when the backend finds no face."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the reference must be RGB uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    face = largest_face(get_backend(backend).detect(rgb))
    if face is None:
        raise NoReferenceFaceError("no face found in the reference: give a photo where the face is visible")
    alpha = person_alpha(rgb) if alpha is None else np.clip(np.asarray(alpha, dtype=np.float32), 0.0, 1.0)
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"the alpha mask is {list(alpha.shape)}, the reference {list(rgb.shape[:2])}")
    return ReferenceFace(image=rgb, alpha=alpha, face=face)


def box_transform(source_box, target_box) -> np.ndarray:
    """2x3 similarity without rotation: the source box's centre onto the target's, longer sides equal."""
    sx0, sy0, sx1, sy1 = (float(v) for v in source_box)
    tx0, ty0, tx1, ty1 = (float(v) for v in target_box)
    scale = max(tx1 - tx0, ty1 - ty0) / max(sx1 - sx0, sy1 - sy0, 1e-6)
    shift = np.array([(tx0 + tx1) / 2, (ty0 + ty1) / 2]) - scale * np.array([(sx0 + sx1) / 2, (sy0 + sy1) / 2])
    return np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])


def face_transform(reference: ReferenceFace, face: Face) -> np.ndarray:
    """2x3 similarity taking the reference face onto `face`: from the five landmarks when both have them
    (robust least median of squares), else from the boxes."""
    source, target = reference.face.landmarks, face.landmarks
    if source is not None and target is not None and len(source) == len(target) >= 2:
        matrix, _ = cv2.estimateAffinePartial2D(np.asarray(source, np.float32).reshape(-1, 1, 2),
                                                np.asarray(target, np.float32).reshape(-1, 1, 2), method=cv2.LMEDS)
        if matrix is not None and np.isfinite(matrix).all() and abs(np.linalg.det(matrix[:, :2])) > 1e-8:
            return matrix
    return box_transform(reference.face.box, face.box)


def grow_mask(alpha: np.ndarray, face_size: float, dilation: float = DILATION, feather: float = FEATHER) -> np.ndarray:
    """The warped alpha dilated by `dilation` x face_size (elliptic kernel), then feathered by a Gaussian of
    `feather` x face_size; float32 in [0, 1]."""
    mask = alpha.astype(np.float32)
    radius = int(round(dilation * face_size))
    if radius > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    blur = int(round(feather * face_size))
    if blur > 0:
        mask = cv2.GaussianBlur(mask, (2 * blur + 1, 2 * blur + 1), 0)
        mask = np.maximum(mask, alpha)  # feathering never uncovers what was pasted
    return np.clip(mask, 0.0, 1.0)


def paste_face(frame: np.ndarray, reference: ReferenceFace, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame with the reference warped by `matrix` alpha-blended on it, the grown mask)."""
    height, width = frame.shape[:2]
    warped = cv2.warpAffine(reference.image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    alpha = cv2.warpAffine(reference.alpha, matrix, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0.0, 1.0)
    pasted = frame.astype(np.float32) * (1.0 - alpha[..., None]) + warped.astype(np.float32) * alpha[..., None]
    x0, y0, x1, y1 = reference.face.box
    face_size = np.sqrt(abs(np.linalg.det(matrix[:, :2]))) * max(x1 - x0, y1 - y0)
    return np.clip(pasted + 0.5, 0, 255).astype(np.uint8), grow_mask(alpha, face_size)


@dataclass
class PastedVideo:
    frames: np.ndarray  # [F, H, W, 3] uint8, the reference face pasted where a face was found
    masks: np.ndarray  # [F, H, W] float32 in [0, 1], empty where no face was found
    faces: list  # the largest face of each frame, or None


def paste_video(frames: np.ndarray, reference: ReferenceFace, backend: FaceBackend | str | None = None,
                progress: Callable | None = None) -> PastedVideo:
    """Paste the reference face onto the largest face of every frame. NoFaceInVideoError when there is none in
    any frame. `progress(n)` is called after each frame."""
    backend = get_backend(backend)
    pasted, masks, faces = [], [], []
    for frame in frames:
        face = largest_face(backend.detect(frame))
        if face is None:
            pasted.append(frame)
            masks.append(np.zeros(frame.shape[:2], np.float32))
        else:
            image, mask = paste_face(frame, reference, face_transform(reference, face))
            pasted.append(image)
            masks.append(mask)
        faces.append(face)
        if progress is not None:
            progress(1)
    if all(face is None for face in faces):
        raise NoFaceInVideoError(f"no face found in any of the {len(frames)} frames of the video: nothing to swap")
    return PastedVideo(frames=np.stack(pasted), masks=np.stack(masks), faces=faces)


def crop_to_multiple(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred crop whose sides are multiples of `multiple` (as published)."""
    new_height, new_width = height // multiple * multiple, width // multiple * multiple
    if new_height == 0 or new_width == 0:
        raise ValueError(f"the video is {width}x{height} px: the model needs at least {multiple}x{multiple}")
    return (height - new_height) // 2, (width - new_width) // 2, new_height, new_width
