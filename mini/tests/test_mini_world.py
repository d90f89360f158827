"""The mini world: identities, rendering, prompts, clips, references, splits and the dataset."""

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from standin_mini import world
from standin_mini.data import (
    HELDOUT_IDENTITIES,
    MiniClipDataset,
    crop_reference,
    identity_split,
    make_clip,
    make_reference,
    split_identity,
)
from standin_mini.prompts import ACTIONS, Prompt, PromptError, parse_prompt, prompt_split, sample_prompt


def _frontal(ident, size=64):
    return world.render(ident, world.Pose(scale=0.45), world.Light(), None, (size, size))


# ---------------------------------------------------------------------------------------------------------------
# Identities and rendering.


def test_identity_count_is_the_attribute_arithmetic():
    counts = {name: len(options) for name, options in world.ATTRIBUTES.items()}
    assert world.NUM_IDENTITIES == math.prod(counts.values()) > 10**9
    # coarse attributes only; no hat, no sunglasses, bald counted once whatever its hair colour
    by_hand = 2 * 5 * 6 * (7 * 8 + 1) * 4 * 3 * 8
    assert world.distinguishable_count() == by_hand == 328_320
    assert by_hand > 100_000


def test_ids_decode_deterministically_to_distinct_attributes():
    ids = list(range(3000)) + [world.NUM_IDENTITIES - 1 - k for k in range(3000)]
    tuples = {tuple(world.identity(i).attribute_indices().values()) for i in ids}
    assert len(tuples) == len(ids)
    assert world.identity(123) == world.identity(123)
    # neighbouring ids are scattered: they differ in many attributes, not just the last digit
    differing = [sum(a != b for a, b in zip(world.identity(i).attribute_indices().values(),
                                            world.identity(i + 1).attribute_indices().values())) for i in range(200)]
    assert np.mean(differing) > 8
    with pytest.raises(ValueError):
        world.identity(world.NUM_IDENTITIES)


def test_same_id_renders_identically_and_different_ids_differ():
    a, b = _frontal(world.identity(7)).image, _frontal(world.identity(7)).image
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    others = [_frontal(world.identity(i)).image for i in range(8, 40)]
    assert min(np.abs(a.astype(int) - o).mean() for o in others) > 3


@pytest.mark.parametrize("attribute, options", [
    ("age", ["adult", "child"]), ("head", list(world.ATTRIBUTES["head"])), ("skin", list(world.ATTRIBUTES["skin"])),
    ("hair_style", list(world.ATTRIBUTES["hair_style"])), ("hair_colour", list(world.ATTRIBUTES["hair_colour"])),
    ("face_detail", list(world.ATTRIBUTES["face_detail"])), ("glasses", ["none", "round", "square"]),
    ("shirt", list(world.ATTRIBUTES["shirt"]))])
def test_every_coarse_attribute_option_looks_different(attribute, options):
    base = dataclasses.replace(world.identity(11), hat="none", glasses="none", hair_style="crop", age="adult")
    images = [_frontal(dataclasses.replace(base, **{attribute: o})).image.astype(int) for o in options]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            changed = np.abs(images[i] - images[j]).sum(-1) > 30
            assert changed.sum() >= 6, f"{attribute}: {options[i]} vs {options[j]} differ in {changed.sum()} pixels"


def test_render_ground_truth_follows_the_pose():
    ident = world.identity(5)
    centre = world.render(ident, world.Pose(x=0.5, y=0.5, scale=0.4), size=(80, 64))
    assert centre.image.shape == (80, 64, 3) and centre.mask.shape == (80, 64)
    x0, y0, x1, y1 = centre.box
    assert abs((y1 - y0) - 0.4 * 80) < 1 and abs((x0 + x1) / 2 - 32) < 1 and abs((y0 + y1) / 2 - 40) < 1
    marks = centre.landmarks
    assert marks[0, 0] < marks[2, 0] < marks[1, 0] and marks[3, 0] < marks[4, 0]  # left eye, nose, right eye
    assert marks[0, 1] < marks[2, 1] < marks[3, 1]  # eyes above the nose above the mouth
    assert ((marks >= [x0, y0]) & (marks <= [x1, y1])).all()
    assert centre.mask.min() == 0 and centre.mask.max() == 1
    turned = world.render(ident, world.Pose(x=0.5, y=0.5, scale=0.4, yaw=0.9), size=(80, 64))
    assert turned.landmarks[2, 0] - (turned.box[0] + turned.box[2]) / 2 > 3  # the nose moves with the turn
    assert turned.box[2] - turned.box[0] < x1 - x0  # and the face narrows
    nodding = world.render(ident, world.Pose(x=0.5, y=0.5, scale=0.4, pitch=1.0), size=(80, 64))
    assert nodding.landmarks[:, 1].mean() - marks[:, 1].mean() > 3


