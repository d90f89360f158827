"""Two people in one clip: the grammar, the render, and the face matching of the pair evaluation."""

import numpy as np
import pytest

from standin_mini import world
from standin_mini.data import make_clip, make_pair_clip
from standin_mini.pair_eval import clip_scores, contact_sheet, match_faces, summarize
from standin_mini.prompts import ACTIONS, Prompt, PromptError, parse_prompt, prompt_split, sample_pair_prompt
from standin_mini.tokenizer import mini_tokenizer, vocabulary


def _ids(who: str, count: int = 2) -> list[int]:
    return [i for i in range(10_000, 10_400) if world.identity(i).who == who][:count]


# ---------------------------------------------------------------------------------------------------------------
# Grammar.


def test_pair_prompts_round_trip_and_keep_one_person_prompts_as_they_were():
    pair = Prompt("man", "wave", "beach", "noon", who_2="woman")
    assert str(pair) == "A man and a woman wave on a beach at noon."
    assert parse_prompt("A man and a woman wave on a beach at noon.") == pair
    assert str(Prompt("child", "turn_head", "snow", "night", "person")) == \
        "A child and a person turn their heads in the snow at night."
    assert parse_prompt("the camera zooms in on a man and  a child in a room in the morning") == Prompt(
        "man", "zoom_in", "room", "morning", who_2="child")
    assert str(Prompt("woman", "walk_left", "beach", "night")) == "A woman walks left on a beach at night."
    assert parse_prompt("A woman walks left on a beach at night.").who_2 is None
    ident, ident_2 = world.identity(10_001), world.identity(10_002)
    for seed in range(200):
        prompt = sample_pair_prompt(seed, ident, ident_2)
        assert parse_prompt(str(prompt)) == prompt
        assert prompt.who in ("person", ident.who) and prompt.who_2 in ("person", ident_2.who)
    assert all(prompt_split(sample_pair_prompt(s, ident, ident_2, "test")) == "test" for s in range(20))


@pytest.mark.parametrize("text, expected", [
    ("A man and a woman waves on a beach at noon.", "an action of two"),  # a singular verb for two
    ("A man waves and a woman on a beach at noon.", "a place"),
    ("A man wave on a beach at noon.", "an action"),  # a plural verb for one
    ("A man and a dog wave on a beach at noon.", "a second who"),
    ("A man and wave on a beach at noon.", "a second who"),
    ("The camera zooms in on a man and in the snow at night.", "a second who"),
])
def test_bad_pair_prompts_say_why(text, expected):
    with pytest.raises(PromptError, match=expected):
        parse_prompt(text)


def test_the_mini_tokenizer_keeps_its_vocabulary_and_reads_unknown_pair_words_as_unk():
    assert "and" not in vocabulary() and "wave" not in vocabulary()
    tokenizer = mini_tokenizer()
    words = "a man and a woman wave on a beach at noon .".split()
    ids = tokenizer("A man and a woman wave on a beach at noon.")["input_ids"]
    unk, eos = tokenizer.convert_tokens_to_ids(["<unk>", "</s>"])
    assert ids[-1] == eos and [w for w, i in zip(words, ids) if i == unk] == ["and", "wave"]


# ---------------------------------------------------------------------------------------------------------------
# Rendering two people.


def test_a_pair_clip_puts_each_person_on_its_side_apart_and_is_deterministic():
    left, right = _ids("man", 1)[0], _ids("woman", 1)[0]
    for action in ACTIONS:
        clip = make_pair_clip(left, right, Prompt("man", action, "forest", "noon", who_2="woman"), seed=1)
        assert clip.frames.shape == (17, 64, 64, 3) and clip.boxes.shape == (17, 2, 4)
        assert clip.landmarks.shape == (17, 2, 5, 2) and clip.masks.shape == (17, 2, 64, 64)
        centres = (clip.boxes[..., 0] + clip.boxes[..., 2]) / 2
        assert np.all(centres[:, 0] + 12 < centres[:, 1]), action  # the first named is on the left
        assert np.all(clip.boxes[..., 0] > -1) and np.all(clip.boxes[..., 2] < 65), action  # faces in the frame
        assert (clip.masks[:, 0] * clip.masks[:, 1]).max() < 1e-3, action  # never overlapping, waving included
        assert clip.masks[:, 0].sum((1, 2)).min() > 30 and clip.masks[:, 1].sum((1, 2)).min() > 30
    walk = make_pair_clip(left, right, "A man and a woman walk right on a beach at noon.", seed=2)
    travel = np.diff(walk.boxes[[0, -1], :, 0], axis=0)[0]
    assert np.all(travel > 6), travel  # both walk right
    again = make_pair_clip(left, right, "A man and a woman walk right on a beach at noon.", seed=2)
    np.testing.assert_array_equal(walk.frames, again.frames)


