"""Train (and evaluate) the mini world's face recogniser from scratch, on a CPU.

    python -m standin_mini.train_identity --out mini/standin_mini/weights/identity.safetensors
    python -m standin_mini.train_identity --evaluate-only --out mini/standin_mini/weights/identity.safetensors

Every batch is rendered on the fly from (seed, step) alone, so the run is a pure function of its config: a
checkpoint holds the step, the networks and the optimizer, and a killed run started again with the same
command continues from its last checkpoint exactly as if it had never stopped. Identities come from the
training split only; the metrics are measured on held-out identities.
"""

import argparse
import functools
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from standin.faces.base import Face
from standin_mini import world
from standin_mini.data import (
    HELDOUT_IDENTITIES,
    Degradation,
    crop_reference,
    degrade,
    make_clip,
    make_reference,
    random_degradation,
    split_identity,
)
from standin_mini.identity import (
    DEFAULT_RULES,
    DETECT_SIZE,
    EMBED_SIZE,
    STRIDE,
    FaceDetector,
    FaceEmbedder,
    MiniFaceBackend,
    action_measures,
    check_prompt,
    decide_action,
    face_track,
    letterbox,
    to_input,
)
from standin_mini.prompts import ACTIONS, Prompt, sample_prompt
from standin_mini.settings import IdentityTrainConfig


TrainConfig = IdentityTrainConfig  # its settings live in settings.py: the command line reads their defaults


# ---------------------------------------------------------------------------------------------------------------
# Samples.


# Training scenes come from a fixed set of layouts per place and time, cached in each data worker: drawing a
# background costs as much as drawing the character. Evaluation draws fresh layouts.
SCENE_LAYOUTS = 128
_cached_background = functools.lru_cache(maxsize=len(world.PLACES) * len(world.TIMES) * SCENE_LAYOUTS * 3)(
    world.background)


def _scene(rng, place: str, time_: str, size: int, fresh: bool) -> np.ndarray:
    if fresh:
        return world.background(place, time_, (size, size), int(rng.integers(SCENE_LAYOUTS, 2**31)))
    return _cached_background(place, time_, (size, size), int(rng.integers(SCENE_LAYOUTS)))


def _train_identity(rng) -> world.Identity:
    return world.identity(split_identity("train", int(rng.integers(0, world.NUM_IDENTITIES - HELDOUT_IDENTITIES))))


def _random_pose(rng, x, y, scale) -> world.Pose:
    return world.Pose(x=rng.uniform(*x), y=rng.uniform(*y), scale=scale, yaw=rng.uniform(-1, 1),
                      pitch=rng.uniform(-0.5, 1.0), mouth=str(rng.choice(["closed", "smile", "open"])),
                      eyes_closed=bool(rng.random() < 0.15),
                      wave=float(rng.uniform(0, 2 * np.pi)) if rng.random() < 0.15 else None)


NO_SCENE = -1  # the scene label of frames with a white background


def _whitened(shot: world.Render) -> np.ndarray:
    mask = shot.mask[..., None]
    return (shot.image * mask + 255.0 * (1 - mask) + 0.5).astype(np.uint8)


def detector_sample(rng, ident: world.Identity | None):
    """A 64x64 frame with `ident` somewhere in it (None: no one), its targets, possibly degraded."""
    size = int(rng.choice([DETECT_SIZE, 2 * DETECT_SIZE], p=[0.7, 0.3]))
    place, time_ = int(rng.integers(len(world.PLACES))), int(rng.integers(len(world.TIMES)))
    scene = _scene(rng, world.PLACES[place], world.TIMES[time_], size, fresh=False)
    box, landmarks = np.full(4, np.nan, np.float32), np.full((5, 2), np.nan, np.float32)
    image = scene
    if ident is not None:
        pose = _random_pose(rng, (0.12, 0.88), (0.15, 0.85), float(np.exp(rng.uniform(np.log(0.14), np.log(0.7)))))
        shot = world.render(ident, pose, world.time_light(world.TIMES[time_], rng), scene, (size, size))
        image = shot.image
        if rng.random() < 0.15:  # a reference photo: background painted white, so no scene to name
            image, place, time_ = _whitened(shot), NO_SCENE, NO_SCENE
        box, landmarks = shot.box * DETECT_SIZE / size, shot.landmarks * DETECT_SIZE / size
    image = letterbox(image)[0]
    if rng.random() < 0.7:
        image = degrade(image, random_degradation(rng), rng)
    return image, box, landmarks, place, time_


