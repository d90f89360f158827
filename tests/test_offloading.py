"""Offloading (the path for small GPUs) keeps the video: the reference stream runs where the hooks bring weights.

Group offloading to disk is used on CPU because it makes a missed onload visible: an offloaded group's tensors are
left uninitialised (torch.empty_like) until its hook onloads them, so any computation that bypasses the hooks
reads garbage instead of failing silently on the same device.
"""

import pytest
import torch
from test_pipeline import reference_image, run

from standin.models import StandInTransformer, video_grid
from standin.tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def offloaded_pipeline(tmp_path, offload_type):
    pipe = tiny_pipeline()
    pipe.transformer.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type=offload_type,
                                          offload_to_disk_path=str(tmp_path), num_blocks_per_group=1)
    return pipe


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("cache_reference", [True, False])
def test_group_offloaded_transformer_generates_the_same_video(tmp_path, offload_type, cache_reference):
    reference = reference_image()
    expected = run(tiny_pipeline(), reference, cache_reference=cache_reference)
    got = run(offloaded_pipeline(tmp_path, offload_type), reference, cache_reference=cache_reference)
    assert torch.equal(got, expected)


def test_standalone_reference_encoding_refuses_group_offloading(tmp_path):
    pipe = offloaded_pipeline(tmp_path, "block_level")
    model = StandInTransformer(pipe.transformer, pipe.adapters["transformer"])
    latents = torch.zeros(1, 16, 1, 4, 4)
    with pytest.raises(RuntimeError, match="group offloading"):
        model.encode_reference(latents, video_grid(pipe.transformer, (1, 16, 2, 4, 4)))
