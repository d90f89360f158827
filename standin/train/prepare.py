"""`standin prepare-data`: a folder of videos -> training clips, reference faces, captions and a manifest.

For each video (any depth below the input folder):
1. Caption: a sidecar NAME.txt, or NAME.json with a "caption" field; else --default-caption; else skipped.
2. Clips: up to `max_clips` consecutive windows of `num_frames` frames at `fps` (nearest source frame for each
   output frame), centre-cropped to the output aspect and resized to width x height (area interpolation).
   A video shorter than one window is skipped.
3. Reference: faces are detected in `reference_frames` random frames of the whole source video (docs/method.md section 6:
   the reference comes from the source video, rarely from the clip's own frames). The frame whose largest face
   has the largest box wins (a bigger face gives a sharper 512 px crop and is usually the closest, most frontal
   view); it is preprocessed exactly as inference preprocesses a user's photo (standin.preprocess). No face in
   any of the sampled frames: skipped.
4. Optionally (--encode-with BASE) the frozen encoders' outputs are stored per clip: normalised VAE latents of
   the clip (decoded back from the written mp4, so that pre-encoded and pixel training see the same pixels),
   the prompt's text embeddings and the reference latents, so that a training step runs only the transformer.

Every file is written atomically; an unusable video is skipped with its reason and never stops the run. The
manifest (manifest.json) lists the clips and, per skipped video, why.
"""

import json
import logging
import math
import zlib
from dataclasses import asdict
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from standin.io import atomic_write, save_image, save_text
from standin.train.config import PrepareSettings
from standin.train.data import (
    MANIFEST,
    MAX_SEQUENCE_LENGTH,
    PromptEncoder,
    frames_to_tensor,
    square_reference,
    vae_latents,
)
from standin.video import VideoReadError, read_video, read_video_frames, save_video, video_frame_count

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


class Unusable(Exception):
    """A video that cannot give a training clip; the message is the reason recorded in the manifest."""


# ---------------------------------------------------------------------------------------------------------------
# One video.


