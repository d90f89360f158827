"""Reference photo -> 512x512 face crop on white, as docs/method.md section 6 describes."""

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from standin.faces import Face, FaceBackend, get_backend, largest_face
from standin.preprocess.background import ParsingModel, grabcut_person_mask
from standin.preprocess.crop import SquareCrop, face_crop, pad_to_square, touches_all_borders
from standin.preprocess.images import load_image

# A box within 10 px of a border touches it, as in the published preprocessing. That code falls back to the
# whole image when ANY border is touched; docs/method.md section 6 says all four, which is what we do: a face cut by one
# image edge is still cropped, only a photo that is already a face crop is taken whole.
BORDER_TOLERANCE = 10
# Output sides accepted: the pipeline uses 512; 4096 (48 MiB of RGB) is far above any use, and the check comes
# before anything is allocated (a --size of 200000 would otherwise ask for 120 GB).
MIN_OUTPUT_SIZE = 16
MAX_OUTPUT_SIZE = 4096


@dataclass
class PreprocessResult:
    image: Image.Image  # RGB, size x size
    face: Face | None  # the face that was cropped, in source-image pixels (None on the whole-image fallback)
    num_faces: int  # faces the backend detected in the source image
    fallback_reason: str | None  # why the whole image was used instead of a face crop, else None
    background: str  # how the background was removed: "grabcut", "parsing", "kept"

    def describe(self) -> str:
        """One line for people: what was chosen and why."""
        if self.face is None:
            return f"whole image padded to a square: {self.fallback_reason}"
        x0, y0, x1, y1 = (round(v) for v in self.face.box)
        chosen = "the only face" if self.num_faces == 1 else f"the largest of {self.num_faces} faces"
        return f"cropped {chosen}, box ({x0}, {y0}, {x1}, {y1}), background: {self.background}"


def preprocess_reference(
    image,
    *,
    backend: FaceBackend | str | None = None,
    size: int = 512,
    background: str | ParsingModel | None = "grabcut",
    crop_scale: float = 1.5,
) -> PreprocessResult:
    """Crop the largest face (1.5x square, white padding), resize with area interpolation, whiten the background.

    image: path, PIL image or numpy array (see `load_image`; bad input raises ImageLoadError).
    backend: a FaceBackend, a name or path for `standin.faces.get_backend`, or None for the offline dlib default.
    background:
        "grabcut"   - offline default: GrabCut seeded from the detected face (see background.py);
        a path or ParsingModel - a face-parsing network, as in the published preprocessing (pass a loaded
                    ParsingModel to reuse it across calls);
        None or "keep" - leave the background as it is.
    With no face, or a face box touching all four borders (the photo is already a face crop), the whole
    image is padded to a square instead. A parsing model then still runs on it (as published); GrabCut,
    which needs a face to seed it, leaves such images untouched.
    """
    if not MIN_OUTPUT_SIZE <= size <= MAX_OUTPUT_SIZE:
        raise ValueError(f"output size must be {MIN_OUTPUT_SIZE} to {MAX_OUTPUT_SIZE} pixels, got {size}")
    source = np.asarray(load_image(image))  # bad input fails here, before any model loads
    height, width = source.shape[:2]
    backend = get_backend(backend)
    remover = _background_remover(background)

    faces = backend.detect(source)
    face = largest_face(faces)
    fallback_reason = None
    if face is None:
        fallback_reason = "no face found"
    elif touches_all_borders(face.box, width, height, BORDER_TOLERANCE):
        fallback_reason = "the face box touches all four borders (the photo is already a face crop)"
        face = None
    square: SquareCrop = pad_to_square(source) if face is None else face_crop(source, face.box, crop_scale)

    scale = size / square.image.shape[0]
    resized = cv2.resize(square.image, (size, size), interpolation=cv2.INTER_AREA)

    method = "kept"
    if isinstance(remover, ParsingModel):
        resized = np.where(remover.person_mask(resized)[..., None], resized, 255).astype(np.uint8)
        method = "parsing"
    elif remover == "grabcut" and face is not None:
        content = tuple(v * scale for v in square.content)
        mask = grabcut_person_mask(resized, square.map_box(face.box, scale), content)
        resized = np.where(mask[..., None], resized, 255).astype(np.uint8)
        method = "grabcut"
    return PreprocessResult(
        image=Image.fromarray(resized, "RGB"),
        face=face,
        num_faces=len(faces),
        fallback_reason=fallback_reason,
        background=method,
    )


def _background_remover(background):
    if background is None or background == "keep":
        return None
    if background == "grabcut" or isinstance(background, ParsingModel):
        return background
    return ParsingModel.load(background)
