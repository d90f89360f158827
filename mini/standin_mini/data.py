"""Mini-world training data: clips that follow their prompt, references, splits, degradations, a Dataset.

Splits (fixed, by construction):
- identities: ids [0, HELDOUT_IDENTITIES) are held out ("test"); ids from HELDOUT_IDENTITIES up are "train".
- prompts: one (action, place, time) combination in six is held out (prompts.prompt_split).
Everything is generated on the fly from integers: the same (identity, prompt, seed) gives the same clip.
"""

from dataclasses import dataclass
from io import BytesIO

import numpy as np
import torch
from PIL import Image, ImageFilter

from standin_mini import world
from standin_mini.prompts import Prompt, parse_prompt, sample_prompt
from standin_mini.settings import MINI_FPS, MINI_SIZES

HELDOUT_IDENTITIES = 10_000
MAX_ZOOM = 1.8  # the largest camera zoom of a clip; backgrounds are drawn this much sharper for it


def identity_split(identity_id: int) -> str:
    return "test" if identity_id < HELDOUT_IDENTITIES else "train"


def split_identity(split: str, k: int) -> int:
    """The k-th identity id of a split (ids are already scattered over the attributes, so order is harmless)."""
    if split == "test":
        if not 0 <= k < HELDOUT_IDENTITIES:
            raise ValueError(f"the test split has {HELDOUT_IDENTITIES} identities, asked for number {k}")
        return k
    if split == "train":
        return HELDOUT_IDENTITIES + k
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ---------------------------------------------------------------------------------------------------------------
# Clips.


@dataclass
class Clip:
    frames: np.ndarray  # [T, H, W, 3] uint8
    boxes: np.ndarray  # [T, 4] float32 face box x0, y0, x1, y1 in pixels
    landmarks: np.ndarray  # [T, 5, 2] float32
    masks: np.ndarray  # [T, H, W] float32 character coverage
    poses: list[world.Pose]  # what was drawn in each frame (position and scale after the camera's zoom)
    prompt: Prompt
    identity_id: int


def _smoothstep(t):
    return t * t * (3 - 2 * t)


@dataclass
class _Track:
    """One character's motion over a clip, before the camera's zoom: per-frame arrays (wave None: no hand)."""
    x: np.ndarray
    y: np.ndarray
    scale: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    wave: np.ndarray | None
    zoom: np.ndarray  # the camera's zoom, 1 = none


def _action_track(action: str, num_frames: int, rng: np.random.Generator) -> _Track:
    # Mid-to-close shots, as in Stand-In's own training data: the face box is about half the frame's height, where
    # a 64x64 frame through the 8x VAE still keeps the face (the world's identity survives it far better than at
    # a third of the height). Actions that need room (a waving hand, a jump, a walk, a zoom) frame a little wider.
    t = np.linspace(0, 1, num_frames)
    x = np.full(num_frames, rng.uniform(0.44, 0.56))
    y = np.full(num_frames, rng.uniform(0.42, 0.48))
    scale = np.full(num_frames, rng.uniform(0.5, 0.6))
    yaw = np.full(num_frames, rng.uniform(-0.15, 0.15))
    pitch = np.full(num_frames, rng.uniform(-0.1, 0.1))
    zoom = np.ones(num_frames)
    wave = None
    if action in ("walk_left", "walk_right"):
        direction = -1 if action == "walk_left" else 1
        scale = np.full(num_frames, rng.uniform(0.44, 0.5))
        x = rng.uniform(0.47, 0.53) + direction * rng.uniform(0.155, 0.18) * (2 * t - 1)
        y = y - 0.02 * np.abs(np.sin(2 * np.pi * 2 * t))  # the bounce of the steps
        yaw = np.full(num_frames, 0.35 * direction)  # facing where it goes
    elif action == "jump":
        y = np.full(num_frames, rng.uniform(0.54, 0.58))
        scale = np.full(num_frames, rng.uniform(0.42, 0.46))
        y = y - rng.uniform(0.14, 0.18) * np.sin(np.pi * np.clip((t - 0.2) / 0.6, 0, 1))
    elif action == "nod":
        pitch = pitch + rng.uniform(0.75, 1.0) * (1 - np.cos(2 * np.pi * 2 * t)) / 2  # down and up, twice
    elif action == "turn_head":
        yaw = yaw + rng.choice([-1, 1]) * rng.uniform(0.75, 0.95) * np.sin(2 * np.pi * t)  # one side, then the other
    elif action == "wave":
        x = np.full(num_frames, rng.uniform(0.34, 0.4))  # room on the right for the hand (up to 1.2 scale away)
        scale = np.full(num_frames, rng.uniform(0.42, 0.48))
        wave = rng.uniform(0, 2 * np.pi) + 2 * np.pi * rng.uniform(2, 3) * t
    elif action in ("zoom_in", "zoom_out"):
        x = np.full(num_frames, rng.uniform(0.46, 0.54))
        scale = np.full(num_frames, rng.uniform(0.3, 0.34))
        ramp = _smoothstep(t if action == "zoom_in" else 1 - t)
        zoom = 1 + (rng.uniform(1.6, 1.8) - 1) * ramp
    elif action == "stand_still":
        x = x + 0.004 * np.sin(2 * np.pi * t + rng.uniform(0, 6))
    else:
        raise ValueError(f"unknown action {action!r}")
    return _Track(x=x, y=y, scale=scale, yaw=yaw, pitch=pitch, wave=wave, zoom=zoom)


