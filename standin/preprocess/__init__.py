"""Reference photo preprocessing (SPEC section 6): face crop, white padding, 512x512, white background."""

from standin.preprocess.background import ParsingModel, grabcut_person_mask
from standin.preprocess.images import ImageLoadError, load_image
from standin.preprocess.reference import PreprocessResult, preprocess_reference

__all__ = [
    "ImageLoadError",
    "ParsingModel",
    "PreprocessResult",
    "grabcut_person_mask",
    "load_image",
    "preprocess_reference",
]
