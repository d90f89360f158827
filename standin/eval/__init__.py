"""Identity and motion metrics for generated videos (SPEC section 9): FaceSim, face rate, copy-paste, motion."""

from standin.eval.batch import BatchResult, Pair, evaluate_pairs, find_pairs, format_table, read_pairs_csv
from standin.eval.metrics import (
    NoFaceError,
    VideoScores,
    copy_paste,
    evaluate_video,
    frame_embeddings,
    identity_scores,
    motion_amplitude,
    reference_embedding,
    video_face_similarity,
)
from standin.eval.frames import VideoReadError, frame_count, read_frames, uniform_indices

__all__ = [
    "BatchResult",
    "NoFaceError",
    "Pair",
    "VideoReadError",
    "VideoScores",
    "copy_paste",
    "evaluate_pairs",
    "evaluate_video",
    "find_pairs",
    "format_table",
    "frame_count",
    "frame_embeddings",
    "identity_scores",
    "motion_amplitude",
    "read_frames",
    "read_pairs_csv",
    "reference_embedding",
    "uniform_indices",
    "video_face_similarity",
]
