"""`standin mini clip` / `check`: a rendered clip, its reference, and the world's rules agreeing with it."""

import json

import numpy as np
from PIL import Image

from standin.cli import main
from standin.video import read_video


def test_clip_then_check(tmp_path, capsys):
    prompt = "A person jumps in the snow at night."
    assert main(["mini", "clip", prompt, "--identity", "12345", "--out", str(tmp_path / "out" / "clip.mp4")]) == 0
    frames = read_video(tmp_path / "out" / "clip.mp4")
    assert frames.shape == (17, 64, 64, 3)
    reference = np.asarray(Image.open(tmp_path / "out" / "clip.reference.png"))
    assert reference.shape == (64, 64, 3) and (reference[0, 0] == 255).all()  # whitened background
    capsys.readouterr()
    assert main(["mini", "check", str(tmp_path / "out" / "clip.mp4"), prompt]) == 0
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


def test_bad_prompts_are_one_line_errors(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    for argv in (["mini", "clip", "A dog flies.", "--out", str(clip)],
                 ["mini", "clip", "A child waves on a beach at noon.", "--identity", "34", "--out", str(clip)],
                 ["mini", "check", str(clip), "A dog flies."],
                 ["mini", "check", str(tmp_path / "missing.mp4"), "A person nods in a room at noon."]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_reference_beside_a_clip_is_named_as_generate_names_it(tmp_path, capsys):
    from standin.video import companion_paths

    for name in ("a.mp4", "b.gif"):
        assert main(["mini", "clip", "A person nods in a room at noon.", "--frames", "3", "--out",
                     str(tmp_path / name)]) == 0
        assert companion_paths(tmp_path / name)[0].is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a.reference.png", "b.gif", "b.reference.png"]


def test_every_option_of_clip_and_check_has_help():
    from standin.cli import build_parser

    mini = next(a for a in build_parser()._actions if a.dest == "command").choices["mini"]
    commands = next(a for a in mini._actions if a.dest == "mini_command").choices
    for name in ("clip", "check", "reference"):
        for action in commands[name]._actions:
            assert action.help, (name, action.dest)