def _posed(track: _Track, zoom: np.ndarray, rng: np.random.Generator) -> list[world.Pose]:
    """The poses of `track` seen through the camera's `zoom` (about the frame's centre), with an expression and
    maybe one blink."""
    mouth = str(rng.choice(["closed", "closed", "smile"]))
    blink = int(rng.integers(0, len(zoom))) if rng.random() < 0.5 else -1
    return [world.Pose(x=0.5 + (track.x[k] - 0.5) * zoom[k], y=0.5 + (track.y[k] - 0.5) * zoom[k],
                       scale=track.scale[k] * zoom[k], yaw=float(track.yaw[k]), pitch=float(track.pitch[k]),
                       mouth=mouth, eyes_closed=k == blink, wave=None if track.wave is None else float(track.wave[k]))
            for k in range(len(zoom))]


def action_poses(action: str, num_frames: int, rng: np.random.Generator) -> tuple[list[world.Pose], np.ndarray]:
    """The character's pose in each frame and the camera zoom (1 = none) that act out `action`."""
    track = _action_track(action, num_frames, rng)
    return _posed(track, track.zoom, rng), track.zoom


# Two people: each one's single-person motion shrunk by PAIR_SCALE about a point low in the frame, PAIR_ANCHOR (a
# two-shot cut at the chest; walks and jumps shrink with them), its horizontal wander by PAIR_SPREAD about its own
# side's centre, PAIR_OFFSET from the frame's; the camera actions put them closer (the zoom spreads them) and zoom
# less. Sized so that the left one's waving hand (2.6 face half-heights to its right) never reaches the right
# one's shoulder.
PAIR_SCALE, PAIR_SPREAD, PAIR_OFFSET, PAIR_ANCHOR = 0.6, 0.3, 0.28, 0.8
PAIR_CAMERA_OFFSET, PAIR_CAMERA_ZOOM = 0.18, 0.6  # the latter: the fraction of the one-person zoom kept


def pair_action_poses(action: str, num_frames: int,
                      rng: np.random.Generator) -> tuple[list[world.Pose], list[world.Pose], np.ndarray]:
    """The left and the right character's poses in each frame, both acting out `action` (each its own timing and
    expression), and the camera zoom."""
    tracks = [_action_track(action, num_frames, rng) for _ in range(2)]
    camera = action in ("zoom_in", "zoom_out")
    zoom = 1 + (tracks[0].zoom - 1) * (PAIR_CAMERA_ZOOM if camera else 1)  # one camera: the first track's zoom
    offset = PAIR_CAMERA_OFFSET if camera else PAIR_OFFSET
    poses = []
    for side, track in zip((-1, 1), tracks):
        track.x = 0.5 + side * offset + (track.x - 0.5) * PAIR_SPREAD
        track.y = PAIR_ANCHOR + (track.y - PAIR_ANCHOR) * PAIR_SCALE
        track.scale = track.scale * PAIR_SCALE
        poses.append(_posed(track, zoom, rng))
    return poses[0], poses[1], zoom


