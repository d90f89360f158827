"""`standin mini clip` / `check`: a rendered clip, its reference, and the world's rules agreeing with it."""

import json

import numpy as np
from PIL import Image

from standin.cli import main
from standin.video import read_video


def test_clip_then_check(tmp_path, capsys):
    prompt = "A person jumps in the snow at night."
    main(["mini", "clip", prompt, "--identity", "12345", "--out", str(tmp_path / "out" / "clip.mp4")])
    frames = read_video(tmp_path / "out" / "clip.mp4")
    assert frames.shape == (17, 64, 64, 3)
    reference = np.asarray(Image.open(tmp_path / "out" / "clip.reference.png"))
    assert reference.shape == (64, 64, 3) and (reference[0, 0] == 255).all()  # whitened background
    capsys.readouterr()
    main(["mini", "check", str(tmp_path / "out" / "clip.mp4"), prompt])
    checks = json.loads(capsys.readouterr().out)
    assert checks["place_ok"] and checks["time_ok"]


def test_reference_command_draws_the_shipped_examples(tmp_path, capsys):
    """examples/*.png are `standin mini reference` outputs: the command redraws them pixel for pixel."""
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*_*.png"))
    assert {path.stem.split("_")[0] for path in examples} == {"woman", "man", "child", "person"}
    for example in examples:
        identity = example.stem.split("_")[1]
        main(["mini", "reference", "--identity", identity, "--out", str(tmp_path / example.name)])
        assert np.array_equal(np.asarray(Image.open(tmp_path / example.name)), np.asarray(Image.open(example)))
        who = example.stem.split("_")[0]
        assert f"identity {identity} ({who})" in capsys.readouterr().out
