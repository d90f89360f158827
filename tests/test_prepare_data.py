"""`standin prepare-data` on small videos written here: a real face (scikit-image's astronaut) moving through the
frame, with sidecar captions; and the unusable kinds (too short, corrupt, no caption, no face), which are
skipped with their reason while the run goes on. The offline dlib face backend finds the faces."""

import json

import imageio
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from standin.cli import main
from standin.train.data import PreparedDataset, PromptEncoder, vae_latents
from standin.train.prepare import PrepareSettings, clip_windows, prepare_dataset
from standin.video import read_video

SETTINGS = dict(height=32, width=48, num_frames=9, fps=12.5, reference_size=64, max_clips=2)


def panning(image: np.ndarray, frames: int, size=(192, 256)) -> list[np.ndarray]:
    """A camera panning right over `image`: the crop window moves 4 px per frame."""
    height, width = size
    return [image[40 : 40 + height, 4 * t : 4 * t + width] for t in range(frames)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    astronaut, coffee = skimage.data.astronaut(), skimage.data.coffee()

    def write(name, frames, caption=None, suffix=".txt"):
        imageio.mimwrite(folder / f"{name}.mp4", frames, fps=25, macro_block_size=1)
        if caption is not None:
            text = caption if suffix == ".txt" else json.dumps({"caption": caption})
            (folder / f"{name}{suffix}").write_text(text)

    write("astronaut", panning(astronaut, 40), "an astronaut smiles")  # 40 frames: two 17-frame windows
    (folder / "json").mkdir()
    write("json/astronaut", panning(astronaut, 20), "an astronaut turns", suffix=".json")
    write("short", panning(astronaut, 6), "too short for a clip")
    write("uncaptioned", panning(astronaut, 20))
    write("coffee", panning(coffee, 20, size=(192, 256)), "a cup of coffee")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "corrupt.txt").write_text("never read")
    return folder


@pytest.fixture(scope="module")
def prepared(videos, tmp_path_factory):
    output = tmp_path_factory.mktemp("dataset")
    return output, prepare_dataset(videos, output, PrepareSettings(**SETTINGS), progress=False)


@pytest.mark.slow
def test_clips_are_cut_cropped_and_resampled(prepared):
    output, manifest = prepared
    assert [clip["id"] for clip in manifest["clips"]] == ["astronaut_000", "astronaut_001", "json__astronaut_000"]
    first, second, json_clip = manifest["clips"]
    # 25 fps -> 12.5 fps: every other source frame; windows of 17 source frames one after the other
    assert first["source_frames"] == [0, 16] and second["source_frames"] == [17, 33]
    assert first["caption"] == "an astronaut smiles" and json_clip["caption"] == "an astronaut turns"
    for clip in manifest["clips"]:
        assert read_video(output / clip["video"]).shape == (9, 32, 48, 3)
    assert manifest["settings"]["fps"] == 12.5 and manifest["encoded_with"] is None
    assert not list(output.rglob(".*"))  # atomic writes leave no temporary files


def test_the_reference_is_the_preprocessed_face(prepared):
    output, manifest = prepared
    clip = manifest["clips"][0]
    assert clip["reference_frame"] in range(40) and "cropped the only face" in clip["reference_crop"]
    reference = np.asarray(Image.open(output / clip["reference"]))
    assert reference.shape == (64, 64, 3)
    assert (reference[:6, :6] == 255).all()  # background painted white, as inference preprocesses references
    assert not (reference[24:40, 24:40] == 255).all(axis=-1).any()  # the face itself is kept


def test_unusable_videos_are_skipped_with_their_reason(prepared):
    _, manifest = prepared
    reasons = {entry["source"].rsplit("/", 1)[-1]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons.keys() == {"short.mp4", "uncaptioned.mp4", "coffee.mp4", "corrupt.mp4"}
    assert reasons["short.mp4"].startswith("too short: 6 frames")
    assert reasons["uncaptioned.mp4"].startswith("no caption")
    assert reasons["coffee.mp4"] == "no face found in 5 sampled frames"
    assert reasons["corrupt.mp4"].startswith("unreadable video")
    assert manifest["videos"] == 6


def test_windows_follow_the_frame_rates():
    settings = PrepareSettings(num_frames=5, fps=10, max_clips=3)
    assert clip_windows(100, 30.0, settings) == [[0, 3, 6, 9, 12], [13, 16, 19, 22, 25], [26, 29, 32, 35, 38]]
    assert clip_windows(5, 10.0, settings) == [[0, 1, 2, 3, 4]]


@pytest.mark.slow
def test_cli_default_caption_and_pre_encoding_match_the_pixel_path(videos, tiny_base, tmp_path, capsys):
    """--default-caption rescues the uncaptioned video; --encode-with stores exactly what training would
    compute from the clip's pixels (the same decoded frames, reference and prompt)."""
    output = tmp_path / "encoded"
    args = ["prepare-data", str(videos), "-o", str(output), "--encode-with", str(tiny_base), "--device", "cpu",
            "--default-caption", "a person", "--height", "32", "--width", "48", "--frames", "9", "--fps", "12.5",
            "--reference-size", "64"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clips"] == 3 and summary["encoded"]  # astronaut (1 clip: --max-clips 1), json, uncaptioned
    assert {s["source"].rsplit("/", 1)[-1] for s in summary["skipped"]} == {"short.mp4", "coffee.mp4", "corrupt.mp4"}
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["encoded_with"]["reference_size"] == 32  # the tiny base's own reference size

    from standin.loading import load_pipeline

    pipe = load_pipeline(tiny_base, device="cpu")
    encoded = PreparedDataset(output, pipe.config.reference_size)
    pixels = PreparedDataset(output, pipe.config.reference_size, use_latents=False)
    for index, clip in enumerate(manifest["clips"]):
        stored, raw = encoded[index], pixels[index]
        assert stored["latents"].shape == (16, 3, 4, 6) and stored["reference_latents"].shape == (16, 1, 4, 4)
        assert raw["prompt"] == clip["caption"]
        assert torch.equal(stored["latents"], vae_latents(pipe.vae, raw["video"][None])[0])
        assert torch.equal(stored["reference_latents"], vae_latents(pipe.vae, raw["reference"][None])[0])
        assert torch.equal(stored["prompt_embeds"], PromptEncoder(pipe, "cpu").encode(raw["prompt"]))