def _zoomed(view: np.ndarray, zoom: float, size: tuple[int, int]) -> np.ndarray:
    """The central 1/zoom of `view` (drawn at MAX_ZOOM times the frame size), resized to the frame."""
    height, width = view.shape[:2]
    h, w = height / zoom, width / zoom
    box = ((width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2)
    return np.asarray(Image.fromarray(view).resize((size[1], size[0]), Image.BILINEAR, box=box))


def _check_who(identity_id: int, who: str) -> None:
    drawn = world.identity(identity_id).who
    if who not in ("person", drawn):
        raise ValueError(f"identity {identity_id} is drawn as '{drawn}', the prompt says '{who}'")


def _scene(prompt: Prompt, zoom: np.ndarray, size: tuple[int, int],
           rng: np.random.Generator) -> tuple[world.Light, list[np.ndarray]]:
    """The clip's light and its background in each frame (through the camera's zoom)."""
    light = world.time_light(prompt.time, rng)
    layout = int(rng.integers(0, 2**31))
    if np.all(zoom == 1):
        return light, [world.background(prompt.place, prompt.time, size, layout)] * len(zoom)
    view = world.background(prompt.place, prompt.time, (int(size[0] * MAX_ZOOM), int(size[1] * MAX_ZOOM)), layout)
    return light, [_zoomed(view, z, size) for z in zoom]


def make_clip(identity_id: int, prompt: Prompt | str, num_frames: int = 17, size: tuple[int, int] = (64, 64),
              seed: int = 0) -> Clip:
    """A clip of `identity_id` acting out `prompt`; `seed` varies everything the prompt leaves open."""
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if prompt.who_2 is not None:
        raise ValueError(f"'{prompt}' has two people: draw it with make_pair_clip")
    _check_who(identity_id, prompt.who)
    rng = np.random.default_rng([seed, identity_id, 0])
    poses, zoom = action_poses(prompt.action, num_frames, rng)
    light, views = _scene(prompt, zoom, size, rng)
    renders = [world.render(world.identity(identity_id), pose, light, bg, size) for pose, bg in zip(poses, views)]
    return Clip(frames=np.stack([r.image for r in renders]), boxes=np.stack([r.box for r in renders]),
                landmarks=np.stack([r.landmarks for r in renders]), masks=np.stack([r.mask for r in renders]),
                poses=poses, prompt=prompt, identity_id=identity_id)


@dataclass
class PairClip:
    """Two people in one clip; index 0 of the person axis is the left one (the prompt's first), 1 the right."""
    frames: np.ndarray  # [T, H, W, 3] uint8
    boxes: np.ndarray  # [T, 2, 4] float32 face boxes x0, y0, x1, y1 in pixels
    landmarks: np.ndarray  # [T, 2, 5, 2] float32
    masks: np.ndarray  # [T, 2, H, W] float32 each person's visible coverage
    poses: list[tuple[world.Pose, world.Pose]]
    prompt: Prompt
    identity_ids: tuple[int, int]


def make_pair_clip(identity_id: int, identity_id_2: int, prompt: Prompt | str, num_frames: int = 17,
                   size: tuple[int, int] = (64, 64), seed: int = 0) -> PairClip:
    """A clip of two people acting out a two-person `prompt` side by side: `identity_id` on the left (the prompt's
    `who`), `identity_id_2` on the right (`who_2`); `seed` varies everything the prompt leaves open."""
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if prompt.who_2 is None:
        raise ValueError(f"'{prompt}' has one person: draw it with make_clip")
    _check_who(identity_id, prompt.who)
    _check_who(identity_id_2, prompt.who_2)
    rng = np.random.default_rng([seed, identity_id, identity_id_2, 3])
    left, right, zoom = pair_action_poses(prompt.action, num_frames, rng)
    light, views = _scene(prompt, zoom, size, rng)
    people = [world.identity(identity_id), world.identity(identity_id_2)]
    renders = [world.render_group(people, [a, b], light, bg, size) for a, b, bg in zip(left, right, views)]
    stacked = lambda field: np.stack([np.stack([getattr(r, field) for r in frame]) for frame in renders])
    return PairClip(frames=np.stack([frame[0].image for frame in renders]), boxes=stacked("box"),
                    landmarks=stacked("landmarks"), masks=stacked("mask"), poses=list(zip(left, right)),
                    prompt=prompt, identity_ids=(identity_id, identity_id_2))


# ---------------------------------------------------------------------------------------------------------------
# References.


def crop_reference(image: np.ndarray, box, size: int, mask: np.ndarray | None = None) -> np.ndarray:
    """docs/method.md section 6 on a known face: everything outside `mask` painted white, a square of side 1.5x the
    longer box side centred on the box (the part outside the image white), resized to size x size (area)."""
    if mask is not None:
        image = (image * mask[..., None] + 255.0 * (1 - mask[..., None]) + 0.5).astype(np.uint8)
    x0, y0, x1, y1 = (float(v) for v in box)
    side = 1.5 * max(x1 - x0, y1 - y0)
    left, top = round((x0 + x1) / 2 - side / 2), round((y0 + y1) / 2 - side / 2)
    side = round(side)
    height, width = image.shape[:2]
    square = Image.new("RGB", (side, side), (255, 255, 255))
    inside = (max(left, 0), max(top, 0), min(left + side, width), min(top + side, height))
    square.paste(Image.fromarray(image).crop(inside), (inside[0] - left, inside[1] - top))
    return np.asarray(square.resize((size, size), Image.BOX))


def make_reference(identity_id: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """A [size, size, 3] uint8 reference photo of `identity_id`: its own pose, light and scene (never a frame of
    a clip), preprocessed like a real reference (crop around the face, background white)."""
    rng = np.random.default_rng([seed, identity_id, 1])
    photo = (128, 128)
    pose = world.Pose(x=rng.uniform(0.4, 0.6), y=rng.uniform(0.4, 0.5), scale=rng.uniform(0.3, 0.45),
                      yaw=rng.uniform(-0.4, 0.4), pitch=rng.uniform(-0.2, 0.2),
                      mouth=str(rng.choice(["closed", "smile", "open"])))
    time = str(rng.choice(world.TIMES))
    scene = world.background(str(rng.choice(world.PLACES)), time, photo, int(rng.integers(0, 2**31)))
    shot = world.render(world.identity(identity_id), pose, world.time_light(time, rng), scene, photo)
    return crop_reference(shot.image, shot.box, size, shot.mask)


# ---------------------------------------------------------------------------------------------------------------
# Imperfect frames: what a small generator's output looks like.


@dataclass
class Degradation:
    blur: float = 1.0  # Gaussian blur radius in pixels
    noise: float = 8.0  # Gaussian noise std in 0..255 units
    jpeg: int = 50  # JPEG quality, 0 for none


def random_degradation(rng: np.random.Generator) -> Degradation:
    return Degradation(blur=rng.uniform(0, 1.6), noise=rng.uniform(0, 14),
                       jpeg=int(rng.integers(20, 90)) if rng.random() < 0.6 else 0)


def degrade(image: np.ndarray, degradation: Degradation, rng: np.random.Generator) -> np.ndarray:
    """Blur, then add noise, then JPEG-compress an RGB uint8 image."""
    out = Image.fromarray(image)
    if degradation.blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(degradation.blur))
    pixels = np.asarray(out, dtype=np.float32) + rng.normal(0, degradation.noise, image.shape).astype(np.float32)
    out = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    if degradation.jpeg:
        buffer = BytesIO()
        out.save(buffer, format="JPEG", quality=degradation.jpeg)
        out = Image.open(buffer).convert("RGB")
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------------------------
# Dataset.


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] float32 in [-1, 1], the layout of Wan's video VAE."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 0, 1, 2), dtype=np.float32) / 127.5 - 1.0)


