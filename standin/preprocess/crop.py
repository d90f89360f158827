"""Square face crop with white padding (docs/method.md section 6), keeping track of where the source pixels land."""

from dataclasses import dataclass

import numpy as np

WHITE = 255


@dataclass
class SquareCrop:
    """A square RGB uint8 image cut from a source image, padded with white where the source ran out."""

    image: np.ndarray
    # source pixel (x, y) sits at (x + shift[0], y + shift[1]) in `image`
    shift: tuple[int, int]
    # x0, y0, x1, y1 of the non-padding part of `image`
    content: tuple[int, int, int, int]

    def map_box(self, box, scale: float = 1.0) -> tuple[float, float, float, float]:
        """A box in source coordinates -> the same box in `image`, then multiplied by `scale`."""
        sx, sy = self.shift
        x0, y0, x1, y1 = box
        return ((x0 + sx) * scale, (y0 + sy) * scale, (x1 + sx) * scale, (y1 + sy) * scale)


def pad_to_square(image: np.ndarray) -> SquareCrop:
    """Pad with white on both sides of the shorter dimension (the extra pixel, if odd, after)."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.full((side, side, 3), WHITE, dtype=np.uint8)
    square[top : top + h, left : left + w] = image
    return SquareCrop(square, shift=(left, top), content=(left, top, left + w, top + h))


def face_crop(image: np.ndarray, box, scale: float = 1.5) -> SquareCrop:
    """Square window of side `scale` x the longer box side, centred on the box, clipped to the image, padded.

    Integer arithmetic and centred padding of the clipped window follow the published preprocessing, so that
    references match what the released checkpoints were trained with.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    half = int(max(x1 - x0, y1 - y0) * scale) // 2
    left, top = max(cx - half, 0), max(cy - half, 0)
    right, bottom = min(cx + half, w), min(cy + half, h)
    padded = pad_to_square(image[top:bottom, left:right])
    px, py = padded.shift
    return SquareCrop(padded.image, shift=(px - left, py - top), content=padded.content)


def touches_all_borders(box, width: int, height: int, tolerance: float) -> bool:
    """True when the box reaches within `tolerance` pixels of all four image borders (the photo is a face crop)."""
    x0, y0, x1, y1 = box
    return x0 <= tolerance and y0 <= tolerance and x1 >= width - tolerance and y1 >= height - tolerance