def _jitter(box, rng):
    """A box moved and resized the way a detector errs."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    cx, cy = (x0 + x1) / 2 + rng.normal(0, 0.05 * h), (y0 + y1) / 2 + rng.normal(0, 0.05 * h)
    s = float(np.exp(rng.normal(0, 0.07)))
    return np.array([cx - (cx - x0) * s, cy - (cy - y0) * s, cx + (x1 - cx) * s, cy + (y1 - cy) * s])


def embedder_view(ident: world.Identity, rng, fresh: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A 48x48 crop of `ident` (any pose, light, scene or white reference background, size, degradation) and
    the yaw and pitch it was drawn with. `fresh` draws new scene layouts instead of the cached training ones."""
    size = int(rng.choice([64, 96, 128]))
    scale = min(float(np.exp(rng.uniform(np.log(14), np.log(60)))) / size, 0.6)
    pose = _random_pose(rng, (0.3, 0.7), (0.3, 0.6), scale)
    time_ = str(rng.choice(world.TIMES))
    scene = _scene(rng, str(rng.choice(world.PLACES)), time_, size, fresh)
    shot = world.render(ident, pose, world.time_light(time_, rng), scene, (size, size))
    head = np.array([pose.yaw, pose.pitch], np.float32)
    if rng.random() < 0.25:  # a reference: clean, background painted white
        return crop_reference(shot.image, _jitter(shot.box, rng), EMBED_SIZE, shot.mask), head
    image = degrade(shot.image, random_degradation(rng), rng) if rng.random() < 0.6 else shot.image
    return crop_reference(image, _jitter(shot.box, rng), EMBED_SIZE), head


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is the training batch of that step, a pure function of (seed, step)."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def __len__(self):
        return self.config.steps

    def __getitem__(self, step: int) -> dict:
        c = self.config
        rng = np.random.default_rng([c.seed, step])
        samples = [detector_sample(rng, None if rng.random() < 0.1 else _train_identity(rng))
                   for _ in range(c.detector_batch)]
        images, boxes, landmarks, places, times = (np.stack(v) for v in zip(*samples))
        identities = [_train_identity(rng) for _ in range(c.embedder_identities)]
        views, heads = (np.stack(v) for v in zip(*[embedder_view(ident, rng) for ident in identities for _ in range(2)]))
        attributes = np.array([list(ident.attribute_indices().values()) for ident in identities for _ in range(2)])
        return {"frames": to_input(images), "boxes": torch.from_numpy(boxes), "landmarks": torch.from_numpy(landmarks),
                "place": torch.from_numpy(places), "time": torch.from_numpy(times), "views": to_input(views),
                "heads": torch.from_numpy(heads), "attributes": torch.from_numpy(attributes)}


# ---------------------------------------------------------------------------------------------------------------
# Losses.


def detector_targets(boxes: torch.Tensor, landmarks: torch.Tensor):
    """Gaussian centre heatmaps [B, G, G], regression targets [B, 14] and the centre cell of each face."""
    grid = DETECT_SIZE // STRIDE
    batch = boxes.shape[0]
    present = ~torch.isnan(boxes[:, 0])
    boxes, landmarks = boxes.nan_to_num(0), landmarks.nan_to_num(0)  # frames without a face: zero heat, no regression
    centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1) / STRIDE
    cell = centre.nan_to_num(0).floor().clamp(0, grid - 1).long()
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
    sigma = (size[:, 1] / STRIDE / 6).clamp(min=0.8)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    d2 = (xs[None] - cell[:, 0, None, None]) ** 2 + (ys[None] - cell[:, 1, None, None]) ** 2
    heat = torch.exp(-d2 / (2 * sigma[:, None, None] ** 2)) * present[:, None, None]
    offset = centre - cell
    marks = (landmarks - (centre * STRIDE)[:, None]) / size[:, 1, None, None]
    regression = torch.cat([offset, torch.log(size / DETECT_SIZE), marks.reshape(batch, 10)], 1)
    return heat, regression, cell, present


