"""Face detection, landmarks and identity embeddings behind one small interface."""

from standin.faces.base import Face, FaceBackend

__all__ = ["Face", "FaceBackend"]
