"""The mini world's face recogniser: a detector, an identity embedder and a prompt checker.

- FaceDetector: CenterNet-style, fully convolutional on a 64x64 frame. Per 4x4-pixel cell it predicts a
  face-centre logit, the centre's offset in the cell, the box size and the five landmarks; from the pooled
  features it also classifies the place and the time of day of the scene.
- FaceEmbedder: a 48x48 face crop (docs/method.md's 1.5x square crop) -> L2-normalised 128-d identity embedding.
  Linear heads on the embedding predict the character's attributes (a training signal, and "who" for
  check_prompt); a head on the features before the embedding predicts the head's yaw and pitch.
- MiniFaceBackend: both networks behind standin.faces.base.FaceBackend, loaded from the shipped weights.
- check_prompt: do a clip's frames follow a prompt (action from the face track and head pose, place and time
  from the scene, who from the attributes)?

Train them with `python -m standin_mini.train_identity`.
"""

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from standin.faces.base import Face
from standin_mini.data import crop_reference
from standin_mini.prompts import Prompt, PromptError, parse_prompt
from standin_mini.settings import IDENTITY_WEIGHTS
from standin_mini.world import ADULT_DETAILS, ATTRIBUTES, PLACES, TIMES, who_of

DEFAULT_WEIGHTS = IDENTITY_WEIGHTS
DETECT_SIZE = 64  # frames are letterboxed to this square
STRIDE = 4  # detector output cell, pixels of the 64x64 input
EMBED_SIZE = 48  # face crop side
EMBED_DIM = 128
NUM_REGRESSION = 2 + 2 + 10  # centre offset, log box size, landmarks


