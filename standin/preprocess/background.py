"""Person-versus-background masks for the reference crop.

Two ways:
- `grabcut_person_mask`: the offline default. No face-parsing weights ship on PyPI, so the person is
  segmented by GrabCut (colour models, graph cut) seeded from the detected face: the inner face and a neck
  strip are certain foreground, a head-with-hair ellipse and a shoulders trapezoid are probable foreground,
  white padding is certain background, the rest probable background.
- `ParsingModel`: a face-parsing network from a path the user gives (BiSeNet as used by the published
  preprocessing: ONNX, TorchScript, or facexlib's BiSeNet state dict). Class 0 is background; everything
  else (skin, hair, neck, clothes, hat...) is kept, as docs/method.md section 6 asks.
"""

from pathlib import Path

import cv2
import numpy as np

from standin.faces.base import FaceModelError
from standin.io import loader_error_reason, regular_file_problem

# BiSeNet face parsing was trained on ImageNet-normalised 512x512 RGB input
_PARSING_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_PARSING_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def grabcut_person_mask(image: np.ndarray, face_box, content=None, iterations: int = 5) -> np.ndarray:
    """Boolean [H, W] mask of the person (face, hair, neck, clothes) in an RGB uint8 head-and-shoulders crop.

    face_box: x0, y0, x1, y1 of the face in `image`; content: the non-padding rectangle (padding is background).
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = face_box
    fw, fh = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    mask = np.full((h, w), cv2.GC_PR_BGD, dtype=np.uint8)
    # probable person: head with hair (the face box of most detectors stops at the brows), and the shoulders
    # widening from the chin down to the bottom edge
    cv2.ellipse(mask, _pt(cx, y0 + 0.35 * fh), _pt(0.85 * fw, 1.0 * fh), 0, 0, 360, cv2.GC_PR_FGD, -1)
    shoulders = np.array(
        [
            _pt(cx - 0.55 * fw, y1 - 0.1 * fh),
            _pt(cx + 0.55 * fw, y1 - 0.1 * fh),
            _pt(cx + 1.6 * fw, h),
            _pt(cx - 1.6 * fw, h),
        ]
    )
    cv2.fillPoly(mask, [shoulders], cv2.GC_PR_FGD)
    # certainly person: the inner face and the neck right under the chin
    cv2.ellipse(mask, _pt(cx, cy), _pt(0.32 * fw, 0.42 * fh), 0, 0, 360, cv2.GC_FGD, -1)
    cv2.rectangle(mask, _pt(cx - 0.15 * fw, y1 - 0.05 * fh), _pt(cx + 0.15 * fw, y1 + 0.25 * fh), cv2.GC_FGD, -1)
    if content is not None:
        cx0, cy0, cx1, cy1 = (int(round(v)) for v in content)
        certain_background = np.ones((h, w), dtype=bool)
        certain_background[max(cy0, 0) : cy1, max(cx0, 0) : cx1] = False
        mask[certain_background] = cv2.GC_BGD

    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means initialisation draws from OpenCV's global RNG: same photo, same mask
    cv2.grabCut(image, mask, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK)
    person = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    return _keep_component_at(person, _pt(cx, cy))


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _keep_component_at(mask: np.ndarray, point) -> np.ndarray:
    """Keep the connected region containing `point` (the face) and fill its holes; drop stray blobs."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask
    x = min(max(point[0], 0), mask.shape[1] - 1)
    y = min(max(point[1], 0), mask.shape[0] - 1)
    region = labels == labels[y, x]
    # holes: background pieces that do not reach the image border
    count, pieces = cv2.connectedComponents((~region).astype(np.uint8), connectivity=4)
    outside = np.unique(np.concatenate([pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]]))
    return region | (~region & ~np.isin(pieces, outside))


class ParsingModel:
    """A face-parsing network: ImageNet-normalised 512x512 RGB -> per-pixel class logits, class 0 = background.

    Build it with `ParsingModel.load(path)`:
        *.onnx                       - run with onnxruntime (pip install onnxruntime);
        TorchScript archive          - torch.jit.load;
        BiSeNet state dict (*.pth)   - facexlib's BiSeNet(num_class=19), e.g. its parsing_bisenet.pth
                                       (pip install facexlib; the architecture comes from there).
    """

    INPUT_SIZE = 512

    def __init__(self, run, name: str):
        self._run = run  # float32 [1, 3, 512, 512] -> logits [1, C, h, w]
        self.name = name

    @classmethod
    def load(cls, path) -> "ParsingModel":
        path = Path(path)
        problem = regular_file_problem(path, "file")
        if problem:
            raise FaceModelError(f"face-parsing model {path}: {problem}")
        if path.suffix.lower() == ".onnx":
            return cls(_onnx_runner(path), path.name)
        return cls(_torch_runner(path), path.name)

    def person_mask(self, image: np.ndarray) -> np.ndarray:
        """Boolean [H, W]: True where the class is not background (skin, hair, neck, clothes, ...)."""
        h, w = image.shape[:2]
        size = self.INPUT_SIZE
        resized = image if (h, w) == (size, size) else cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        x = (resized.astype(np.float32) / 255.0 - _PARSING_MEAN) / _PARSING_STD
        logits = np.asarray(self._run(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
        if logits.ndim != 4 or logits.shape[0] != 1 or logits.shape[1] < 2:
            raise FaceModelError(
                f"face-parsing model {self.name}: expected logits [1, classes, H, W], got {logits.shape}"
            )
        labels = logits[0].argmax(0).astype(np.uint8)
        if labels.shape != (h, w):
            labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
        return labels != 0


def _onnx_runner(path: Path):
    try:
        import onnxruntime
    except ImportError as e:
        raise FaceModelError(f"{path.name} is an ONNX model: pip install onnxruntime to use it") from e
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for files that are not models
        raise FaceModelError(f"{path}: not a loadable ONNX model ({loader_error_reason(e)})") from None
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})[0]


def _torch_runner(path: Path):
    import torch

    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        model = _bisenet_from_state_dict(path)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        if isinstance(out, (tuple, list)):  # BiSeNet also returns its two auxiliary heads
            out = out[0]
        return out.float().numpy()

    return run


def _bisenet_from_state_dict(path: Path):
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for our users
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message would advise weights_only=False: never run an untrusted pickle
        raise FaceModelError(
            f"{path}: neither a TorchScript model nor a torch state dict of plain tensors ({loader_error_reason(e)}); "
            "pickles that need code to load are refused"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FaceModelError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    try:
        from facexlib.parsing.bisenet import BiSeNet
    except ImportError as e:
        raise FaceModelError(
            f"{path.name} is a state dict; the BiSeNet architecture comes from facexlib: pip install facexlib"
        ) from e
    model = BiSeNet(num_class=19)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise FaceModelError(f"{path}: not a facexlib BiSeNet (19 classes) state dict ({e})") from None
    return model
