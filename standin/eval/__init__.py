"""Identity and motion metrics for generated videos (docs/method.md section 9): FaceSim, face rate, copy-paste, motion.

The names below load on first use (PEP 562), so that importing standin.eval.cli to build the command line does
not import cv2."""

import importlib

_WHERE = {
    **dict.fromkeys(["BatchResult", "Pair", "evaluate_pairs", "find_pairs", "format_table", "read_pairs_csv"], "batch"),
    **dict.fromkeys(["NoFaceError", "VideoScores", "copy_paste", "evaluate_video", "frame_embeddings",
                     "identity_scores", "motion_amplitude", "reference_embedding", "video_face_similarity"], "metrics"),
    **dict.fromkeys(["VideoReadError", "frame_count", "read_frames", "uniform_indices"], "frames"),
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