class MiniClipDataset(torch.utils.data.Dataset):
    """Item i: dict(video [3, T, H, W], reference [3, 1, S, S] (both float32 in [-1, 1]), prompt str, identity int).

    `split` picks identities and prompt combinations (`prompt_split` overrides the latter);
    `num_identities` limits how many distinct identities the items cycle through.
    """

    def __init__(self, split: str = "train", length: int = 10_000, num_frames: int = 17,
                 size: tuple[int, int] = (64, 64), reference_size: int = 64, num_identities: int | None = None,
                 prompt_split: str | None = None, seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        limit = HELDOUT_IDENTITIES if split == "test" else world.NUM_IDENTITIES - HELDOUT_IDENTITIES
        self.num_identities = min(num_identities or limit, limit)
        self.split, self.prompt_split = split, prompt_split or split
        self.length, self.num_frames, self.size, self.reference_size, self.seed = (
            length, num_frames, tuple(size), reference_size, seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index, 2])
        identity_id = split_identity(self.split, int(rng.integers(0, self.num_identities)))
        prompt = sample_prompt(int(rng.integers(0, 2**31)), world.identity(identity_id), self.prompt_split)
        clip = make_clip(identity_id, prompt, self.num_frames, self.size, seed=int(rng.integers(0, 2**31)))
        reference = make_reference(identity_id, self.reference_size, seed=int(rng.integers(0, 2**31)))
        return {"video": to_tensor(clip.frames), "reference": to_tensor(reference[None]), "prompt": str(prompt),
                "identity": identity_id}

    @property
    def settings(self) -> dict:
        """The clip format, as a prepared dataset's manifest records it: what `standin train` trains and
        validates at and the fps its videos play at."""
        height, width = self.size
        return {"num_frames": self.num_frames, "height": height, "width": width, "fps": MINI_FPS,
                "reference_size": self.reference_size}


def mini_dataset(split: str, length: int, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, reference_size: int = 64) -> MiniClipDataset:
    """The `standin.datasets` entry point `mini` (`standin train --data mini`, `--val-data mini`): the world's
    train identities, or the held-out ones ("test"), generated on the fly. Sizes left None are the world's own
    (MINI_SIZES)."""
    num_frames = MINI_SIZES["num_frames"] if num_frames is None else num_frames
    height = MINI_SIZES["height"] if height is None else height
    width = MINI_SIZES["width"] if width is None else width
    return MiniClipDataset(split, length=length, num_frames=num_frames, size=(height, width),
                           reference_size=reference_size)
