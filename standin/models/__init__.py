from standin.models.adapter import DEFAULT_RANK, StandInAdapter
from standin.models.model import StandInModel, cast_like_pretrained
from standin.models.reference import (
    ReferenceStream,
    install_reference_attention,
    reference_rope,
    reference_stream,
    video_grid,
)

__all__ = [
    "DEFAULT_RANK",
    "ReferenceStream",
    "StandInAdapter",
    "StandInModel",
    "cast_like_pretrained",
    "install_reference_attention",
    "reference_rope",
    "reference_stream",
    "video_grid",
]