def detector_loss(detector: FaceDetector, batch: dict) -> tuple[torch.Tensor, dict]:
    heat_logit, regression, place, time_ = detector(batch["frames"])
    heat, target, cell, present = detector_targets(batch["boxes"], batch["landmarks"])
    # CenterNet's focal loss: only the exact centre is positive, its neighbours are softly discounted
    p = torch.sigmoid(heat_logit).clamp(1e-4, 1 - 1e-4)
    positive = heat == 1
    focal = -(positive * (1 - p) ** 2 * torch.log(p) + ~positive * (1 - heat) ** 4 * p ** 2 * torch.log(1 - p))
    focal = focal.sum() / positive.sum().clamp(min=1)
    index = torch.nonzero(present)[:, 0]
    predicted = regression[index, :, cell[index, 1], cell[index, 0]]
    error = (predicted - target[index]).abs()
    reg = error[:, :4].mean() + 4 * error[:, 4:].mean() if len(index) else regression.sum() * 0
    named = batch["place"] != NO_SCENE
    scene = (F.cross_entropy(place[named], batch["place"][named], reduction="sum") +
             F.cross_entropy(time_[named], batch["time"][named], reduction="sum")) / named.sum().clamp(min=1)
    return focal + reg + 0.5 * scene, {"focal": focal.item(), "box": reg.item(), "scene": scene.item()}


def embedder_loss(embedder: FaceEmbedder, batch: dict, temperature: float) -> tuple[torch.Tensor, dict]:
    embedding, logits, head = embedder(batch["views"])
    n = embedding.shape[0]
    # contrastive (NT-Xent): each view must find its twin (views 2k and 2k+1 show the same identity) among all
    # other views of the batch
    similarity = embedding @ embedding.T / temperature
    similarity = similarity.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    contrastive = F.cross_entropy(similarity, torch.arange(n) ^ 1)
    attributes = torch.stack([F.cross_entropy(l, batch["attributes"][:, k]) for k, l in enumerate(logits.values())])
    pose = (head - batch["heads"]).abs().mean()
    return contrastive + attributes.mean() + 2 * pose, {"contrastive": contrastive.item(),
                                                    "attributes": attributes.mean().item(), "pose": pose.item()}


# ---------------------------------------------------------------------------------------------------------------
# Training.


def _log(work: Path, message: str):
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(work / "train.log", "a") as f:
        f.write(line + "\n")


def _one_thread(_):
    torch.set_num_threads(1)


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(state: dict, out: Path, rules: dict | None = None):
    metadata = {"format": "standin-mini-identity"} | ({"rules": json.dumps(rules)} if rules else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)


def export_weights(detector: FaceDetector, embedder: FaceEmbedder, out: Path):
    state = {f"detector.{k}": v for k, v in detector.state_dict().items()}
    _save(state | {f"embedder.{k}": v for k, v in embedder.state_dict().items()}, out)


