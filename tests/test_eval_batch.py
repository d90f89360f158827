"""`standin eval`: one video, a folder, a CSV of pairs, and bad videos / references that must fail clearly
without writing the JSON."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest
import skimage.data
from PIL import Image

from standin.cli import main
from standin.eval import (
    NoFaceError,
    VideoReadError,
    evaluate_pairs,
    evaluate_video,
    find_pairs,
    frame_embeddings,
    read_pairs_csv,
)
from standin.preprocess import ImageLoadError

BACKEND = "dlib-hog"


def clip(path, count: int = 8):
    """The astronaut's head drifting right over white, 200x160."""
    person = np.asarray(Image.fromarray(skimage.data.astronaut()[:320, 60:400]).resize((153, 144)))
    with imageio.get_writer(str(path), fps=25, macro_block_size=1) as writer:
        for t in range(count):
            frame = np.full((160, 200, 3), 255, np.uint8)
            frame[:144, 10 + 3 * t : 163 + 3 * t] = person
            writer.append_data(frame)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """a: clip + the astronaut photo, b: clip + the photo mirrored (JPEG), c: clip without a reference,
    d: a broken video with a reference."""
    root = tmp_path_factory.mktemp("videos")
    clip(root / "a.mp4")
    Image.fromarray(skimage.data.astronaut()).save(root / "a.png")
    clip(root / "b.mp4")
    Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(root / "b.jpg", quality=90)
    clip(root / "c.mp4")
    (root / "d.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    Image.fromarray(skimage.data.astronaut()).save(root / "d.png")
    return root


def test_pairing_by_name(folder):
    pairs = {p.video.name: p.reference and p.reference.name for p in find_pairs(folder)}
    assert pairs == {"a.mp4": "a.png", "b.mp4": "b.jpg", "c.mp4": None, "d.mp4": "d.png"}
    shared = find_pairs(folder, reference=folder / "a.png")
    assert {p.reference.name for p in shared} == {"a.png"} and len(shared) == 4


def test_batch_goes_on_past_bad_pairs(folder):
    result = evaluate_pairs(find_pairs(folder), backend=BACKEND, num_frames=4, progress=False)
    rows = {r["video"].rsplit("/", 1)[-1]: r for r in result.rows}
    assert rows["a.mp4"]["face_sim"] > 0.97 and rows["b.mp4"]["face_sim"] > 0.97
    assert rows["c.mp4"]["error"] == "no reference image with the same name"
    assert "not a readable video" in rows["d.mp4"]["error"]
    summary = result.summary()
    assert (summary["videos"], summary["evaluated"], summary["failed"]) == (4, 2, 2)
    assert summary["face_sim"] == pytest.approx((rows["a.mp4"]["face_sim"] + rows["b.mp4"]["face_sim"]) / 2)


def test_cli_batch_prints_a_table_and_writes_json(folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(folder), "--backend", BACKEND, "--frames", "4", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["video", "FaceSim", "faces", "copy-paste", "motion%"]
    assert any(line.startswith("c.mp4") and "error" in line for line in lines)
    assert lines[-1].startswith("mean (2 of 4)")
    assert "evaluating" in captured.err  # the tqdm progress bar
    saved = json.loads(out.read_text())
    assert saved["summary"]["evaluated"] == 2 and len(saved["videos"]) == 4


def test_cli_pairs_csv(folder, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"video,reference\n{folder / 'a.mp4'},{folder / 'a.png'}\n{folder / 'c.mp4'},{folder / 'a.png'}\n")
    pairs = read_pairs_csv(csv)
    assert [p.video.name for p in pairs] == ["a.mp4", "c.mp4"]
    assert main(["eval", "--pairs", str(csv), "--backend", BACKEND, "--frames", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("mean (2 of 2)")
    (tmp_path / "bad.csv").write_text("clip,image\nx.mp4,y.png\n")
    with pytest.raises(VideoReadError, match="columns 'video' and 'reference'"):
        read_pairs_csv(tmp_path / "bad.csv")


def test_cli_single_video_json(folder, capsys):
    assert (
        main(
            ["eval", str(folder / "a.mp4"), "--reference", str(folder / "a.png"), "--backend", BACKEND, "--frames", "3"]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert scores["frames_sampled"] == 3 and scores["face_rate"] == 1.0 and scores["face_sim"] > 0.97


@pytest.mark.parametrize(
    "video, reference, error, message",
    [
        ("missing.mp4", "a.png", VideoReadError, "no such video file"),
        ("d.mp4", "a.png", VideoReadError, "not a readable video"),
        ("notes.mp4", "a.png", VideoReadError, "not a readable video"),
        ("a.mp4", "coffee.png", NoFaceError, "no face found in the reference"),
        ("a.mp4", "broken.png", ImageLoadError, "truncated or corrupt"),
        ("a.mp4", "missing.png", ImageLoadError, "no such file"),
    ],
    ids=[
        "missing-video",
        "broken-video",
        "text-video",
        "faceless-reference",
        "truncated-reference",
        "missing-reference",
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(folder, tmp_path, capsys, video, reference, error, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.mp4", "a.png", "d.mp4"):
        (inputs / name).write_bytes((folder / name).read_bytes())
    (inputs / "notes.mp4").write_text("not a video\n")
    Image.fromarray(skimage.data.coffee()).save(inputs / "coffee.png")
    (inputs / "broken.png").write_bytes((folder / "a.png").read_bytes()[:500])
    with pytest.raises(error, match=message):
        evaluate_video(inputs / video, inputs / reference, backend=BACKEND, num_frames=2)
    out = tmp_path / "results" / "scores.json"
    assert (
        main(
            ["eval", str(inputs / video), "--reference", str(inputs / reference), "--backend", BACKEND, "-o", str(out)]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "results").exists()


def test_cli_usage_errors(folder, capsys):
    assert main(["eval", str(folder / "a.mp4")]) == 2
    assert "no --reference given and no a.reference.png beside the video" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "either a video" in capsys.readouterr().err


def test_pairing_follows_the_generated_file_names_and_never_takes_a_contact_sheet(tmp_path):
    for name in ("x.mp4", "x.reference.png", "x.png", "x.sheet.png",  # generated: the reference, not the photo
                 "y.mp4", "y.sheet.png",  # a contact sheet only: no reference
                 "z.mp4", "z.JPG",  # a folder people put together
                 "w.sheet.mp4", "w.sheet.png"):  # even a video named like a sheet gets no sheet
        (tmp_path / name).write_bytes(b"")
    pairs = {p.video.name: p.reference and p.reference.name for p in find_pairs(tmp_path)}
    assert pairs == {"w.sheet.mp4": None, "x.mp4": "x.reference.png", "y.mp4": None, "z.mp4": "z.JPG"}


def test_a_folder_where_every_video_fails_exits_1(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / f"{name}.mp4").write_bytes(b"not a video")
        Image.fromarray(skimage.data.astronaut()).save(tmp_path / f"{name}.reference.png")
    out = tmp_path / "out" / "results.json"
    assert main(["eval", str(tmp_path), "--backend", BACKEND, "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "none of the 2 videos could be evaluated" in captured.err
    assert captured.out.splitlines()[-1].startswith("mean (0 of 2)")
    assert json.loads(out.read_text())["summary"]["failed"] == 2  # the errors are still recorded


def test_a_gif_is_evaluated(folder, tmp_path):
    frames = [frame for frame in imageio.get_reader(str(folder / "a.mp4"))]
    imageio.mimwrite(tmp_path / "a.gif", frames, duration=40, loop=0)
    scores = evaluate_video(tmp_path / "a.gif", folder / "a.png", backend=BACKEND, num_frames=3)
    assert scores.frames_sampled == 3 and scores.face_rate == 1.0 and scores.face_sim > 0.97


def test_a_fifo_or_a_folder_where_a_file_is_expected_fails_at_once(folder, tmp_path, capsys):
    import os
    import signal

    os.mkfifo(tmp_path / "pipe.mp4")
    os.mkfifo(tmp_path / "pipe.png")
    signal.alarm(60)  # opening a FIFO blocks until a writer comes: fail the test instead of hanging
    try:
        cases = [
            (tmp_path / "pipe.mp4", folder / "a.png", "named pipe (FIFO), not a video file"),
            (folder / "a.mp4", tmp_path / "pipe.png", "named pipe (FIFO), not a file"),
            (folder / "a.mp4", tmp_path, "is a folder, not an image file"),
        ]
        for video, reference, message in cases:
            assert main(["eval", str(video), "--reference", str(reference), "--backend", BACKEND]) == 1
            assert message in capsys.readouterr().err
        assert main(["eval", "--pairs", str(tmp_path / "pipe.png"), "--backend", BACKEND]) == 1
        assert "named pipe (FIFO), not a pairs file" in capsys.readouterr().err
    finally:
        signal.alarm(0)


def run_cli(*args):
    """The CLI in a child process: dlib's crashes (rc 134) must not take the test session down."""
    import subprocess
    import sys

    code = "import sys; from standin.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_thin_video_frames_are_refused_before_face_detection(folder, tmp_path):
    with imageio.get_writer(str(tmp_path / "strip.mp4"), fps=25, macro_block_size=1) as writer:
        for _ in range(3):
            writer.append_data(np.full((20, 4000, 3), 128, np.uint8))
    done = run_cli("eval", str(tmp_path / "strip.mp4"), "--reference", str(folder / "a.png"), "--frames", "2")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "4000x20 px" in done.stderr and "at most 20:1" in done.stderr
    with pytest.raises(VideoReadError, match="4000x20 px"):
        evaluate_video(np.full((3, 20, 4000, 3), 128, np.uint8), folder / "a.png", backend=BACKEND)
    with pytest.raises(VideoReadError, match="frame 1: .*4000x20 px"):
        frame_embeddings([np.zeros((64, 64, 3), np.uint8), np.zeros((20, 4000, 3), np.uint8)], backend=BACKEND)


def test_an_old_contact_sheet_named_like_the_video_is_not_a_reference(tmp_path):
    from standin.io import save_image
    from standin.video import contact_sheet, save_video

    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 40, 3), dtype=np.uint8)
    for name in ("old", "user"):
        save_video(frames, tmp_path / f"{name}.mp4")
    save_image(contact_sheet(frames), tmp_path / "old.png")  # what generate wrote before .sheet.png: 200x32
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "user.png")  # a photo: kept as the reference
    pairs = {p.video.name: p for p in find_pairs(tmp_path)}
    assert pairs["user.mp4"].reference.name == "user.png"
    assert pairs["old.mp4"].reference is None and "old.png is a contact sheet" in pairs["old.mp4"].problem
    result = evaluate_pairs([pairs["old.mp4"]], backend=BACKEND, progress=False)
    assert "put the reference beside the video as old.reference.png" in result.rows[0]["error"]