def test_light_and_background():
    ident = world.identity(9)
    scene = world.background("beach", "noon", (64, 64), seed=1)
    np.testing.assert_array_equal(scene, world.background("beach", "noon", (64, 64), seed=1))
    bright = world.render(ident, world.Pose(), world.DAYLIGHT["noon"], scene).image
    dark = world.render(ident, world.Pose(), world.DAYLIGHT["night"], scene).image
    assert bright.mean() > dark.mean() + 20
    lit_left = world.render(ident, world.Pose(), world.Light(direction=-1, strength=0.5), None).image.astype(int)
    lit_right = world.render(ident, world.Pose(), world.Light(direction=1, strength=0.5), None).image.astype(int)
    assert lit_left[:, :32].sum() > lit_right[:, :32].sum() and lit_right[:, 32:].sum() > lit_left[:, 32:].sum()
    # each place has its own palette: mean colours of the six places are far apart
    means = np.array([[world.background(p, "noon", (64, 64), s).reshape(-1, 3).mean(0) for s in range(3)]
                      for p in world.PLACES]).mean(1)
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(len(means)) * 1e3
    assert gaps.min() > 12


def test_a_clip_renders_fast():
    prompt = Prompt("person", "walk_left", "city", "evening")
    make_clip(10_001, prompt)
    start = time.perf_counter()
    for seed in range(3):
        make_clip(10_001, prompt, seed=seed)
    assert (time.perf_counter() - start) / 3 < 0.2  # about 20 ms on one core; generous for a shared CI box


# ---------------------------------------------------------------------------------------------------------------
# Prompts.


def test_prompts_round_trip_through_the_parser():
    for seed in range(300):
        prompt = sample_prompt(seed)
        assert parse_prompt(str(prompt)) == prompt
    assert parse_prompt("  the CAMERA zooms in on a child   in the snow at night ") == Prompt("child", "zoom_in",
                                                                                               "snow", "night")
    assert str(Prompt("woman", "walk_left", "beach", "night")) == "A woman walks left on a beach at night."


@pytest.mark.parametrize("text, expected", [
    ("A dog walks left on a beach at night.", "who"),
    ("A man flies on a beach at night.", "an action"),
    ("A man walks left on the moon at night.", "a place"),
    ("A man walks left on a beach", "a time of day"),
    ("A man walks left on a beach at night and sings.", "unexpected words"),
    ("", "who"),
])
def test_the_grammar_rejects_garbage_and_says_why(text, expected):
    with pytest.raises(PromptError, match=expected):
        parse_prompt(text)


def test_sampled_prompts_fit_the_identity_and_the_split():
    child = next(world.identity(i) for i in range(100) if world.identity(i).who == "child")
    assert {sample_prompt(s, child).who for s in range(50)} == {"person", "child"}
    splits = [prompt_split(Prompt("person", a, p, t)) for a in ACTIONS for p in world.PLACES for t in world.TIMES]
    assert splits.count("test") == 36
    for action in ACTIONS:  # every action still occurs in training, some of its combinations only in test
        assert {prompt_split(Prompt("person", action, p, t)) for p in world.PLACES for t in world.TIMES} == {
            "train", "test"}
    assert all(prompt_split(sample_prompt(s, split="test")) == "test" for s in range(30))
    with pytest.raises(ValueError, match="drawn as"):
        make_clip(child.id, Prompt("man", "jump", "room", "noon"))


# ---------------------------------------------------------------------------------------------------------------
# Clips follow their prompt.


