"""Offloading (the path for small GPUs) keeps the video: the reference stream runs where the hooks bring weights.

Group offloading to disk is used on CPU because it makes a missed onload visible: an offloaded group's tensors are
left uninitialised (torch.empty_like) until its hook onloads them, so any computation that bypasses the hooks
reads garbage instead of failing silently on the same device.

Equal up to float rounding, not to the bit: the hooks onload weights read back from a file, at other addresses than
the originals, and BLAS kernels may sum in another order for differently aligned data (seen on one machine: 3e-6 in
the output of a generation with a reference, where the batch-1 timestep-0 modulation runs a matrix-vector product;
0 on others). A missed onload reads uninitialised memory: differences of order 1, or NaN.
"""

import pytest
from conftest import reference_image, relative_error, run

from standin.tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-5  # relative; rounding differences are ~1e-6, a missed onload is ~1


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
    assert relative_error(got, expected) <= TOLERANCE