def train(config: TrainConfig, work: Path, out: Path | None = None, stop_after: int | None = None):
    """Trains (resuming from `work`/checkpoint.pt when there is one); exports to `out` when finished.
    `stop_after` ends the run early after that step, like a kill right after a checkpoint.
    Returns the two networks."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    detector, embedder = FaceDetector(), FaceEmbedder()
    optimizer = torch.optim.AdamW([*detector.parameters(), *embedder.parameters()], lr=config.lr,
                                  weight_decay=config.weight_decay)
    checkpoint = work / "checkpoint.pt"
    start, seconds = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint} was written with a different config; use another --work directory")
        detector.load_state_dict(state["detector"])
        embedder.load_state_dict(state["embedder"])
        optimizer.load_state_dict(state["optimizer"])
        start, seconds = state["step"], state["seconds"]
        _log(work, f"resumed at step {start}")
    else:
        _log(work, f"training from scratch: {json.dumps(asdict(config))}")

    def save(step):
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"step": step, "seconds": seconds, "config": asdict(config), "detector": detector.state_dict(),
                    "embedder": embedder.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
        os.replace(tmp, checkpoint)  # atomic: a kill leaves the old or the new checkpoint, never half of one

    loader = torch.utils.data.DataLoader(StepBatches(config), sampler=range(start, config.steps), batch_size=None,
                                         num_workers=config.workers, worker_init_fn=_one_thread,
                                         prefetch_factor=4 if config.workers else None)
    detector.train(), embedder.train()
    tick = time.time()
    for step, batch in zip(range(start, config.steps), loader):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        det_loss, det_parts = detector_loss(detector, batch)
        emb_loss, emb_parts = embedder_loss(embedder, batch, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        (det_loss + emb_loss).backward()
        optimizer.step()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.time()
            seconds += now - tick
            tick = now
            rate = seconds / done
            parts = " ".join(f"{k} {v:.3f}" for k, v in (det_parts | emb_parts).items())
            _log(work, f"step {done}/{config.steps} {parts} | {seconds / 60:.1f} min, "
                       f"~{rate * (config.steps - done) / 60:.1f} min left")
        if done % config.checkpoint_every == 0 or done == config.steps:
            save(done)
        if stop_after is not None and done >= stop_after:
            return detector, embedder
    detector.eval(), embedder.eval()
    if out is not None:
        export_weights(detector, embedder, out)
        _log(work, f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {seconds / 60:.1f} min of training")
    return detector, embedder


# ---------------------------------------------------------------------------------------------------------------
# check_prompt's pose and wave thresholds, fitted on training identities.


def _action_clips(ident_ids, clips_per_action: int, seed: int, rng, degraded: bool):
    """(frames, prompt) of `clips_per_action` rendered clips per action, optionally degraded."""
    for a, action in enumerate(ACTIONS):
        for k in range(clips_per_action):
            i = ident_ids[(a * clips_per_action + k) % len(ident_ids)]
            drawn = sample_prompt(seed * 31 + a * 1000 + k, world.identity(i))
            prompt = Prompt(who=drawn.who, action=action, place=drawn.place, time=drawn.time)
            frames = make_clip(i, prompt, seed=seed * 31 + a * 1000 + k).frames
            yield (np.stack([degrade(f, Degradation(), rng) for f in frames]) if degraded else frames), prompt


def fit_rules(backend: MiniFaceBackend, seed: int = 2, clips_per_action: int = 16) -> dict[str, float]:
    """The turn, nod and wave thresholds that decide the actions of clean and degraded clips of training
    identities best (the walk, zoom and jump thresholds follow from the world's geometry). Of all the threshold
    triples that decide the most clips right, the one nearest the middle of that plateau: the largest margin."""
    rng = np.random.default_rng(seed)
    ids = [split_identity("train", int(k)) for k in rng.choice(100_000, 9 * clips_per_action, replace=False)]
    clips = [(action_measures(frames, face_track(backend, frames)[0]), prompt.action)
             for degraded in (False, True) for frames, prompt in _action_clips(ids, clips_per_action, seed, rng,
                                                                                degraded)]
    # the larger motions are decided first and do not depend on the fitted thresholds
    decided = [decide_action(m, DEFAULT_RULES | {"turn_swing": np.inf, "nod_swing": np.inf, "wave_ratio": np.inf})
               for m, _ in clips]
    fixed_hits = sum(d == action for d, (_, action) in zip(decided, clips) if d != "stand_still")
    rest = [(m, action) for d, (m, action) in zip(decided, clips) if d == "stand_still"]
    turn, nod, wave = (np.array([m[k] for m, _ in rest]) for k in ("turn", "nod", "wave"))
    truth = np.array([action for _, action in rest])
    grid = np.arange(0.2, 1.2, 0.025), np.arange(0.1, 0.8, 0.025), np.arange(1.0, 2.5, 0.025)
    t, n, w = (g[..., None] for g in np.meshgrid(*grid, indexing="ij", sparse=True))  # [turn, nod, wave, clip]
    is_turn = turn > t
    is_nod = ~is_turn & (nod > n)
    is_wave = ~is_turn & ~is_nod & (wave > w)
    hits = (is_turn & (truth == "turn_head")) | (is_nod & (truth == "nod")) | (is_wave & (truth == "wave")) | (
        ~is_turn & ~is_nod & ~is_wave & (truth == "stand_still"))
    hits = hits.sum(-1)
    plateau = np.argwhere(hits == hits.max())
    pick = plateau[np.abs(plateau - np.median(plateau, 0)).sum(1).argmin()]
    fitted = {name: round(float(g[i]), 3) for name, g, i in zip(("turn_swing", "nod_swing", "wave_ratio"), grid, pick)}
    print(f"check_prompt rules decide {fixed_hits + hits.max()} of {len(clips)} training clips right: {fitted}")
    return DEFAULT_RULES | fitted


def write_rules(out: Path, rules: dict[str, float]):
    _save(load_file(str(out)), out, rules)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on held-out identities.


def _auc(same: np.ndarray, different: np.ndarray) -> float:
    """ROC AUC: the probability that a same-identity pair scores above a different-identity pair."""
    scores = np.concatenate([same, different])
    ranks = scores.argsort().argsort() + 1.0
    return float((ranks[: len(same)].sum() - len(same) * (len(same) + 1) / 2) / (len(same) * len(different)))


def _verification(same: np.ndarray, different: np.ndarray) -> dict:
    if not len(same) or not len(different):
        return {"pairs": [len(same), len(different)]}
    thresholds = np.unique(np.concatenate([same, different]))
    balanced = [((same >= t).mean() + (different < t).mean()) / 2 for t in thresholds]
    best = int(np.argmax(balanced))
    return {"same_mean": float(same.mean()), "different_mean": float(different.mean()), "auc": _auc(same, different),
            "accuracy": float(balanced[best]), "threshold": float(thresholds[best]),
            "pairs": [len(same), len(different)]}


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def evaluate(backend: MiniFaceBackend, seed: int = 1, identities: int = 200, clips: int = 60,
             clips_per_action: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    ids = [split_identity("test", int(k)) for k in rng.choice(HELDOUT_IDENTITIES, identities, replace=False)]
    degraded = Degradation()  # blur radius 1, noise std 8/255, JPEG quality 50

    # 1. Same vs different identity over random views (poses, lights, scenes, sizes, degradations, references).
    views = np.stack([embedder_view(world.identity(i), rng, fresh=True)[0] for i in ids for _ in range(3)])
    with torch.no_grad():
        embedding = backend.embedder(to_input(views))[0].numpy().reshape(identities, 3, -1)
    same = np.concatenate([(embedding[:, a] * embedding[:, b]).sum(1) for a, b in ((0, 1), (0, 2), (1, 2))])
    pairs = rng.integers(0, identities, (6000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    different = (embedding[pairs[:, 0], rng.integers(0, 3, len(pairs))] *
                 embedding[pairs[:, 1], rng.integers(0, 3, len(pairs))]).sum(1)
    metrics = {"views": _verification(same, different)}

    # 2. The FaceSim protocol: reference photo vs faces detected in clip frames; and the detector on those frames.
    refs = [make_reference(i, 64, seed=seed) for i in ids[:clips]]
    ref_faces = [(backend.detect(r) or [Face(box=(0, 0, 64, 64))])[0] for r in refs]  # no face: the whole image
    ref_embedding = np.stack([backend.embed(r, face) for r, face in zip(refs, ref_faces)])
    for name, damage in (("clean", None), ("degraded", degraded)):
        same, different, ious, marks, pose_errors = [], [], [], [], []
        for k, i in enumerate(ids[:clips]):
            clip = make_clip(i, sample_prompt(seed * 7919 + k, world.identity(i)), seed=seed * 7919 + k)
            frames = clip.frames if damage is None else np.stack([degrade(f, damage, rng) for f in clip.frames])
            faces = backend.analyse(frames)[0]
            ious.extend(_iou(found[0].box, box) if found else 0.0 for found, box in zip(faces, clip.boxes))
            seen = [t for t, found in enumerate(faces) if found]
            if not seen:
                continue
            best = [faces[t][0] for t in seen]
            embedding, _, head = backend.describe(frames[seen], best)
            truth = np.array([[clip.poses[t].yaw, clip.poses[t].pitch] for t in seen])
            pose_errors.extend(np.abs(head - truth))
            heights = clip.boxes[seen, 3] - clip.boxes[seen, 1]
            marks.extend(np.linalg.norm(np.stack([f.landmarks for f in best]) - clip.landmarks[seen], axis=2).mean(1)
                         / heights)
            same.extend(embedding @ ref_embedding[k])
            others = rng.choice([j for j in range(clips) if j != k], 3, replace=False)
            different.extend((embedding @ ref_embedding[others].T).ravel())
        ious = np.array(ious)
        metrics[f"facesim_{name}"] = _verification(np.array(same), np.array(different))
        metrics[f"detector_{name}"] = {"recall_iou50": float((ious >= 0.5).mean()), "mean_iou": float(ious.mean()),
                                       "landmark_error_per_face_height": float(np.mean(marks)),
                                       "yaw_pitch_abs_error": np.mean(pose_errors, 0).round(3).tolist(),
                                       "frames": len(ious)}
    empty = [world.background(str(rng.choice(world.PLACES)), str(rng.choice(world.TIMES)), (64, 64), k)
             for k in range(100)]
    metrics["detector_false_positive_rate_empty"] = float(np.mean([bool(f) for f in backend.analyse(np.stack(empty))[0]]))

    # 3. check_prompt against the ground truth of rendered clips.
    for name in ("clean", "degraded"):
        hits = {"action_ok": [], "place_ok": [], "time_ok": [], "who_ok": []}
        confusion = {}
        for frames, prompt in _action_clips(ids, clips_per_action, seed, rng, degraded=name == "degraded"):
            result = check_prompt(frames, prompt, backend)
            for key, values in hits.items():
                values.append(result[key])
            if not result["action_ok"]:
                wrong = f"{prompt.action}->{result['predicted_action']}"
                confusion[wrong] = confusion.get(wrong, 0) + 1
        metrics[f"check_prompt_{name}"] = {k: float(np.mean(v)) for k, v in hits.items()} | {
            "clips": len(hits["action_ok"]), "action_errors": confusion}
    return metrics


def run(args: argparse.Namespace):
    torch.set_num_threads(1)  # the machine is shared; a data worker renders on the other core
    config = TrainConfig(steps=args.steps, seed=args.seed)
    if args.fit_rules and not args.evaluate_only:
        raise SystemExit("--fit-rules goes with --evaluate-only (training always fits the rules)")
    if not args.evaluate_only:
        train(config, args.work, args.out)
    if not args.evaluate_only or args.fit_rules:
        write_rules(args.out, fit_rules(MiniFaceBackend(args.out)))
    start = time.time()
    backend = MiniFaceBackend(args.out)
    metrics = evaluate(backend)
    info = {"config": asdict(config), "weights_bytes": args.out.stat().st_size, "rules": backend.rules,
            "evaluation_seconds": round(time.time() - start, 1), "metrics": metrics}
    checkpoint, previous = args.work / "checkpoint.pt", args.out.with_suffix(".json")
    if checkpoint.exists():
        info["training_minutes"] = round(torch.load(checkpoint, weights_only=True)["seconds"] / 60, 1)
    elif args.evaluate_only and previous.exists():  # the networks did not change: nor did their training time
        info["training_minutes"] = json.loads(previous.read_text()).get("training_minutes")
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    from standin_mini.cli import train_identity_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_identity_arguments(parser)
    run(parser.parse_args())