def _clip(action, seed=0):
    return make_clip(10_500, Prompt("person", action, "forest", "noon"), seed=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_clip_follows_its_action(seed):
    def centre_x(c):
        return (c.boxes[:, 0] + c.boxes[:, 2]) / 2

    def height(c):
        return c.boxes[:, 3] - c.boxes[:, 1]

    left, right = _clip("walk_left", seed), _clip("walk_right", seed)
    assert np.all(np.diff(centre_x(left)) < 0) and centre_x(left)[0] - centre_x(left)[-1] > 0.3 * 64
    assert np.all(np.diff(centre_x(right)) > 0) and centre_x(right)[-1] - centre_x(right)[0] > 0.3 * 64
    zoom_in, zoom_out = _clip("zoom_in", seed), _clip("zoom_out", seed)
    assert np.all(np.diff(height(zoom_in)) >= 0) and height(zoom_in)[-1] > 1.6 * height(zoom_in)[0]
    assert np.all(np.diff(height(zoom_out)) <= 0) and height(zoom_out)[0] > 1.6 * height(zoom_out)[-1]
    jump = _clip("jump", seed)
    top = (jump.boxes[:, 1] + jump.boxes[:, 3]) / 2
    assert top[0] - top.min() > 0.14 * 64 and abs(top[0] - top[-1]) < 1
    turn = _clip("turn_head", seed)
    nose = turn.landmarks[:, 2, 0] - centre_x(turn)
    assert nose.max() > 2 and nose.min() < -2
    nod = _clip("nod", seed)
    eyes = nod.landmarks[:, :2, 1].mean(1) - nod.boxes[:, 1]
    assert eyes.max() - eyes.min() > 2.5 and centre_x(nod).std() < 0.5
    wave, still = _clip("wave", seed), _clip("stand_still", seed)
    beside = lambda c: c.masks[:, :, 44:].std(0).mean()  # the hand moves on the image's right
    assert beside(wave) > 5 * beside(still) + 0.01
    assert np.abs(still.boxes - still.boxes[0]).max() < 1


def test_a_clip_is_deterministic_and_its_prompt_drives_the_scene():
    a = make_clip(10_042, "A person stands still in the snow at noon.", seed=3)
    b = make_clip(10_042, "A person stands still in the snow at noon.", seed=3)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.shape == (17, 64, 64, 3) and a.boxes.shape == (17, 4) and a.landmarks.shape == (17, 5, 2)
    night = make_clip(10_042, "A person stands still in the snow at night.", seed=3)
    forest = make_clip(10_042, "A person stands still in a forest at noon.", seed=3)
    assert a.frames.mean() > night.frames.mean() + 30
    assert a.frames[:, :, :, 1].mean() - forest.frames[:, :, :, 1].mean() > 40  # snow is white, forest dark green
    small = make_clip(10_042, "A person jumps in a room in the morning.", num_frames=5, size=(96, 128))
    assert small.frames.shape == (5, 96, 128, 3)


# ---------------------------------------------------------------------------------------------------------------
# References.


def test_reference_is_the_same_identity_on_white_but_never_a_clip_frame():
    identity_id = 10_321
    reference = make_reference(identity_id, 64, seed=4)
    assert reference.shape == (64, 64, 3) and reference.dtype == np.uint8
    np.testing.assert_array_equal(reference, make_reference(identity_id, 64, seed=4))
    white = (reference == 255).all(-1)
    assert white[0].all() and white[:, 0].all() and white.mean() > 0.2  # background painted white
    clip = make_clip(identity_id, sample_prompt(4, world.identity(identity_id)), seed=4)
    for frame, box, mask in zip(clip.frames, clip.boxes, clip.masks):
        frame_crop = crop_reference(frame, box, 64, mask)
        assert np.abs(frame_crop.astype(int) - reference).mean() > 3
    assert np.abs(make_reference(identity_id, 64, seed=5).astype(int) - reference).mean() > 3  # a new photo per seed


def test_crop_reference_follows_the_spec():
    image = np.zeros((100, 100, 3), np.uint8)
    crop = crop_reference(image, (40, 40, 60, 70), 64)  # 30 px tall box -> a 45 px square around its centre
    assert crop.shape == (64, 64, 3) and (crop == 0).all()
    edge = crop_reference(image, (0, 40, 20, 60), 60)  # the square sticks out on the left: white there
    assert (edge[:, :10] == 255).all() and (edge[:, 25:] == 0).all()
    mask = np.zeros((100, 100), np.float32)
    mask[45:65, 45:55] = 1
    painted = crop_reference(image, (40, 40, 60, 70), 64, mask)
    assert (painted[0] == 255).all() and (painted[32, 32] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Splits and the dataset.


def test_identity_splits():
    assert identity_split(0) == identity_split(HELDOUT_IDENTITIES - 1) == "test"
    assert identity_split(HELDOUT_IDENTITIES) == "train"
    assert split_identity("train", 0) == HELDOUT_IDENTITIES and split_identity("test", 5) == 5
    with pytest.raises(ValueError):
        split_identity("test", HELDOUT_IDENTITIES)


def test_dataset_items_have_the_layout_and_are_deterministic():
    data = MiniClipDataset("train", length=4, num_frames=9, size=(64, 64), reference_size=48, num_identities=3)
    item = data[1]
    assert item["video"].shape == (3, 9, 64, 64) and item["video"].dtype == torch.float32
    assert item["reference"].shape == (3, 1, 48, 48)
    for key in ("video", "reference"):
        assert -1 <= item[key].min() < 0 < item[key].max() <= 1
    assert item["reference"].max() == 1  # the white background
    assert torch.equal(item["video"], data[1]["video"]) and item["prompt"] == data[1]["prompt"]
    assert not torch.equal(item["video"], data[2]["video"])
    prompt = parse_prompt(item["prompt"])
    assert prompt.who in ("person", world.identity(item["identity"]).who)
    assert prompt_split(prompt) == "train" and identity_split(item["identity"]) == "train"
    assert {data[i]["identity"] for i in range(4)} <= {split_identity("train", k) for k in range(3)}
    test = MiniClipDataset("test", length=3, num_frames=5)
    assert all(identity_split(test[i]["identity"]) == "test" and prompt_split(parse_prompt(test[i]["prompt"])) ==
               "test" for i in range(3))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    assert batch["video"].shape == (2, 3, 9, 64, 64) and len(batch["prompt"]) == 2
