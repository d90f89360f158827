"""The mini world's prompts: a small grammar that can be sampled, printed and parsed back.

    <who> <action> <place> <time>.                     "A woman walks left on a beach at night."
    The camera zooms in on <who> <place> <time>.       (and "zooms out from": the camera actions)
    <who> and <who> <actions> <place> <time>.          "A man and a woman wave on a beach at noon."
    The camera zooms in on <who> and <who> <place> <time>.

`who` is tied to the character (world.Identity.who): "a person" fits everyone; "a man", "a woman" and
"a child" only fit characters drawn that way. The action drives the character's motion over the clip, the
place the background, the time of day the sky and the light (see data.make_clip). Two people (`who_2`) act out
the same action side by side, the first named on the left (data.make_pair_clip), with plural verbs (PLURAL_ACTIONS).

The mini model's tokenizer knows only the words of the one-person grammar (tokenizer.vocabulary, fixed when the
base was trained): in a two-person prompt "and" and the plural verbs ("wave", "turn their heads", ...) are <unk>,
so the base hears both people, the place and the time, but of the verb only what it shares with its singular
("left", "right", "still"). PLURAL_ACTIONS stays out of that vocabulary on purpose: adding words would renumber it.
"""

import re
from dataclasses import dataclass

import numpy as np

from standin_mini.world import PLACES, TIMES, Identity

WHO = {"person": "a person", "man": "a man", "woman": "a woman", "child": "a child"}
ACTIONS = {"walk_left": "walks left", "walk_right": "walks right", "jump": "jumps", "nod": "nods",
           "turn_head": "turns the head", "wave": "waves", "stand_still": "stands still",
           "zoom_in": "the camera zooms in on", "zoom_out": "the camera zooms out from"}
CAMERA_ACTIONS = ("zoom_in", "zoom_out")
PLURAL_ACTIONS = {"walk_left": "walk left", "walk_right": "walk right", "jump": "jump", "nod": "nod",
                  "turn_head": "turn their heads", "wave": "wave", "stand_still": "stand still"}
assert set(PLURAL_ACTIONS) == set(ACTIONS) - set(CAMERA_ACTIONS)
PLACE_PHRASES = {"beach": "on a beach", "forest": "in a forest", "city": "in a city street", "snow": "in the snow",
                 "room": "in a room", "desert": "in the desert"}
TIME_PHRASES = {"morning": "in the morning", "noon": "at noon", "evening": "in the evening", "night": "at night"}
assert tuple(PLACE_PHRASES) == PLACES and tuple(TIME_PHRASES) == TIMES


class PromptError(ValueError):
    """A prompt outside the mini world's grammar."""


@dataclass(frozen=True)
class Prompt:
    who: str
    action: str
    place: str
    time: str
    who_2: str | None = None  # the second person, drawn on the right; None for a one-person prompt

    def __post_init__(self):
        checks = [(self.who, WHO), (self.action, ACTIONS), (self.place, PLACE_PHRASES), (self.time, TIME_PHRASES)]
        if self.who_2 is not None:
            checks.append((self.who_2, WHO))
        for value, options in checks:
            if value not in options:
                raise PromptError(f"{value!r} is not one of {sorted(options)}")

    def __str__(self) -> str:
        people = WHO[self.who] if self.who_2 is None else f"{WHO[self.who]} and {WHO[self.who_2]}"
        setting = f"{PLACE_PHRASES[self.place]} {TIME_PHRASES[self.time]}."
        if self.action in CAMERA_ACTIONS:
            text = f"{ACTIONS[self.action]} {people} {setting}"
        else:
            verbs = ACTIONS if self.who_2 is None else PLURAL_ACTIONS
            text = f"{people} {verbs[self.action]} {setting}"
        return text[0].upper() + text[1:]


