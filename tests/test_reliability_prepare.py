"""Issue 17, `standin prepare-data`: sizes no Wan base can train on are refused in one line before any work, and
captions that are not text skip their video with the reason in the manifest (never "5" for {"caption": 5})."""

import json

import imageio
import numpy as np
import pytest
from conftest import CentreFace

from standin.cli import main
from standin.train.config import PrepareSettings
from standin.train.prepare import check_settings, prepare_dataset


@pytest.fixture
def videos(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = [np.full((48, 64, 3), 40 * t % 255, np.uint8) for t in range(12)]
    for name in ("good", "number", "listed", "nokey", "latin1", "array"):
        imageio.mimwrite(folder / f"{name}.mp4", frames, fps=25, macro_block_size=1)
    (folder / "good.txt").write_text("a grey card fades")
    (folder / "number.json").write_text(json.dumps({"caption": 5}))
    (folder / "listed.json").write_text(json.dumps({"caption": ["a", "b"]}))
    (folder / "nokey.json").write_text(json.dumps({"text": "a card"}))
    (folder / "latin1.txt").write_bytes("une carte grise, déjà vue".encode("latin-1"))
    (folder / "array.json").write_text(json.dumps(["a card"]))
    return folder


@pytest.mark.parametrize("option, value, message", [
    ("--height", "33", "--height must be a positive multiple of 16"),
    ("--width", "0", "--width must be a positive multiple of 16"),
    ("--width", "-32", "--width must be a positive multiple of 16"),
    ("--height", "100000", "up to 16384, got 100000"),
    ("--frames", "10", "--frames must be 4k+1"),
    ("--frames", "0", "--frames must be 4k+1"),
    ("--fps", "0", "--fps must be a positive number"),
    ("--fps", "nan", "--fps must be a positive number"),
    ("--fps", "inf", "--fps must be a positive number"),
    ("--max-clips", "0", "--max-clips must be at least 1"),
    ("--reference-size", "8", "--reference-size must be at least 16"),
])
def test_sizes_no_base_can_use_are_refused_before_any_work(videos, tmp_path, capsys, option, value, message):
    output = tmp_path / "dataset"
    code = main(["prepare-data", str(videos), "-o", str(output), option, value])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not output.exists()


def test_valid_settings_pass():
    check_settings(PrepareSettings())  # the defaults: 832x480, 81 frames
    check_settings(PrepareSettings(height=32, width=48, num_frames=9, fps=12.5, reference_size=64))


def test_captions_that_are_not_text_skip_their_video_with_the_reason(videos, tmp_path):
    settings = PrepareSettings(height=32, width=32, num_frames=5, fps=12.5, reference_size=32, background="keep")
    manifest = prepare_dataset(videos, tmp_path / "dataset", settings, backend=CentreFace(), progress=False)
    assert [clip["caption"] for clip in manifest["clips"]] == ["a grey card fades"]
    reasons = {entry["source"].rsplit("/", 1)[-1]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons == {
        "number.mp4": "caption file number.json: the caption is int 5, not text",
        "listed.mp4": "caption file listed.json: the caption is list ['a', 'b'], not text",
        "nokey.mp4": "caption file nokey.json is not a JSON object with a 'caption'",
        "array.mp4": "caption file array.json is not a JSON object with a 'caption'",
        "latin1.mp4": reasons["latin1.mp4"],
    }
    assert reasons["latin1.mp4"].startswith("caption file latin1.txt is not UTF-8 text")
    written = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert written["skipped"] == manifest["skipped"]
    assert sorted(p.name for p in (tmp_path / "dataset" / "clips").iterdir()) == ["good_000.mp4"]
