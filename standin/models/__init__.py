from standin.models.adapter import DEFAULT_RANK, StandInAdapter
from standin.models.reference import (
    ReferenceKV,
    encode_reference,
    install_reference_attention,
    joint_reference_context,
    reference_context,
    reference_rope,
    video_grid,
)
from standin.models.transformer import StandInTransformer, cast_like_pretrained

__all__ = [
    "DEFAULT_RANK",
    "ReferenceKV",
    "StandInAdapter",
    "StandInTransformer",
    "cast_like_pretrained",
    "encode_reference",
    "install_reference_attention",
    "joint_reference_context",
    "reference_context",
    "reference_rope",
    "video_grid",
]