def _block(cin, cout, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FaceDetector(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        # two stride-2 stages down to 16x16 cells, then dilated convs so each cell sees the largest faces
        self.trunk = nn.Sequential(_block(3, 16, 2), _block(16, 32), _block(32, width, 2), _block(width, width),
                                   _block(width, width, dilation=2), _block(width, width, dilation=4),
                                   _block(width, width))
        self.heat = nn.Conv2d(width, 1, 1)
        self.regression = nn.Conv2d(width, NUM_REGRESSION, 1)
        self.place = nn.Linear(width, len(PLACES))
        self.time = nn.Linear(width, len(TIMES))
        nn.init.constant_(self.heat.bias, -4.0)  # start from "no face anywhere", as CenterNet does

    def forward(self, x):
        features = self.trunk(x)
        pooled = features.mean((2, 3))
        return self.heat(features)[:, 0], self.regression(features), self.place(pooled), self.time(pooled)


class FaceEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        # keeps a 6x6 map before the projection: where a colour is (hair, shirt, hat) is part of who it is
        self.trunk = nn.Sequential(_block(3, 32, 2), _block(32, 32), _block(32, 64, 2), _block(64, 64),
                                   _block(64, 128, 2), _block(128, 128), nn.Conv2d(128, 32, 1), nn.Flatten())
        features = 32 * (EMBED_SIZE // 8) ** 2
        self.project = nn.Linear(features, EMBED_DIM)
        self.attributes = nn.ModuleDict({name: nn.Linear(EMBED_DIM, len(options))
                                         for name, options in ATTRIBUTES.items()})
        self.pose = nn.Linear(features, 2)  # from the features, so the embedding itself can ignore the pose

    def forward(self, x):
        """Normalised embeddings [B, EMBED_DIM], attribute logits {name: [B, options]}, yaw and pitch [B, 2]."""
        features = self.trunk(x)
        embedding = F.normalize(self.project(features), dim=1)
        attributes = {name: head(embedding * 10) for name, head in self.attributes.items()}
        return embedding, attributes, self.pose(features)


def to_input(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def letterbox(image: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """The image padded to a square (with its mean colour) and resized to DETECT_SIZE; returns it and the
    (scale, x offset, y offset) that map its pixels back: original = detect_pixel * scale - offset."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = image.reshape(-1, 3).mean(0).astype(np.uint8)
    ox, oy = (side - width) // 2, (side - height) // 2
    square[oy:oy + height, ox:ox + width] = image
    if side != DETECT_SIZE:
        square = np.asarray(Image.fromarray(square).resize((DETECT_SIZE, DETECT_SIZE), Image.BILINEAR))
    return square, side / DETECT_SIZE, ox, oy


def decode_detections(heat: torch.Tensor, regression: torch.Tensor, threshold: float, max_faces: int = 4):
    """Per image, [(score, box [4], landmarks [5, 2])] in DETECT_SIZE pixels, best first."""
    scores = torch.sigmoid(heat)
    peaks = scores == F.max_pool2d(scores[:, None], 3, 1, 1)[:, 0]  # local maxima: one peak per face
    results = []
    for b in range(heat.shape[0]):
        found = []
        candidates = torch.nonzero(peaks[b] & (scores[b] >= threshold))
        for gy, gx in sorted(candidates.tolist(), key=lambda c: -scores[b, c[0], c[1]].item())[:max_faces]:
            r = regression[b, :, gy, gx]
            cx, cy = (gx + r[0].item()) * STRIDE, (gy + r[1].item()) * STRIDE
            w, h = DETECT_SIZE * np.exp(r[2].item()), DETECT_SIZE * np.exp(r[3].item())
            landmarks = r[4:].reshape(5, 2).numpy() * h + np.array([cx, cy])
            found.append((scores[b, gy, gx].item(), np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]),
                          landmarks))
        results.append(found)
    return results


class MiniFaceBackend:
    """standin.faces.base.FaceBackend for the mini world (loads the shipped weights by default)."""

    name = "mini"

    def __init__(self, weights: str | Path | None = None, score_threshold: float = 0.3):
        path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; train it with `python -m standin_mini.train_identity`")
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            self.rules = DEFAULT_RULES | json.loads((f.metadata() or {}).get("rules", "{}"))
        self.detector, self.embedder = FaceDetector().eval(), FaceEmbedder().eval()
        self.detector.load_state_dict({k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")})
        self.embedder.load_state_dict({k[len("embedder."):]: v for k, v in state.items() if k.startswith("embedder.")})
        self.score_threshold = score_threshold

    @torch.no_grad()
    def analyse(self, frames: np.ndarray) -> tuple[list[list[Face]], np.ndarray, np.ndarray]:
        """Faces in each of [T, H, W, 3] uint8 frames (best first), and per-frame place [T, 6] and time [T, 4]
        probabilities."""
        boxed = [letterbox(frame) for frame in frames]
        heat, regression, place, time = self.detector(to_input(np.stack([b[0] for b in boxed])))
        faces = []
        for (_, scale, ox, oy), found in zip(boxed, decode_detections(heat, regression, self.score_threshold)):
            shift = np.array([ox, oy, ox, oy])
            faces.append([Face(box=tuple(float(v) for v in box * scale - shift), score=score,
                               landmarks=(landmarks * scale - shift[:2]).astype(np.float32))
                          for score, box, landmarks in found])
        return faces, place.softmax(1).numpy(), time.softmax(1).numpy()

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.analyse(image[None])[0][0]

    @torch.no_grad()
    def describe(self, images, faces: list[Face]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """For each (image, face): embeddings [N, 128], attribute probabilities {name: [N, options]} and the
        head's yaw and pitch [N, 2] (world.Pose units)."""
        crops = np.stack([crop_reference(image, face.box, EMBED_SIZE) for image, face in zip(images, faces)])
        embedding, logits, pose = self.embedder(to_input(crops))
        return embedding.numpy(), {name: l.softmax(1).numpy() for name, l in logits.items()}, pose.numpy()

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        return self.describe([image], [face])[0][0].astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Rules of the world: does a clip show its prompt?

# The rules that decide the action from a clip's measurements. Walks, zooms and jumps use half of the smallest
# amplitude data.action_poses gives them: walks travel 0.36 of the frame width, zooms scale the face by 1.7
# (log 0.53), jumps rise 0.16 of the frame height. The head-turn, nod and wave thresholds depend on how noisy the
# trained model's head pose is, so train_identity fits them on rendered clips of training identities and stores
# them in the weights file; the values here are only the defaults for a file without them.
DEFAULT_RULES = {
    "walk_shift": 0.18,  # face centre x travel, fraction of frame width
    "zoom_log": 0.27,  # log of the face box height ratio, last vs first frames
    "jump_rise": 0.08,  # rise of the face above its start/end height, fraction of frame height
    "turn_swing": 0.6,  # range of the head's yaw over the clip
    "nod_swing": 0.35,  # range of the head's pitch over the clip
    "wave_ratio": 1.5,  # temporal change beside the face / temporal change over the whole frame
}


def _smooth_track(track: np.ndarray) -> np.ndarray | None:
    """[T, K] per-frame values with NaN rows where no face was found -> gaps interpolated, single-frame glitches
    removed (running median of 3), jitter averaged ([1, 2, 1] filter); None if most frames have no face."""
    found = np.flatnonzero(~np.isnan(track[:, 0]))
    if len(found) < len(track) / 2:
        return None
    frames = np.arange(len(track))
    track = np.stack([np.interp(frames, found, track[found, k]) for k in range(track.shape[1])], 1)
    padded = np.concatenate([track[:1], track, track[-1:]])
    track = np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), 0)
    padded = np.concatenate([track[:1], track, track[-1:]])
    return (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4


def _wave_ratio(frames: np.ndarray, box: np.ndarray) -> float:
    """How much the region where the world draws a waving hand changes over time, relative to the whole frame."""
    grey = frames.astype(np.float32).mean(-1)
    height, width = grey.shape[1] // 2, grey.shape[2] // 2
    grey = grey[:, : 2 * height, : 2 * width].reshape(len(grey), height, 2, width, 2).mean((2, 4))  # less noise
    motion = grey.std(0)
    x0, y0, x1, y1 = box / 2
    r = (y1 - y0) / 2  # the face's half-height: the world's drawing unit
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rows = slice(int(np.clip(cy - 0.5 * r, 0, height)), int(np.clip(cy + 1.2 * r, 0, height)))
    columns = slice(int(np.clip(cx + 1.1 * r, 0, width)), int(np.clip(cx + 2.8 * r, 0, width)))
    region = motion[rows, columns]
    return float(region.mean() / (motion.mean() + 1e-3)) if region.size else 0.0


def action_measures(frames: np.ndarray, track: np.ndarray) -> dict[str, float] | None:
    """What [T, H, W, 3] frames show of each action, from `track` [T, 6]: the face box, yaw and pitch in each frame
    (NaN rows where no face was found); None when most frames have no face."""
    track = _smooth_track(track)
    if track is None:
        return None
    height, width = frames.shape[1:3]
    box, yaw, pitch = track[:, :4], track[:, 4], track[:, 5]
    cx, cy = (box[:, 0] + box[:, 2]) / 2 / width, (box[:, 1] + box[:, 3]) / 2 / height
    log_height = np.log(np.maximum(box[:, 3] - box[:, 1], 1.0))
    start, end = lambda v: np.median(v[:3]), lambda v: np.median(v[-3:])  # robust first and last values
    spread = lambda v: float(np.percentile(v, 90) - np.percentile(v, 10))
    return {"shift": float(end(cx) - start(cx)), "zoom": float(end(log_height) - start(log_height)),
            "rise": float((start(cy) + end(cy)) / 2 - np.percentile(cy, 10)), "turn": spread(yaw),
            "nod": spread(pitch), "wave": _wave_ratio(frames, np.median(box, 0))}


def decide_action(m: dict[str, float] | None, rules: dict[str, float]) -> str | None:
    """The action of action_measures `m` (None for no face), the larger motions first."""
    if m is None:
        return None
    if abs(m["zoom"]) > rules["zoom_log"]:
        return "zoom_in" if m["zoom"] > 0 else "zoom_out"
    if abs(m["shift"]) > rules["walk_shift"]:
        return "walk_right" if m["shift"] > 0 else "walk_left"
    if m["rise"] > rules["jump_rise"]:
        return "jump"
    if m["turn"] > rules["turn_swing"]:
        return "turn_head"
    if m["nod"] > rules["nod_swing"]:
        return "nod"
    if m["wave"] > rules["wave_ratio"]:
        return "wave"
    return "stand_still"


def face_track(backend: MiniFaceBackend, frames: np.ndarray):
    """Runs both networks over a clip: the track [T, 6] (best face box, yaw, pitch; NaN rows without a face),
    place and time probabilities [T, 6] / [T, 4], and the best faces' attribute probabilities (None: no face)."""
    faces, place, time = backend.analyse(frames)
    found = [t for t, f in enumerate(faces) if f]
    track = np.full((len(frames), 6), np.nan)
    attributes = None
    if found:
        best = [faces[t][0] for t in found]
        _, attributes, pose = backend.describe([frames[t] for t in found], best)
        track[found] = np.concatenate([np.array([face.box for face in best]), pose], 1)
    return track, place, time, attributes


def _who(attributes: dict[str, np.ndarray]) -> str:
    """'child', 'man', 'woman' or 'person' from attribute probabilities averaged over faces."""
    pick = lambda name: ATTRIBUTES[name][int(attributes[name].mean(0).argmax())]
    detail = ADULT_DETAILS[ATTRIBUTES["face_detail"].index(pick("face_detail"))]
    return who_of(pick("age"), detail, pick("makeup"))


@functools.lru_cache(maxsize=1)
def default_backend() -> MiniFaceBackend:
    """The shipped model, loaded once per process."""
    return MiniFaceBackend()


def check_prompt(frames: np.ndarray, prompt: Prompt | str, backend: MiniFaceBackend | None = None) -> dict:
    """Whether [T, H, W, 3] uint8 frames follow a mini-world prompt: action_ok, place_ok, time_ok, who_ok
    ("a person" fits anyone), the predicted action/place/time/who, the fraction of frames with a face and the
    motion measurements behind the action."""
    backend = backend or default_backend()
    prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if prompt.who_2 is not None:  # the rules follow one face track
        raise PromptError(f"'{prompt}' has two people: the world's rules check one-person clips only")
    track, place, time, attributes = face_track(backend, frames)
    measures = action_measures(frames, track)
    action = decide_action(measures, backend.rules)
    place_name, time_name = PLACES[int(place.mean(0).argmax())], TIMES[int(time.mean(0).argmax())]
    who = None if attributes is None else _who(attributes)
    return {"action_ok": action == prompt.action, "place_ok": place_name == prompt.place,
            "time_ok": time_name == prompt.time, "who_ok": who is not None and prompt.who in ("person", who),
            "predicted_action": action, "predicted_place": place_name, "predicted_time": time_name,
            "predicted_who": who, "face_fraction": float(np.mean(~np.isnan(track[:, 0]))), "measures": measures or {}}
