"""standin swap: pasting by landmarks, the SDEdit schedule, background consistency, windows, the command."""

import json
import subprocess

import cv2
import numpy as np
import PIL.Image
import pytest
import torch

from standin.faces.base import Face
from standin.pipeline import StandInPipeline
from standin.swap.paste import (
    NoFaceInVideoError, NoReferenceFaceError, box_transform, face_transform, paste_video, person_alpha,
    reference_face,
)
from standin.swap.pipeline import StandInSwapPipeline, shifted_sigma, swap_sigmas
from standin.swap.run import Prepared, denoise, prepare_reference
from standin.swap.windows import blend, plan_windows
from standin.tiny import tiny_pipeline

REFERENCE_LANDMARKS = np.array([[12, 13], [20, 13], [16, 18], [13, 23], [19, 23]], dtype=np.float32)


class TableBackend:
    """A face backend that knows the faces of given images (by their bytes); others have none."""

    name = "table"

    def __init__(self):
        self.table = {}

    def add(self, image: np.ndarray, face: Face | None) -> None:
        self.table[image.tobytes()] = [] if face is None else [face]

    def detect(self, image):
        return self.table.get(np.ascontiguousarray(image).tobytes(), [])

    def embed(self, image, face):
        return np.ones(4, np.float32) / 2


def similarity(angle_degrees: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(angle_degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), shift[0]],
                     [scale * np.sin(a), scale * np.cos(a), shift[1]]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def reference_image() -> np.ndarray:
    """32x32 on white: a grey head, and a dark dot on each of the five landmarks."""
    image = np.full((32, 32, 3), 255, np.uint8)
    cv2.ellipse(image, (16, 18), (9, 11), 0, 0, 360, (150, 120, 100), -1)
    for x, y in REFERENCE_LANDMARKS:
        image[int(y), int(x)] = (0, 0, 255)
    return image


def landmark_face(landmarks: np.ndarray) -> Face:
    x0, y0 = landmarks.min(0) - 5
    x1, y1 = landmarks.max(0) + 5
    return Face(box=(float(x0), float(y0), float(x1), float(y1)), landmarks=landmarks.astype(np.float32))


# ---- pasting --------------------------------------------------------------------------------------------------

def test_warp_puts_the_reference_landmarks_on_the_frame_landmarks():
    backend = TableBackend()
    ref = reference_image()
    backend.add(ref, landmark_face(REFERENCE_LANDMARKS))
    face = reference_face(ref, backend)
    truth = similarity(25, 1.7, (20, 6))
    target = apply(truth, REFERENCE_LANDMARKS)
    matrix = face_transform(face, landmark_face(target))
    assert np.abs(apply(matrix, REFERENCE_LANDMARKS) - target).max() < 0.01

    # Robust: one landmark off by 12 px, the other four still land within a pixel.
    noisy = target.copy()
    noisy[2] += (12, -9)
    matrix = face_transform(face, landmark_face(noisy))
    assert np.abs(apply(matrix, REFERENCE_LANDMARKS) - target)[[0, 1, 3, 4]].max() < 1.0

    # In pixels: the blue dots of the pasted reference sit on the frame's landmarks.
    frame = np.full((64, 64, 3), (30, 160, 40), np.uint8)
    backend.add(frame, landmark_face(target))
    pasted = paste_video(frame[None], face, backend)
    blue = pasted.frames[0].astype(int)
    blueness = np.clip(blue[..., 2] - blue[..., 0], 0, None).astype(np.float64)
    for point in target:
        x, y = np.round(point).astype(int)
        window = blueness[y - 2:y + 3, x - 2:x + 3]
        ys, xs = np.mgrid[y - 2:y + 3, x - 2:x + 3]
        centre = np.array([(xs * window).sum(), (ys * window).sum()]) / window.sum()
        assert np.abs(centre - point).max() < 1.0


