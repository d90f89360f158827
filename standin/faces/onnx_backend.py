"""insightface models through onnxruntime: SCRFD detection and ArcFace-style recognition.

Optional: needs `pip install onnxruntime` and model files the user already has (e.g. the antelopev2 pack the
published Stand-In preprocessing used, or a CurricularFace ONNX export for the published FaceSim protocol).
Nothing here downloads anything.
"""

from pathlib import Path

import cv2
import numpy as np

from standin.faces.align import align_face
from standin.faces.base import Face, FaceModelError

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS_PER_CELL = 2


def _session(path: Path):
    try:
        import onnxruntime
    except ImportError as e:
        raise FaceModelError(f"{path.name} is an ONNX model: pip install onnxruntime to use it") from e
    if not path.is_file():
        raise FaceModelError(f"{path}: no such ONNX model file")
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime has its own exception types for files that are not models
        raise FaceModelError(f"{path}: not a loadable ONNX model ({e})") from None


class ArcFaceRecognizer:
    """ONNX face recogniser on 112x112 RGB crops aligned by five landmarks, pixels mapped to [-1, 1].

    input_mean / input_std: (pixel - mean) / std, 127.5 / 127.5 for insightface's ArcFace packs and the usual
    CurricularFace exports; a model that normalises inside its own graph wants 0 / 1.
    """

    def __init__(self, path, input_mean: float = 127.5, input_std: float = 127.5):
        self.path = Path(path)
        self._session = _session(self.path)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        size = model_input.shape[2:4]
        if any(isinstance(s, int) and s != 112 for s in size):
            raise FaceModelError(f"{self.path}: expected a 112x112 recogniser, input shape is {model_input.shape}")
        self.input_mean, self.input_std = input_mean, input_std

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        if face.landmarks is None:
            raise ValueError("ArcFace-style embedding needs the face's five landmarks for alignment")
        crop = align_face(image, face.landmarks, 112).astype(np.float32)
        blob = ((crop - self.input_mean) / self.input_std).transpose(2, 0, 1)[None]
        vector = np.asarray(self._session.run(None, {self._input_name: blob})[0], dtype=np.float32).reshape(-1)
        return vector / np.linalg.norm(vector)


class ScrfdDetector:
    """SCRFD face detector (insightface's det_10g / scrfd_10g_bnkps) with five keypoints."""

    def __init__(self, path, input_size: int = 640, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        self.path = Path(path)
        self._session = _session(self.path)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        fixed = model_input.shape[2:4]
        # exports with a fixed input size must get exactly that size
        self.input_size = tuple(fixed) if all(isinstance(s, int) for s in fixed) else (input_size, input_size)
        outputs = len(self._session.get_outputs())
        if outputs not in (6, 9):
            raise FaceModelError(f"{self.path}: not an SCRFD detector (expected 6 or 9 outputs, got {outputs})")
        self._has_keypoints = outputs == 9
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    def detect(self, image: np.ndarray) -> list[Face]:
        input_h, input_w = self.input_size
        h, w = image.shape[:2]
        # letterbox: keep the aspect ratio, image in the top-left corner, black elsewhere
        scale = min(input_w / w, input_h / h)
        canvas = np.zeros((input_h, input_w, 3), dtype=np.float32)
        resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))))
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self._session.run(None, {self._input_name: np.ascontiguousarray(blob)})
        boxes, scores, keypoints = decode_scrfd(outputs, (input_h, input_w), self.score_threshold, self._has_keypoints)
        keep = nms(boxes, scores, self.nms_threshold)
        faces = []
        for i in keep:
            x0, y0, x1, y1 = boxes[i] / scale
            box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
            landmarks = keypoints[i] / scale if keypoints is not None else None
            faces.append(Face(box=tuple(float(v) for v in box), score=float(scores[i]), landmarks=landmarks))
        return faces


def decode_scrfd(outputs, input_size, score_threshold: float, has_keypoints: bool):
    """SCRFD raw outputs -> boxes [N, 4], scores [N], keypoints [N, 5, 2] (or None), in input pixels.

    Outputs come as scores for strides 8, 16, 32, then box distances, then keypoint offsets, all in units of
    the stride; each grid cell has two anchors centred on it.
    """
    input_h, input_w = input_size
    levels = len(SCRFD_STRIDES)
    all_boxes, all_scores, all_keypoints = [], [], []
    for level, stride in enumerate(SCRFD_STRIDES):
        ys, xs = np.mgrid[: input_h // stride, : input_w // stride]
        centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, SCRFD_ANCHORS_PER_CELL, axis=0)
        scores = np.asarray(outputs[level]).reshape(-1)
        distances = np.asarray(outputs[levels + level]).reshape(-1, 4) * stride
        if len(scores) != len(centres):
            raise FaceModelError(f"SCRFD output for stride {stride} has {len(scores)} anchors, expected {len(centres)}")
        keep = scores >= score_threshold
        c = centres[keep].astype(np.float32)
        d = distances[keep]
        all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
        all_scores.append(scores[keep])
        if has_keypoints:
            offsets = np.asarray(outputs[2 * levels + level]).reshape(-1, 5, 2)[keep] * stride
            all_keypoints.append(c[:, None, :] + offsets)
    keypoints = np.concatenate(all_keypoints).astype(np.float32) if has_keypoints else None
    return np.concatenate(all_boxes), np.concatenate(all_scores), keypoints


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices of kept boxes, best score first."""
    order = list(np.argsort(-scores))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order:
        best, rest = order[0], np.array(order[1:], dtype=int)
        keep.append(int(best))
        if not len(rest):
            break
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        overlap = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        iou = overlap / (areas[best] + areas[rest] - overlap)
        order = list(rest[iou <= iou_threshold])
    return keep


class InsightFaceBackend:
    """FaceBackend from ONNX models: SCRFD (or dlib) detection + ArcFace-style recognition.

    recognizer: path to a 112x112 recogniser .onnx (glintr100 of antelopev2, w600k_r50 of buffalo_l,
        a CurricularFace export, ...).
    detector: path to an SCRFD .onnx, or None to detect with the offline dlib backend (its five landmarks
        feed the same alignment).
    """

    def __init__(self, recognizer, detector=None):
        self._recognizer = ArcFaceRecognizer(recognizer)
        if detector is None:
            from standin.faces.dlib_backend import DlibBackend

            self._detector = DlibBackend()
        else:
            self._detector = ScrfdDetector(detector)
        detected_by = "dlib" if detector is None else Path(detector).stem
        self.name = f"{Path(recognizer).stem}+{detected_by}"

    @classmethod
    def from_folder(cls, folder) -> "InsightFaceBackend":
        """An insightface model pack folder: picks the SCRFD detector and the 112x112 recogniser in it."""
        folder = Path(folder)
        detector = recognizer = None
        for path in sorted(folder.glob("*.onnx")):
            session = _session(path)
            shape = session.get_inputs()[0].shape
            if len(session.get_outputs()) in (6, 9) and detector is None:
                detector = path
            elif len(shape) == 4 and shape[2:4] == [112, 112] and recognizer is None:
                recognizer = path
        if recognizer is None or detector is None:
            raise FaceModelError(
                f"{folder}: expected an insightface model folder with an SCRFD detector and a 112x112 recogniser "
                f"(.onnx); found detector={detector and detector.name}, recognizer={recognizer and recognizer.name}"
            )
        return cls(recognizer=recognizer, detector=detector)

    def detect(self, image: np.ndarray) -> list[Face]:
        return self._detector.detect(image)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self._recognizer.embed(image, face)
