"""The mini world's prompts: a small grammar that can be sampled, printed and parsed back.

    <who> <action> <place> <time>.                     "A woman walks left on a beach at night."
    The camera zooms in on <who> <place> <time>.       (and "zooms out from": the camera actions)

`who` is tied to the character (world.Identity.who): "a person" fits everyone; "a man", "a woman" and
"a child" only fit characters drawn that way. The action drives the character's motion over the clip, the
place the background, the time of day the sky and the light (see data.make_clip).
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

    def __post_init__(self):
        for value, options in ((self.who, WHO), (self.action, ACTIONS), (self.place, PLACE_PHRASES),
                               (self.time, TIME_PHRASES)):
            if value not in options:
                raise PromptError(f"{value!r} is not one of {sorted(options)}")

    def __str__(self) -> str:
        if self.action in CAMERA_ACTIONS:
            text = f"{ACTIONS[self.action]} {WHO[self.who]} {PLACE_PHRASES[self.place]} {TIME_PHRASES[self.time]}."
        else:
            text = f"{WHO[self.who]} {ACTIONS[self.action]} {PLACE_PHRASES[self.place]} {TIME_PHRASES[self.time]}."
        return text[0].upper() + text[1:]


def _take(text: str, phrases: dict[str, str], part: str) -> tuple[str, str]:
    """Strips one of `phrases` off the start of `text`; returns (its key, the rest)."""
    for key, phrase in sorted(phrases.items(), key=lambda kv: -len(kv[1])):  # longest first
        if text == phrase or text.startswith(phrase + " "):
            return key, text[len(phrase):].lstrip()
    options = " | ".join(f"'{p}'" for p in phrases.values())
    raise PromptError(f"expected {part} ({options}) at '{text}'")


def parse_prompt(text: str) -> Prompt:
    """The structured prompt of a sentence of the grammar; PromptError says what was expected where."""
    clean = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()
    try:
        camera = {k: ACTIONS[k] for k in CAMERA_ACTIONS}
        if clean.startswith("the camera"):
            action, rest = _take(clean, camera, "a camera action")
            who, rest = _take(rest, WHO, "who")
        else:
            who, rest = _take(clean, WHO, "who")
            action, rest = _take(rest, {k: v for k, v in ACTIONS.items() if k not in CAMERA_ACTIONS}, "an action")
        place, rest = _take(rest, PLACE_PHRASES, "a place")
        time, rest = _take(rest, TIME_PHRASES, "a time of day")
        if rest:
            raise PromptError(f"unexpected words at the end: '{rest}'")
    except PromptError as error:
        raise PromptError(f"{text!r} is not a mini-world prompt: {error}. "
                          f"Example: 'A woman walks left on a beach at night.'") from None
    return Prompt(who=who, action=action, place=place, time=time)


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
        who = "person" if ident is None or ident.who == "person" or rng.random() < 0.3 else ident.who
        prompt = Prompt(who=who, action=str(rng.choice(list(ACTIONS))), place=str(rng.choice(PLACES)),
                        time=str(rng.choice(TIMES)))
        if split is None or prompt_split(prompt) == split:
            return prompt
