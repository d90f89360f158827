"""The mini world's style LoRA: the style is detectable, and the shipped LoRA loads onto the embedded base."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("standin_mini")

from standin_mini.style_lora import stylize, style_strength  # noqa: E402


def test_the_style_is_detected_on_world_clips():
    from standin_mini.data import make_clip

    frames = make_clip(5, "A man waves on a beach at noon.", 5, (64, 64), seed=0).frames
    plain, styled = style_strength(frames), style_strength(stylize(frames))
    assert styled - plain > 0.2
    assert stylize(frames).dtype == np.uint8 and stylize(frames).shape == frames.shape


def test_the_shipped_style_lora_loads_on_the_mini_base():
    import standin_mini

    path = Path(standin_mini.__file__).parent / "weights" / "style_lora.safetensors"
    if not path.is_file():
        pytest.skip("no style LoRA shipped")
    from standin.lora import load_loras
    from standin_mini.model import load_mini_pipeline

    pipe = load_mini_pipeline()
    assert load_loras(pipe, [(path, 0.5)]) == ["lora_0"]
