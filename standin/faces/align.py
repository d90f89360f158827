"""Five-point face alignment: the similarity warp ArcFace-style recognisers are trained on."""

import cv2
import numpy as np

# Where the five landmarks (left eye, right eye, nose tip, left and right mouth corner) sit in the 112x112
# crops that ArcFace, CurricularFace and the insightface recognisers were trained on.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the rotation + uniform scale + translation that maps `src` points closest to `dst`.

    Least squares in closed form (Umeyama, 1991): no reflection, exact for points related by a similarity.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    spread = (src_centred**2).sum(1).mean()
    if spread < 1e-12:
        raise ValueError("landmarks are all at one point; no transform can be estimated from them")
    covariance = dst_centred.T @ src_centred / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / spread
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The [size, size, 3] crop whose five landmarks land on the ArcFace template (scaled to `size`)."""
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE_112 * (size / 112.0))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