def test_box_transform_without_landmarks():
    backend = TableBackend()
    ref = reference_image()
    backend.add(ref, Face(box=(6, 6, 26, 30)))
    face = reference_face(ref, backend)
    matrix = face_transform(face, Face(box=(10, 20, 40, 56)))
    np.testing.assert_allclose(matrix, box_transform((6, 6, 26, 30), (10, 20, 40, 56)))
    np.testing.assert_allclose(apply(matrix, np.array([[16.0, 18.0]])), [[25.0, 38.0]])  # centre on centre
    assert matrix[0, 0] == pytest.approx(36 / 24)  # longer sides equal


def test_person_alpha_keeps_white_inside_the_person():
    image = reference_image()
    image[17:20, 15:18] = 255  # white teeth inside the head
    alpha = person_alpha(image)
    assert alpha[0, 0] == 0 and alpha[31, 31] == 0
    assert alpha[18, 16] == 1 and alpha[18, 10] == 1


def test_faceless_frames_keep_an_empty_mask_and_their_pixels():
    backend = TableBackend()
    ref = reference_image()
    backend.add(ref, landmark_face(REFERENCE_LANDMARKS))
    face = reference_face(ref, backend)
    frames = np.stack([np.full((48, 48, 3), v, np.uint8) for v in (40, 80, 120)])
    backend.add(frames[1], landmark_face(apply(similarity(0, 1.2, (8, 8)), REFERENCE_LANDMARKS)))
    pasted = paste_video(frames, face, backend)
    assert pasted.faces[0] is None and pasted.faces[2] is None
    for k in (0, 2):
        assert not pasted.masks[k].any()
        assert np.array_equal(pasted.frames[k], frames[k])
    assert pasted.masks[1].max() == 1.0 and not np.array_equal(pasted.frames[1], frames[1])
    # The mask covers the pasted alpha and grows beyond it.
    changed = (pasted.frames[1] != frames[1]).any(axis=2)
    assert (pasted.masks[1][changed] > 0).all()
    assert (pasted.masks[1] > 0).sum() > changed.sum()

    with pytest.raises(NoFaceInVideoError):
        paste_video(frames[[0, 2]], face, backend)
    with pytest.raises(NoReferenceFaceError):
        reference_face(np.full((32, 32, 3), 255, np.uint8), backend)


# ---- schedule and latents -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swap_pipe(one_thread):
    return StandInSwapPipeline.from_standin(tiny_pipeline())


def test_from_standin_shares_components_and_adapters(swap_pipe):
    assert isinstance(swap_pipe, StandInPipeline)
    assert set(swap_pipe.adapters) == {"transformer"}
    assert swap_pipe.config.reference_size == 32


def test_schedule_starts_at_the_strength(swap_pipe):
    shift = swap_pipe.scheduler.config.shift
    for strength in (0.7, 0.85, 1.0):
        swap_pipe._swap_strength = strength
        try:
            swap_pipe._set_timesteps(20, "cpu")
        finally:
            swap_pipe._swap_strength = None
        sigmas = swap_pipe.scheduler.sigmas.numpy()
        expected = [shifted_sigma(strength * (1 - i / 20), shift) for i in range(20)] + [0.0]
        np.testing.assert_allclose(sigmas, expected, rtol=1e-6)
        np.testing.assert_allclose(swap_pipe.scheduler.timesteps.numpy(), np.array(expected[:-1]) * 1000, rtol=1e-6)
    assert shifted_sigma(0.85, 5.0) == pytest.approx(0.9659, abs=1e-4)  # the published default's first sigma
    with pytest.raises(ValueError):
        swap_sigmas(20, 0.0)


def tiny_video(frames=5, size=32, seed=0):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (frames, size, size, 3)).astype(np.uint8)
    masks = np.zeros((frames, size, size), np.float32)
    masks[:, 8:20, 4:14] = 1.0
    return video, masks


CALL = dict(prompt="a person", num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry",
            preprocess_reference=False)


