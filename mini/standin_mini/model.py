"""The embedded mini model: a Stand-In pipeline of tiny Wan components trained on the mini world, shipped in the
package so that `standin generate` works offline, on a CPU, in seconds.

    weights/base/                      the frozen base, a diffusers StandInPipeline folder (train_base.py)
    weights/standin_adapter.safetensors  its Stand-In adapter (`standin train`)
"""

from pathlib import Path

import torch

from standin.loading import load_pipeline
from standin.pipeline import StandInPipeline

WEIGHTS = Path(__file__).parent / "weights"
MINI_WEIGHTS = WEIGHTS / "base"
MINI_ADAPTER = WEIGHTS / "standin_adapter.safetensors"
# What the mini model was trained on: 17 frames of 64x64 (latents 16 x 17 x 8 x 8; the VAE is frame-wise, so any
# frame count works); references are 64x64.
MINI_SIZES = dict(height=64, width=64, num_frames=17)
MINI_FPS = 8  # the world's actions span a clip: 17 frames play in two seconds
# The Euler shift the mini base is trained and sampled with (recorded in its model_index.json). Wan's 5 suits its
# ~30k tokens a clip; at 272 tokens a shift of 5 leaves the low noise levels, where faces get their features,
# almost untrained (as SD3 found, the right shift grows with resolution).
MINI_SHIFT = 2.0


def load_mini_pipeline(device=None, adapter: bool = True) -> StandInPipeline:
    """The mini pipeline in float32 on `device` (default CPU), with its Stand-In adapter unless adapter=False."""
    if not (MINI_WEIGHTS / "model_index.json").is_file():
        raise FileNotFoundError(f"the mini base model is missing from {MINI_WEIGHTS}: "
                                f"train it with `python -m standin_mini.train_base` (see its docstring)")
    if adapter and not MINI_ADAPTER.is_file():
        raise FileNotFoundError(f"the mini Stand-In adapter is not trained yet ({MINI_ADAPTER} is missing): "
                                f"train it with `standin train`, or load the base alone with adapter=False")
    return load_pipeline(MINI_WEIGHTS, adapter=MINI_ADAPTER if adapter else None, device=device or "cpu",
                         dtype=torch.float32)