def test_pair_clips_check_who_fits_and_which_maker_draws_what():
    man, woman = _ids("man", 1)[0], _ids("woman", 1)[0]
    make_pair_clip(man, woman, "A person and a person nod in a room at noon.", num_frames=2)
    with pytest.raises(ValueError, match="drawn as"):
        make_pair_clip(woman, man, "A man and a woman nod in a room at noon.", num_frames=2)
    with pytest.raises(ValueError, match="make_pair_clip"):
        make_clip(man, "A man and a woman nod in a room at noon.")
    with pytest.raises(ValueError, match="make_clip"):
        make_pair_clip(man, woman, "A man nods in a room at noon.")


def test_render_group_hides_what_is_behind():
    a, b = world.identity(10_003), world.identity(10_004)
    alone = world.render(a, world.Pose(x=0.5), size=(64, 64))
    behind, front = world.render_group([a, b], [world.Pose(x=0.5), world.Pose(x=0.55)], size=(64, 64))
    np.testing.assert_array_equal(behind.image, front.image)
    np.testing.assert_array_equal(behind.box, alone.box)
    assert behind.mask.sum() < 0.5 * alone.mask.sum()  # mostly covered by the one in front
    assert (behind.mask + front.mask).max() <= 1 + 1e-5  # what is visible of the two covers a pixel at most once


def test_the_face_model_finds_both_people_where_they_are():
    from standin_mini.identity import default_backend

    backend = default_backend()
    man, woman = _ids("man", 1)[0], _ids("woman", 1)[0]
    found = []
    for seed, action in enumerate(("wave", "walk_left", "zoom_in", "turn_head")):
        clip = make_pair_clip(man, woman, Prompt("man", action, "city", "evening", who_2="woman"), seed=seed)
        for faces, boxes in zip(backend.analyse(clip.frames)[0], clip.boxes):
            centres = [np.array(face.box).reshape(2, 2).mean(0) for face in faces]
            truth = boxes.reshape(2, 2, 2).mean(1)
            found.append(all(any(np.abs(c - t).max() < 4 for c in centres) for t in truth))
    assert np.mean(found) > 0.8


# ---------------------------------------------------------------------------------------------------------------
# The pair evaluation's matching and scores.


def test_matching_maximises_total_similarity_one_to_one():
    # Greedy would give reference 0 face 0 (0.9) and leave reference 1 with 0.1; the assignment swaps them.
    assert match_faces(np.array([[0.9, 0.8], [0.7, 0.1]])) == [1, 0]
    assert match_faces(np.array([[0.2, 0.5]])) == [None, 0]  # one face: the reference it is closer to
    assert match_faces(np.zeros((0, 2))) == [None, None]
    assert match_faces(np.array([[0.1, 0.0], [0.9, 0.2], [0.0, 0.8]])) == [1, 2]


def test_clip_scores_and_summary():
    # frame 0: A on the left (x 10), B on the right; frame 1: swapped; frame 2: only A; frame 3: no face
    matches = [[(0.8, 10.0), (0.6, 50.0)], [(0.4, 50.0), (0.2, 10.0)], [(0.6, 30.0), None], [None, None]]
    scores = clip_scores(matches, [2, 2, 1, 0])
    assert scores["face_sim_A"] == pytest.approx(0.6) and scores["face_sim_B"] == pytest.approx(0.4)
    assert scores["face_rate_A"] == 0.75 and scores["face_rate_B"] == 0.5
    assert scores["swap"] == 0.5 and scores["both_frames"] == 2 and scores["two_faces"] == 0.5
    base = clip_scores([[(0.1, 10.0), None]] * 4, [1] * 4)
    summary = summarize([scores, scores], [base, base])
    assert summary["gain_A"] == pytest.approx(0.5) and summary["gain_B"] is None
    assert summary["swap"] == 0.5 and summary["swap_ci95"] == 0.0 and summary["swap_frames"] == 4
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    sheet = contact_sheet([{"reference_a": frames[0], "reference_b": frames[0], "prompt": "A man and a man nod.",
                            "rows": {"world": (frames, matches), "A + B": (frames, matches)}}])
    assert sheet.width == 90 + 6 * 128 and sheet.height == 3 * 128 + 8


def test_clip_command_draws_two_people_with_both_references(tmp_path, capsys):
    from standin.cli import main

    out = tmp_path / "two.mp4"
    prompt = "A man and a woman wave on a beach at noon."
    assert main(["mini", "clip", prompt, "--identity", "2", "--identity-2", "34", "--frames", "3",
                 "--out", str(out)]) == 0  # examples/man_2.png, examples/woman_34.png
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.mp4", "two.reference-1.png", "two.reference-2.png"]
    capsys.readouterr()
    assert main(["mini", "clip", prompt, "--identity", "2", "--out", str(tmp_path / "one.mp4")]) == 1
    assert main(["mini", "check", str(out), prompt]) == 1
    err = capsys.readouterr().err
    assert "--identity-2" in err and "two people" in err and "Traceback" not in err