def test_strength_one_is_a_plain_generation_from_the_same_noise(swap_pipe):
    video, masks = tiny_video()
    ref = PIL.Image.fromarray(reference_image())
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    swapped = swap_pipe.swap(video, masks, ref, strength=1.0, noise=noise, output_type="latent", **CALL).frames
    plain = swap_pipe(reference_image=ref, height=32, width=32, num_frames=5, latents=noise.clone(),
                      output_type="latent", **CALL).frames
    assert torch.equal(swapped, plain)


def test_text_guidance_defaults_to_the_base_s_own(swap_pipe):
    """`standin swap` passes no --guidance unless given: the swap then guides as the base's config says (2 for the
    mini model, 5 for Wan), like generation."""
    video, masks = tiny_video()
    ref = PIL.Image.fromarray(reference_image())
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    call = {key: value for key, value in CALL.items() if key != "guidance_scale"}

    def swap(**guidance):
        return swap_pipe.swap(video, masks, ref, strength=0.85, noise=noise, output_type="latent", **call,
                              **guidance).frames

    swap_pipe.register_to_config(default_guidance_scale=3.0)
    try:
        assert torch.equal(swap(), swap(guidance_scale=3.0))
        assert not torch.equal(swap(), swap(guidance_scale=5.0))
    finally:
        swap_pipe.register_to_config(default_guidance_scale=5.0)


def test_starting_latents_are_the_video_noised_to_the_first_sigma(swap_pipe, monkeypatch):
    video, masks = tiny_video()
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    seen = {}

    def fake_call(self, **kwargs):
        seen.update(kwargs, sigma=float(self.scheduler.sigmas[0]))
        return None

    monkeypatch.setattr(StandInPipeline, "__call__", fake_call)
    swap_pipe.swap(video, masks, None, strength=0.85, noise=noise, **CALL)
    sigma = shifted_sigma(0.85, swap_pipe.scheduler.config.shift)
    assert seen["sigma"] == pytest.approx(sigma, rel=1e-6)
    original = swap_pipe.encode_video(video)
    torch.testing.assert_close(seen["latents"], (1 - sigma) * original + sigma * noise, rtol=1e-5, atol=1e-5)


def test_latent_mask_covers_every_pixel_it_encodes(swap_pipe):
    masks = np.zeros((9, 32, 32), np.float32)
    masks[6, 9, 17] = 1.0  # frame 6 is in latent frame 2 (frames 5-8), pixel (17, 9) in cell (2, 1)
    inside = swap_pipe.latent_mask(masks)
    assert inside.shape == (1, 1, 3, 4, 4)
    assert inside.sum() == 1 and inside[0, 0, 2, 1, 2]
    masks[0, 0, 0] = 0.4  # at most 0.5: outside
    assert swap_pipe.latent_mask(masks).sum() == 1


def test_background_consistency_keeps_the_original_latents_outside_the_mask(swap_pipe):
    video, masks = tiny_video()
    ref = PIL.Image.fromarray(reference_image())
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    final = swap_pipe.swap(video, masks, ref, strength=0.85, keep_background=True, noise=noise,
                           output_type="latent", **CALL).frames
    original = swap_pipe.encode_video(video)
    inside = swap_pipe.latent_mask(masks).expand_as(final)
    assert 0 < inside.sum() < inside.numel()
    assert torch.equal(final[~inside], original[~inside])
    assert not torch.allclose(final[inside], original[inside])
    free = swap_pipe.swap(video, masks, ref, strength=0.85, keep_background=False, noise=noise,
                          output_type="latent", **CALL).frames
    assert not torch.equal(free[~inside], original[~inside])


# ---- windows --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,window,temporal", [(1, 17, 1), (10, 17, 4), (17, 17, 1), (18, 17, 1), (30, 17, 1),
                                                   (41, 17, 4), (42, 17, 4), (100, 81, 4), (500, 81, 4)])
