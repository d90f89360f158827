"""The mini world's face model: the shipped weights on held-out identities, check_prompt, resumable training."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from standin.faces.base import Face
from standin_mini import world
from standin_mini.data import Degradation, degrade, make_clip, make_reference, split_identity
from standin_mini.identity import DEFAULT_RULES, DEFAULT_WEIGHTS, EMBED_DIM, MiniFaceBackend, check_prompt, to_input
from standin_mini.prompts import ACTIONS, Prompt, sample_prompt
from standin_mini.train_identity import TrainConfig, embedder_view, train, write_rules


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backend():
    return MiniFaceBackend()


def test_shipped_weights_are_small_and_load_without_arguments(backend):
    assert DEFAULT_WEIGHTS.stat().st_size < 5e6 and DEFAULT_WEIGHTS.with_suffix(".json").exists()
    assert backend.name == "mini"
    image = make_reference(3, 64)
    faces = backend.detect(image)
    assert len(faces) == 1 and isinstance(faces[0], Face) and faces[0].landmarks.shape == (5, 2)
    embedding = backend.embed(image, faces[0])
    assert embedding.dtype == np.float32 and embedding.shape == (EMBED_DIM,)
    assert abs(np.linalg.norm(embedding) - 1) < 1e-5


def test_held_out_identities_separate(backend):
    rng = np.random.default_rng(0)
    ids = [split_identity("test", k) for k in range(12)]
    views = np.stack([embedder_view(world.identity(i), rng, fresh=True)[0] for i in ids for _ in range(3)])
    with torch.no_grad():
        e = backend.embedder(to_input(views))[0].numpy().reshape(len(ids), 3, -1)
    cos = np.einsum("avd,bwd->abvw", e, e)
    same = np.concatenate([cos[i, i][np.triu_indices(3, 1)] for i in range(len(ids))])
    different = np.concatenate([cos[i, j].ravel() for i in range(len(ids)) for j in range(len(ids)) if i != j])
    assert same.mean() - different.mean() > 0.4
    assert (same[:, None] > different[None]).mean() > 0.95  # ROC AUC


def test_reference_matches_its_identity_in_clip_frames(backend):
    """The FaceSim protocol on ground truth: reference vs faces detected in a clip of the same / another identity."""
    ids = [split_identity("test", k) for k in range(20, 26)]
    references = []
    for i in ids:
        reference = make_reference(i, 64, seed=1)
        references.append(backend.embed(reference, backend.detect(reference)[0]))
    scores = np.zeros((len(ids), len(ids)))
    for a, i in enumerate(ids):
        clip = make_clip(i, sample_prompt(a, world.identity(i)), num_frames=5, seed=a)
        frames = [(frame, backend.detect(frame)) for frame in clip.frames]
        faces = np.stack([backend.embed(frame, found[0]) for frame, found in frames if found])
        scores[a] = (faces @ np.stack(references).T).mean(0)
    assert (scores.argmax(1) == np.arange(len(ids))).all()
    assert np.diag(scores).mean() - scores[~np.eye(len(ids), dtype=bool)].mean() > 0.3


@pytest.mark.parametrize("damage", [None, Degradation(blur=1.0, noise=8.0, jpeg=50)])
def test_detector_finds_faces_in_clean_and_degraded_frames(backend, damage):
    rng = np.random.default_rng(1)
    ious = []
    for k in range(8):
        i = split_identity("test", 100 + k)
        clip = make_clip(i, sample_prompt(k, world.identity(i)), num_frames=4, seed=k)
        for frame, box in zip(clip.frames, clip.boxes):
            found = backend.detect(frame if damage is None else degrade(frame, damage, rng))
            if not found:
                ious.append(0.0)
                continue
            (x0, y0, x1, y1), (a0, b0, a1, b1) = found[0].box, box
            inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
            ious.append(inter / ((x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter))
    assert np.mean(np.array(ious) > 0.5) >= 0.9 and np.mean(ious) > 0.6
    empty = world.background("city", "noon", (64, 64), seed=5)
    assert backend.detect(empty) == []


def test_check_prompt_agrees_with_rendered_clips(backend):
    ok = {"action_ok": 0, "place_ok": 0, "time_ok": 0, "who_ok": 0}
    for a, action in enumerate(ACTIONS):
        i = split_identity("test", 200 + a)
        drawn = sample_prompt(a, world.identity(i))
        prompt = Prompt(drawn.who, action, drawn.place, drawn.time)
        result = check_prompt(make_clip(i, prompt, seed=a).frames, prompt, backend)
        for key in ok:
            ok[key] += result[key]
    assert ok["action_ok"] >= len(ACTIONS) - 1 and ok["place_ok"] >= len(ACTIONS) - 1
    assert ok["time_ok"] >= len(ACTIONS) - 1 and ok["who_ok"] >= len(ACTIONS) - 2
    # and it catches a clip that shows something else
    clip = make_clip(split_identity("test", 300), "A person walks left on a beach at noon.")
    wrong = check_prompt(clip.frames, "A person walks right in the snow at night.", backend)
    assert not (wrong["action_ok"] or wrong["place_ok"] or wrong["time_ok"])


def test_training_resumes_exactly(tmp_path: Path):
    config = TrainConfig(steps=4, detector_batch=3, embedder_identities=2, warmup=2, checkpoint_every=2,
                         log_every=1, workers=0)
    straight = train(config, tmp_path / "straight", tmp_path / "straight.safetensors")
    train(config, tmp_path / "resumed", stop_after=2)  # "killed" right after its step-2 checkpoint
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = train(config, tmp_path / "resumed", tmp_path / "resumed.safetensors")
    for a, b in zip(straight, resumed):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    first, second = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert "resumed at step 2" in (tmp_path / "resumed" / "train.log").read_text()
    write_rules(tmp_path / "resumed.safetensors", DEFAULT_RULES | {"nod_swing": 0.123})  # fitted check_prompt rules
    assert MiniFaceBackend(tmp_path / "resumed.safetensors").rules["nod_swing"] == 0.123
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig(steps=5, workers=0), tmp_path / "resumed")