def _take(text: str, phrases: dict[str, str], part: str) -> tuple[str, str]:
    """Strips one of `phrases` off the start of `text`; returns (its key, the rest)."""
    for key, phrase in sorted(phrases.items(), key=lambda kv: -len(kv[1])):  # longest first
        if text == phrase or text.startswith(phrase + " "):
            return key, text[len(phrase):].lstrip()
    options = " | ".join(f"'{p}'" for p in phrases.values())
    raise PromptError(f"expected {part} ({options}) at '{text}'")


def _take_people(text: str) -> tuple[str, str | None, str]:
    """Strips "<who>" or "<who> and <who>" off the start of `text`; returns (who, who_2 or None, the rest)."""
    who, rest = _take(text, WHO, "who")
    if not rest.startswith("and "):
        return who, None, rest
    who_2, rest = _take(rest[len("and "):], WHO, "a second who")
    return who, who_2, rest


def parse_prompt(text: str) -> Prompt:
    """The structured prompt of a sentence of the grammar; PromptError says what was expected where."""
    clean = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()
    try:
        camera = {k: ACTIONS[k] for k in CAMERA_ACTIONS}
        if clean.startswith("the camera"):
            action, rest = _take(clean, camera, "a camera action")
            who, who_2, rest = _take_people(rest)
        else:
            who, who_2, rest = _take_people(clean)
            verbs = {k: v for k, v in ACTIONS.items() if k not in CAMERA_ACTIONS} if who_2 is None else PLURAL_ACTIONS
            action, rest = _take(rest, verbs, "an action" if who_2 is None else "an action of two")
        place, rest = _take(rest, PLACE_PHRASES, "a place")
        time, rest = _take(rest, TIME_PHRASES, "a time of day")
        if rest:
            raise PromptError(f"unexpected words at the end: '{rest}'")
    except PromptError as error:
        raise PromptError(f"{text!r} is not a mini-world prompt: {error}. "
                          f"Example: 'A woman walks left on a beach at night.'") from None
    return Prompt(who=who, action=action, place=place, time=time, who_2=who_2)


# Held-out prompt combinations: one (action, place, time) triple in six, spread so that every action, place and
# time still occurs in training, only never in these combinations. 36 of the 216 triples.
def prompt_split(prompt: Prompt) -> str:
    """'test' for held-out (action, place, time) combinations, else 'train'."""
    a, p, t = list(ACTIONS).index(prompt.action), PLACES.index(prompt.place), TIMES.index(prompt.time)
    return "test" if (a + 2 * p + 3 * t) % 6 == 0 else "train"


def sample_prompt(seed: int, ident: Identity | None = None, split: str | None = None) -> Prompt:
    """A random prompt, deterministic in `seed`: fitting `ident`'s looks if given, from `split` if given."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    rng = np.random.default_rng([seed, 7])
    while True:
        who = _fitting_who(ident, rng)
        prompt = Prompt(who=who, action=str(rng.choice(list(ACTIONS))), place=str(rng.choice(PLACES)),
                        time=str(rng.choice(TIMES)))
        if split is None or prompt_split(prompt) == split:
            return prompt


def sample_pair_prompt(seed: int, ident: Identity, ident_2: Identity, split: str | None = None) -> Prompt:
    """A random two-person prompt, deterministic in `seed`: its who words fitting `ident` (left) and `ident_2`
    (right), its (action, place, time) from `split` if given (the one-person split: prompt_split)."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    rng = np.random.default_rng([seed, 8])
    while True:
        who, who_2 = _fitting_who(ident, rng), _fitting_who(ident_2, rng)
        prompt = Prompt(who=who, action=str(rng.choice(list(ACTIONS))), place=str(rng.choice(PLACES)),
                        time=str(rng.choice(TIMES)), who_2=who_2)
        if split is None or prompt_split(prompt) == split:
            return prompt


def _fitting_who(ident: Identity | None, rng: np.random.Generator) -> str:
    """'a person' fits anyone; the identity's own noun (man, woman, child) 70% of the time when it has one."""
    return "person" if ident is None or ident.who == "person" or rng.random() < 0.3 else ident.who