def test_windows_cover_every_frame_and_blend(total, window, temporal):
    plan = plan_windows(total, window, temporal)
    assert (plan.length - 1) % temporal == 0 and plan.length <= max(window, plan.length)
    assert all(start % temporal == 0 for start in plan.starts) and plan.starts[0] == 0
    assert total <= plan.padded < total + temporal
    covered = np.zeros(plan.padded, int)
    for k, start in enumerate(plan.starts):
        covered[start:start + plan.length] += 1
        assert plan.latent_slice(k).start * temporal == start
        assert plan.latent_slice(k).stop - plan.latent_slice(k).start == (plan.length - 1) // temporal + 1
    assert (covered >= 1).all()
    for first in range(len(plan.starts) - 1):
        assert plan.overlap(first, first + 1) >= 1  # neighbours overlap: there is something to blend
    # Constant windows blend to the constant; window k's value k blends to a ramp between neighbours.
    ones = blend(plan, [np.ones((plan.length, 2)) for _ in plan.starts])
    np.testing.assert_allclose(ones, 1.0)
    ramp = blend(plan, [np.full((plan.length, 1), float(k)) for k in range(len(plan.starts))])[:, 0]
    assert ramp.shape == (total,) and (np.diff(ramp) >= -1e-12).all()
    assert ramp[0] == 0 and ramp[-1] == pytest.approx(min(len(plan.starts) - 1, ramp[-1]))


def test_windows_draw_their_noise_from_one_tensor(swap_pipe, monkeypatch):
    """Two windows on a 9-frame video (window 5, t 4): the shared frame starts from the same noise."""
    video, masks = tiny_video(frames=9)
    prepared = Prepared(crop=(0, 0, 32, 32), reference=None,
                        pasted=type("P", (), {"frames": video, "masks": masks, "faces": [None] * 9})())
    ref = PIL.Image.fromarray(reference_image())
    calls = []
    original_swap = StandInSwapPipeline.swap

    def recording_swap(self, pasted, masks, reference, noise=None, **kwargs):
        calls.append((pasted, noise))
        return original_swap(self, pasted, masks, reference, noise=noise, **kwargs)

    monkeypatch.setattr(StandInSwapPipeline, "swap", recording_swap)
    frames = denoise(swap_pipe, prepared, ref, "a person", seed=1, num_inference_steps=2, window=5, stride=4,
                     guidance_scale=1.0, progress=False)
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    assert len(calls) == 2
    (first_frames, first_noise), (second_frames, second_noise) = calls
    assert np.array_equal(first_frames[4], second_frames[0])
    assert torch.equal(first_noise[:, :, 1], second_noise[:, :, 0])


def test_prepare_reference_matches_the_pipeline(swap_pipe):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24, 3)).astype(np.uint8))
    ours = prepare_reference(image, swap_pipe.config.reference_size, preprocess=False)
    theirs = swap_pipe.prepare_reference_image(image, preprocess=False)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


# ---- the command ----------------------------------------------------------------------------------------------

def run_swap(*argv):
    import argparse

    from standin.swap import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["swap", *map(str, argv)])
    return args.func(args)