def read_caption(video: Path) -> str | None:
    """The caption of a video from NAME.txt or NAME.json ({"caption": "..."}); None without either. Unusable (the
    clip is skipped, the reason in the manifest) for an empty caption, a non-text one ({"caption": 5} is not
    turned into "5"), a file that is not UTF-8 or not a JSON object."""
    text_file, json_file = video.with_suffix(".txt"), video.with_suffix(".json")
    if text_file.is_file():
        try:
            caption = text_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise Unusable(f"caption file {text_file.name} is not UTF-8 text ({error})") from None
    elif json_file.is_file():
        try:
            record = json.loads(json_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise Unusable(f"caption file {json_file.name} is not a JSON object with a 'caption': {error}") from None
        if not isinstance(record, dict) or "caption" not in record:
            raise Unusable(f"caption file {json_file.name} is not a JSON object with a 'caption'")
        caption = record["caption"]
        if not isinstance(caption, str):
            raise Unusable(f"caption file {json_file.name}: the caption is {type(caption).__name__} {caption!r}, "
                           "not text")
        caption = caption.strip()
    else:
        return None
    if not caption:
        raise Unusable(f"the caption file of {video.name} is empty")
    return caption


def probe(video: Path) -> tuple[int, float]:
    """(frame count, frames per second) of a video file; Unusable if it cannot be read."""
    import imageio.v2 as imageio

    try:
        count = video_frame_count(video)
        with imageio.get_reader(str(video), format="ffmpeg") as reader:
            fps = float(reader.get_meta_data()["fps"])
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        last_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise Unusable(f"unreadable video ({last_line})") from None
    if not fps > 0:
        raise Unusable(f"unreadable video (ffmpeg reports {count} frames at {fps} fps)")
    return count, fps


def decode_frames(video: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """The wanted frames (RGB uint8), in one sequential pass that stops after the last of them."""
    try:
        found = read_video_frames(video, indices)
    except VideoReadError as error:
        raise Unusable(f"decoding failed ({error})") from None
    if len(found) < len(indices):
        raise Unusable(f"only {len(found)} of the {len(indices)} needed frames could be decoded (truncated file?)")
    return found


def clip_windows(count: int, source_fps: float, settings: PrepareSettings) -> list[list[int]]:
    """Source frame indices of each clip: consecutive windows from the start, nearest frame per output frame."""
    offsets = [round(k * source_fps / settings.fps) for k in range(settings.num_frames)]
    span = offsets[-1] + 1
    if count < span:
        raise Unusable(f"too short: {count} frames ({count / source_fps:.2f} s at {source_fps:g} fps); a clip of "
                       f"{settings.num_frames} frames at {settings.fps:g} fps needs {span} source frames")
    return [[start + offset for offset in offsets] for start in range(0, count - span + 1, span)][: settings.max_clips]


def centre_crop_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the centre to the output aspect ratio (nothing is stretched), then resize."""
    source_height, source_width = frame.shape[:2]
    if source_width * height > width * source_height:  # wider than the output: crop the sides
        crop = round(source_height * width / height)
        frame = frame[:, (source_width - crop) // 2 : (source_width - crop) // 2 + crop]
    else:
        crop = round(source_width * height / width)
        frame = frame[(source_height - crop) // 2 : (source_height - crop) // 2 + crop]
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def reference_frame_indices(name: str, count: int, settings: PrepareSettings) -> list[int]:
    """`reference_frames` distinct random frames of the video, the same for the same seed and video name."""
    rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode())])
    return sorted(rng.choice(count, size=min(settings.reference_frames, count), replace=False).tolist())


def choose_reference(frames: dict[int, np.ndarray], backend, settings: PrepareSettings):
    """(frame index, preprocessing result) for the sampled frame whose largest face is the largest."""
    from standin.faces import largest_face
    from standin.preprocess import preprocess_reference

    best = None
    for index, frame in frames.items():
        face = largest_face(backend.detect(frame))
        if face is not None and (best is None or (face.area, face.score) > best[1]):
            best = (index, (face.area, face.score))
    if best is None:
        raise Unusable(f"no face found in {len(frames)} sampled frames")
    result = preprocess_reference(frames[best[0]], backend=backend, size=settings.reference_size,
                                  background=settings.background)
    return best[0], result


# ---------------------------------------------------------------------------------------------------------------
# Pre-encoding.


class ClipEncoder:
    """The frozen VAE and text encoder of a base model, run once per clip (the base never changes in training)."""

    def __init__(self, base: str, device=None):
        from standin.loading import has_two_experts, load_pipeline

        self.base = str(base)
        # Wan2.2: one expert is enough for its config (both have the same), the other need not take memory
        self.pipe = load_pipeline(base, device=device, expert="high" if has_two_experts(base) else None)
        self.prompts = PromptEncoder(self.pipe, self.pipe.device)

    def describe(self) -> dict:
        """What the stored tensors fit: a training base must match these."""
        transformer = self.pipe.transformer
        return {"base": self.base, "latent_channels": transformer.config.in_channels,
                "text_dim": transformer.config.text_dim, "reference_size": self.pipe.config.reference_size,
                "max_sequence_length": MAX_SEQUENCE_LENGTH}

    def encode(self, video: torch.Tensor, caption: str, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """video [3, T, H, W] and reference [3, 1, S, S] in [-1, 1], S the base's reference size."""
        return {
            "latents": vae_latents(self.pipe.vae, video[None])[0].cpu(),
            "prompt_embeds": self.prompts.encode(caption).cpu(),
            "reference_latents": vae_latents(self.pipe.vae, reference[None])[0].cpu(),
        }


# ---------------------------------------------------------------------------------------------------------------
# The folder.


def find_videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def prepare_video(video: Path, name: str, output: Path, settings: PrepareSettings, backend,
                  encoder: ClipEncoder | None) -> list[dict]:
    """Write one video's clips and reference; return their manifest entries. Raises Unusable."""
    caption = read_caption(video) or settings.default_caption
    if caption is None:
        raise Unusable(f"no caption: add {video.stem}.txt or {video.stem}.json beside it, or pass --default-caption")
    count, source_fps = probe(video)
    windows = clip_windows(count, source_fps, settings)
    reference_indices = reference_frame_indices(name, count, settings)
    frames = decode_frames(video, set(reference_indices).union(*windows))
    reference_index, reference = choose_reference({i: frames[i] for i in reference_indices}, backend, settings)

    reference_file = Path("references") / f"{name}.png"
    save_image(reference.image, output / reference_file)
    entries = []
    for number, window in enumerate(windows):
        clip_id = f"{name}_{number:03d}"
        clip_file = Path("clips") / f"{clip_id}.mp4"
        clip = np.stack([centre_crop_resize(frames[i], settings.height, settings.width) for i in window])
        save_video(clip, output / clip_file, fps=settings.fps, generated=False)  # real footage, not generated
        entry = {"id": clip_id, "video": str(clip_file), "reference": str(reference_file), "caption": caption,
                 "source": str(video), "source_frames": [window[0], window[-1]], "source_fps": source_fps,
                 "reference_frame": reference_index, "reference_crop": reference.describe()}
        if encoder is not None:
            latents_file = Path("latents") / f"{clip_id}.safetensors"
            # the stored (compressed) clip, not the frames before compression: what a pixel run would read
            square = np.asarray(square_reference(reference.image, encoder.pipe.config.reference_size))
            tensors = encoder.encode(frames_to_tensor(read_video(output / clip_file)), caption,
                                     frames_to_tensor(square[None]))
            atomic_write(output / latents_file, partial(save_file, tensors))
            entry["latents"] = str(latents_file)
        entries.append(entry)
    return entries


SIZE_MULTIPLE = 16  # Wan's VAE (8) times its patch (2): what height and width must be multiples of
FRAME_STEP = 4  # Wan's VAE compresses 4 frames into one latent frame after the first: frames are 4k+1
MAX_SIDE = 16384  # as for images (standin.preprocess); far beyond any base's RoPE table


def check_settings(settings: PrepareSettings) -> None:
    """ValueError, one line naming the option, for settings no Wan base can train on (before any work: an odd
    --height used to write 0-byte clips listed as valid)."""
    s = settings
    for option, value in (("--height", s.height), ("--width", s.width)):
        if not (isinstance(value, int) and 0 < value <= MAX_SIDE and value % SIZE_MULTIPLE == 0):
            raise ValueError(f"{option} must be a positive multiple of {SIZE_MULTIPLE} (the VAE's 8 times the "
                             f"patch's 2) up to {MAX_SIDE}, got {value}")
    if not (isinstance(s.num_frames, int) and s.num_frames >= 1 and (s.num_frames - 1) % FRAME_STEP == 0):
        raise ValueError(f"--frames must be {FRAME_STEP}k+1 (e.g. 81, 49, 17), got {s.num_frames}")
    if not (isinstance(s.fps, (int, float)) and math.isfinite(s.fps) and s.fps > 0):
        raise ValueError(f"--fps must be a positive number, got {s.fps}")
    for option, value, low in (("--max-clips", s.max_clips, 1), ("--reference-frames", s.reference_frames, 1),
                               ("--reference-size", s.reference_size, 16)):
        if not (isinstance(value, int) and value >= low):
            raise ValueError(f"{option} must be at least {low}, got {value}")
    if s.reference_size > 4096:
        raise ValueError(f"--reference-size must be at most 4096, got {s.reference_size}")


def prepare_dataset(videos: str | Path, output: str | Path, settings: PrepareSettings | None = None,
                    encode_with: str | None = None, device=None, backend=None, progress: bool = True) -> dict:
    """Prepare every video under `videos` into `output`; return the manifest (also written as manifest.json).

    backend: a standin.faces backend object, instead of the one settings.face_backend names."""
    from standin.faces import get_backend

    settings = settings or PrepareSettings()
    check_settings(settings)
    videos, output = Path(videos), Path(output)
    if not videos.is_dir():
        raise FileNotFoundError(f"video folder not found: {videos}")
    sources = find_videos(videos)
    if not sources:
        raise FileNotFoundError(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) under {videos}")
    for folder in ("clips", "references", "latents" if encode_with else None):
        if folder:
            (output / folder).mkdir(parents=True, exist_ok=True)
    backend = get_backend(backend or settings.face_backend)
    encoder = ClipEncoder(encode_with, device) if encode_with else None

    clips, skipped = [], []
    bar = tqdm(sources, desc="prepare-data", unit="video", disable=not progress)
    for video in bar:
        name = "__".join(video.relative_to(videos).with_suffix("").parts)
        try:
            clips += prepare_video(video, name, output, settings, backend, encoder)
        except Unusable as reason:
            skipped.append({"source": str(video), "reason": str(reason)})
        except Exception as error:  # one broken file must not stop a run over thousands
            logger.exception("unexpected error on %s", video)
            skipped.append({"source": str(video), "reason": f"error: {type(error).__name__}: {error}"})
        bar.set_postfix(clips=len(clips), skipped=len(skipped))

    manifest = {"format": "standin-dataset", "version": 1, "settings": asdict(settings),
                "face_backend": getattr(backend, "name", type(backend).__name__),
                "encoded_with": encoder.describe() if encoder else None,
                "videos": len(sources), "clips": clips, "skipped": skipped}
    save_text(json.dumps(manifest, indent=2), output / MANIFEST)
    return manifest
