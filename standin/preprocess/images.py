"""Reading reference photos of any common kind into RGB, refusing what face code cannot take safely.

Every image is checked against the size limits of `standin.faces.base.image_size_problem` (at most 16384 px
on a side, aspect ratio at most 20:1) before any face detector sees it: dlib crashes the process on thin
strips. Files are checked to be regular files before opening (a FIFO would block forever), and their
size is read from the header before the pixels are decoded.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from standin.faces.base import image_size_problem
from standin.io import regular_file_problem


class ImageLoadError(ValueError):
    """The input is not a usable image: missing, unreadable, truncated, not an image, or an unusable array."""


def load_image(image) -> Image.Image:
    """A path, PIL image or numpy array -> PIL RGB image, upright (EXIF orientation applied).

    Handles grayscale, palette, RGBA/LA (composited on white, the reference background), CMYK, 16-bit and
    float images. Raises ImageLoadError with the reason for anything that is not a readable image, or whose
    size face detection cannot take (see `check_image_size`).
    """
    if isinstance(image, (str, os.PathLike)):
        return _load_path(Path(image))
    if isinstance(image, Image.Image):
        check_image_size(*image.size)
        return _to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            check_image_size(image.shape[1], image.shape[0])
        return _array_to_rgb(image)
    raise ImageLoadError(f"expected a file path, PIL image or numpy array, got {type(image).__name__}")


def check_image_size(width: int, height: int, where: str = "") -> None:
    """ImageLoadError naming the size and the limit when face code cannot take a width x height image."""
    problem = image_size_problem(width, height)
    if problem:
        raise ImageLoadError(f"{where}{problem}")


def _load_path(path: Path) -> Image.Image:
    problem = regular_file_problem(path, "file")
    if problem == "is a folder, not a file":
        problem = "is a folder, not an image file"
    if problem:
        raise ImageLoadError(f"{path}: {problem}")
    try:
        with Image.open(path) as opened:
            check_image_size(*opened.size)  # from the header: refuse before decoding the pixels
            opened.load()  # decode now: truncated files fail here, not later
            return _to_rgb(ImageOps.exif_transpose(opened))
    except ImageLoadError as e:
        raise ImageLoadError(f"{path}: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: image too large to load safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated", "broken data stream")
        raise ImageLoadError(f"{path}: cannot decode image, the file is truncated or corrupt ({e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(image))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"image array is empty: {array.shape}")
    array = _to_uint8(array)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.shape[2] == 4:
        return _to_rgb(Image.fromarray(array, "RGBA"))
    return Image.fromarray(array, "RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError("image array contains NaN or infinite values")
        # floats are taken as [0, 1], the convention of skimage and torchvision
        return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        # 32-bit integer images (Pillow mode "I", e.g. some 16-bit PNGs): 0..65535 is the usual range
        top = 65535.0 if array.max() > 255 else 255.0
        return (np.clip(array, 0, top).astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    raise ImageLoadError(f"unsupported image array dtype {array.dtype}")