def write_clip(path, frames, fps, audio=False):
    import imageio_ffmpeg

    from standin.video import save_video

    silent = path.with_name("silent_" + path.name) if audio else path
    save_video(frames, silent, fps=fps)
    if audio:
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(silent), "-f", "lavfi", "-i",
                   f"sine=frequency=440:duration={len(frames) / fps}", "-map", "0:v", "-map", "1:a", "-c:v", "copy",
                   "-c:a", "aac", str(path)]
        subprocess.run(command, check=True, capture_output=True)
        silent.unlink()
    return path


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    pytest.importorskip("standin_mini")
    from standin_mini.data import make_reference

    out = tmp_path / "out"
    reference = tmp_path / "face.png"
    PIL.Image.fromarray(make_reference(34, 64)).save(reference)
    blank = write_clip(tmp_path / "blank.mp4", np.full((5, 64, 64, 3), 90, np.uint8), fps=8)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    white = tmp_path / "white.png"
    PIL.Image.new("RGB", (64, 64), "white").save(white)
    cases = [
        ((blank, "--reference", reference), "no face found in any"),
        ((not_video, "--reference", reference), "not a readable video"),
        ((tmp_path / "missing.mp4", "--reference", reference), "no such video file"),
        ((blank, "--reference", white), "no face found in the reference"),
        ((blank, "--reference", reference, "--strength", "1.5"), "--strength"),
        ((blank, "--reference", reference, "--guidance", "nan"), "--guidance"),
        ((blank, "--reference", reference, "--base", tmp_path), "--adapter"),
    ]
    for argv, message in cases:
        assert run_swap(*argv, "-o", out / "x.mp4", "--save-intermediate") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
        assert not out.exists()


@pytest.mark.slow
def test_swap_command_keeps_length_fps_and_audio(tmp_path, capsys):
    pytest.importorskip("standin_mini")
    from standin_mini.data import make_clip, make_reference

    import imageio_ffmpeg

    from standin.swap.media import video_info
    from standin.video import read_video

    clip = make_clip(7, "A man nods in a room at noon.", num_frames=20, size=(64, 64), seed=1)
    video = write_clip(tmp_path / "in.mp4", clip.frames, fps=12, audio=True)
    reference = tmp_path / "face.png"
    PIL.Image.fromarray(make_reference(34, 64)).save(reference)
    out = tmp_path / "out" / "swapped.mp4"
    assert run_swap(video, "--reference", reference, "-o", out, "--steps", "1", "--guidance", "1",
                    "--save-intermediate", "--keep-background", "--composite") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["frames"] == 20 and report["windows"] == 2 and report["audio"] == "copied"
    for path in (out, out.with_name("swapped.pasted.mp4"), out.with_name("swapped.mask.mp4")):
        frames = read_video(path)
        assert frames.shape == (20, 64, 64, 3)
        assert video_info(path).fps == pytest.approx(12)
    assert video_info(out).audio_codec == "aac"
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True,
                           text=True).stderr
    assert "AI-generated" in probe  # the label survives the audio copy
    assert out.with_name("swapped.reference.png").is_file() and out.with_name("swapped.sheet.png").is_file()


def test_audio_the_container_cannot_hold_is_reencoded(tmp_path):
    import imageio_ffmpeg

    from standin.swap.media import copy_audio, video_info
    from standin.video import save_video

    source = tmp_path / "source.mkv"  # 8-bit PCM: copied into an mp4 it fails, AAC it is
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=32x32:rate=10:duration=1", "-f", "lavfi", "-i", "sine=duration=1", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "pcm_u8", str(source)], check=True, capture_output=True)
    assert video_info(source).audio_codec.startswith("pcm")
    out = save_video(np.zeros((10, 32, 32, 3), np.uint8), tmp_path / "out.mp4", fps=10)
    assert copy_audio(out, source) == "aac"
    assert video_info(out).audio_codec == "aac" and video_info(out).fps == 10


def test_composite_keeps_the_input_outside_the_mask():
    from standin.swap.run import composite

    rng = np.random.default_rng(0)
    generated, original = (rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8) for _ in range(2))
    masks = np.zeros((3, 16, 16), np.float32)
    masks[:, 4:8, 4:8] = 1.0
    masks[:, 8, 4:8] = 0.5
    mixed = composite(generated, original, masks)
    assert np.array_equal(mixed[masks == 0], original[masks == 0])
    assert np.array_equal(mixed[masks == 1], generated[masks == 1])
    half = (generated[masks == 0.5].astype(int) + original[masks == 0.5]) / 2
    assert np.abs(mixed[masks == 0.5] - half).max() <= 0.5
