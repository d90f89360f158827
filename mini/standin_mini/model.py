"""The embedded mini model: a Stand-In pipeline of tiny Wan components trained on the mini world, shipped in the
package so that `standin generate` works offline, on a CPU, in seconds.

    weights/base/                      the frozen base, a diffusers StandInPipeline folder (train_base.py)
    weights/standin_adapter.safetensors  its Stand-In adapter (`standin train`)

standin finds it through the `standin.models` entry point `mini` (embedded_model), never by import.
"""

from standin_mini.settings import MINI_ADAPTER, MINI_FPS, MINI_SIZES, MINI_WEIGHTS, WEIGHTS

__all__ = ["MINI_ADAPTER", "MINI_FPS", "MINI_GUIDANCE", "MINI_REFERENCE_GUIDANCE", "MINI_SHIFT", "MINI_SIZES",
           "MINI_WEIGHTS", "WEIGHTS", "embedded_model", "load_mini_pipeline"]

# The Euler shift the mini base is trained and sampled with (recorded in its model_index.json). Wan's 5 suits its
# ~30k tokens a clip; at 272 tokens a shift of 5 leaves the low noise levels, where faces get their features,
# almost untrained (as SD3 found, the right shift grows with resolution).
MINI_SHIFT = 2.0
# Identity guidance the mini base samples with by default (its model_index.json's default_reference_guidance):
# chosen on held-out identities, then confirmed on others (docs/compositions.md, "At text guidance 2").
MINI_REFERENCE_GUIDANCE = 4.0
# Text guidance likewise (default_guidance_scale): Wan's 5 over-steers this small base, which then draws fewer faces
# and places; chosen on held-out identities, then confirmed on others (docs/mini_text_guidance.json).
MINI_GUIDANCE = 2.0


def embedded_model() -> dict:
    """The `standin.models` entry point: where the mini base folder and its adapter are. Its sizes, fps and
    reference preprocessing are in the base's model_index.json (StandInPipeline config), as for any base."""
    return {"base": str(MINI_WEIGHTS), "adapter": str(MINI_ADAPTER)}


def load_mini_pipeline(device=None, adapter: bool = True):
    """The mini pipeline (a StandInPipeline) in float32 on `device` (default CPU), with its Stand-In adapter
    unless adapter=False."""
    import torch

    from standin.loading import load_pipeline

    if not (MINI_WEIGHTS / "model_index.json").is_file():
        raise FileNotFoundError(f"the mini base model is missing from {MINI_WEIGHTS}: "
                                f"train it with `python -m standin_mini.train_base` (see its docstring)")
    if adapter and not MINI_ADAPTER.is_file():
        raise FileNotFoundError(f"the mini Stand-In adapter is not trained yet ({MINI_ADAPTER} is missing): "
                                f"train it with `standin train`, or load the base alone with adapter=False")
    return load_pipeline(MINI_WEIGHTS, adapter=MINI_ADAPTER if adapter else None, device=device or "cpu",
                         dtype=torch.float32)
