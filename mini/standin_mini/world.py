"""The mini world's people and scenery, drawn procedurally with PIL.

Every integer id in [0, NUM_IDENTITIES) decodes to its own tuple of discrete attributes (head shape, skin,
hair, eyes, brows, nose, mouth, facial detail, make-up, glasses, hat, shirt). `render` draws that character
at any position, scale, head turn, nod and expression, under a light, onto a background, at any output size,
and returns the ground truth with the pixels: the face box, five landmarks and the character's coverage mask.

Drawing happens on a supersampled RGBA canvas (PIL's reduce() is the anti-aliasing), so a 64x64 frame costs
about a millisecond. All geometry is in units of the face's half-height `r` around the face centre, with y
pointing down, so a character looks the same at every size.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Attribute -> options. The order of attributes and options defines how ids decode: never reorder.
ATTRIBUTES = {
    "age": ("adult", "child"),
    "head": ("round", "oval", "long", "square", "heart"),
    "skin": ("porcelain", "light", "tan", "olive", "brown", "deep"),
    "hair_style": ("bald", "crop", "side_part", "bob", "long", "spiky", "curly", "bun"),
    "hair_colour": ("black", "dark_brown", "chestnut", "blonde", "ginger", "grey", "blue", "pink"),
    "eye_shape": ("round", "almond", "narrow"),
    "eye_colour": ("brown", "blue", "green", "grey"),
    "eye_spacing": ("close", "medium", "wide"),
    "brows": ("thin", "thick", "arched", "angled"),
    "nose": ("button", "triangle", "long", "wide"),
    "mouth": ("small", "medium", "wide"),
    # drawn as none / moustache / beard / goatee on adults, none / freckles / rosy cheeks / both on children
    "face_detail": ("none", "detail_1", "detail_2", "detail_3"),
    "makeup": ("none", "lashes"),  # eyeliner and coloured lips
    "glasses": ("none", "round", "square", "sunglasses"),
    "hat": ("none", "cap", "beanie", "top_hat"),
    "hat_colour": ("red", "navy", "black", "beige"),
    "shirt": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
}
ADULT_DETAILS = ("none", "moustache", "beard", "goatee")
CHILD_DETAILS = ("none", "freckles", "rosy_cheeks", "freckles_and_cheeks")

NUM_IDENTITIES = math.prod(len(options) for options in ATTRIBUTES.values())

def distinguishable_count() -> int:
    """A lower bound on the number of identities that look different at low resolution.

    Only coarse attributes that stay visible at 64x64 in any pose count (age, head, skin, hair style and colour,
    facial detail, glasses, shirt), and only combinations in which nothing hides them: no hat (a hat covers the
    hair), no sunglasses (they cover the eyes, so glasses count 3 ways), and a bald head counted once whatever
    its hair colour. Every other attribute (eyes, brows, nose, mouth, make-up, hat) only adds to this.
    """
    counts = {name: len(options) for name, options in ATTRIBUTES.items()}
    hair = (counts["hair_style"] - 1) * counts["hair_colour"] + 1
    glasses = counts["glasses"] - 1
    return counts["age"] * counts["head"] * counts["skin"] * hair * counts["face_detail"] * glasses * counts["shirt"]


# Ids decode through a fixed bijection of [0, NUM_IDENTITIES) so that neighbouring ids differ in many attributes:
# rounds of an affine map (multiplier coprime to NUM_IDENTITIES) and a reversal of the mixed-radix digits, which
# moves the well-mixed high digits of the affine map to the bottom.
_RADICES = tuple(len(options) for options in ATTRIBUTES.values())
_ID_MULTIPLIER = next(a for a in range(int(NUM_IDENTITIES * 0.6180339887), NUM_IDENTITIES)
                      if math.gcd(a, NUM_IDENTITIES) == 1)
_ID_OFFSET = 97_531


def _digits(code: int) -> list[int]:
    digits = []
    for radix in _RADICES:
        code, digit = divmod(code, radix)
        digits.append(digit)
    return digits


def _scramble(code: int) -> int:
    for _ in range(3):
        code = (_ID_MULTIPLIER * code + _ID_OFFSET) % NUM_IDENTITIES
        reversed_code = 0
        for radix, digit in zip(_RADICES, _digits(code)):  # re-read the digits most significant first
            reversed_code = reversed_code * radix + digit
        code = reversed_code
    return code


@dataclass(frozen=True)
class Identity:
    id: int
    age: str
    head: str
    skin: str
    hair_style: str
    hair_colour: str
    eye_shape: str
    eye_colour: str
    eye_spacing: str
    brows: str
    nose: str
    mouth: str
    face_detail: str
    makeup: str
    glasses: str
    hat: str
    hat_colour: str
    shirt: str

    @property
    def detail(self) -> str:
        """The facial detail drawn, e.g. 'beard' or 'freckles'."""
        names = CHILD_DETAILS if self.age == "child" else ADULT_DETAILS
        return names[ATTRIBUTES["face_detail"].index(self.face_detail)]

    @property
    def who(self) -> str:
        return who_of(self.age, self.detail, self.makeup)

    def attribute_indices(self) -> dict[str, int]:
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def who_of(age: str, detail: str, makeup: str) -> str:
    """The most specific noun the world ties to a look: a child; a man (facial hair, no make-up); a woman
    (make-up, no facial hair); otherwise a person."""
    if age == "child":
        return "child"
    facial_hair = detail != "none"
    if facial_hair and makeup == "none":
        return "man"
    if makeup != "none" and not facial_hair:
        return "woman"
    return "person"


def identity(identity_id: int) -> Identity:
    """The character with this id (deterministic; distinct ids give distinct attribute tuples)."""
    if not 0 <= identity_id < NUM_IDENTITIES:
        raise ValueError(f"identity id must be in [0, {NUM_IDENTITIES}), got {identity_id}")
    digits = _digits(_scramble(identity_id))
    return Identity(id=identity_id, **{name: options[d] for (name, options), d in zip(ATTRIBUTES.items(), digits)})


# ---------------------------------------------------------------------------------------------------------------
# Colours and shapes.

SKIN = {"porcelain": (252, 222, 200), "light": (238, 192, 155), "tan": (212, 158, 110),
        "olive": (186, 140, 90), "brown": (145, 96, 60), "deep": (92, 58, 38)}
HAIR = {"black": (28, 24, 24), "dark_brown": (80, 48, 26), "chestnut": (150, 78, 34), "blonde": (238, 204, 110),
        "ginger": (214, 96, 34), "grey": (170, 170, 172), "blue": (48, 92, 214), "pink": (236, 118, 172)}
EYES = {"brown": (96, 54, 24), "blue": (56, 124, 216), "green": (52, 150, 70), "grey": (120, 130, 142)}
SHIRT = {"red": (204, 40, 40), "blue": (40, 80, 204), "green": (40, 152, 64), "yellow": (238, 204, 40),
         "purple": (132, 60, 172), "orange": (242, 132, 30), "black": (36, 36, 42), "white": (242, 242, 242)}
HAT = {"red": (184, 28, 40), "navy": (30, 40, 92), "black": (30, 30, 30), "beige": (204, 184, 140)}
# head: half-width (in r), superellipse exponent (2 ellipse, 4 squarish), chin taper
HEADS = {"round": (0.86, 2.0, 0.0), "oval": (0.74, 2.0, 0.12), "long": (0.63, 2.3, 0.05),
         "square": (0.84, 4.0, 0.05), "heart": (0.88, 2.4, 0.45)}
EYE_SPACING = {"close": 0.36, "medium": 0.44, "wide": 0.52}  # eye centre x, fraction of head half-width
EYE_OPENNESS = {"round": 0.75, "almond": 0.5, "narrow": 0.3}  # eye height / width
MOUTH_WIDTH = {"small": 0.17, "medium": 0.24, "wide": 0.32}


def _shade(colour, factor):
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _mix(a, b, t):
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# Pose, light, render.


@dataclass
class Pose:
    x: float = 0.5  # face centre, fraction of frame width
    y: float = 0.45  # face centre, fraction of frame height
    scale: float = 0.4  # face box height / frame height
    yaw: float = 0.0  # head turn in [-1, 1]; positive turns the face towards the image's right
    pitch: float = 0.0  # nod in [-1, 1]; positive looks down
    mouth: str = "closed"  # closed | smile | open
    eyes_closed: bool = False
    wave: float | None = None  # phase (radians) of a waving hand, None for no hand


@dataclass
class Light:
    brightness: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain, the colour cast
    direction: float = 0.0  # where the key light comes from: -1 image left, +1 image right
    strength: float = 0.0  # how much darker the far side of the character is


@dataclass
class Render:
    image: np.ndarray  # [H, W, 3] uint8
    box: np.ndarray  # [4] float32 face box x0, y0, x1, y1 in pixels
    landmarks: np.ndarray  # [5, 2] float32: left eye, right eye, nose tip, left and right mouth corner (image left/right)
    mask: np.ndarray  # [H, W] float32 in [0, 1]: how much of each pixel the character covers


def supersampling(size: tuple[int, int]) -> int:
    return int(min(4, max(2, math.ceil(256 / min(size)))))


class _Pen:
    """Draws in head units: point (u, v) is at (cx + u r, cy + v r) on the canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float):
        self.draw, self.cx, self.cy, self.r = draw, cx, cy, r

    def xy(self, points):
        return [(self.cx + u * self.r, self.cy + v * self.r) for u, v in points]

    def width(self, w):
        return max(1, round(w * self.r))

    def ellipse(self, u, v, a, b, fill):
        x, y = self.cx + u * self.r, self.cy + v * self.r
        self.draw.ellipse((x - a * self.r, y - b * self.r, x + a * self.r, y + b * self.r), fill=fill)

    def rect(self, u0, v0, u1, v1, fill, radius=0.0):
        box = (self.cx + u0 * self.r, self.cy + v0 * self.r, self.cx + u1 * self.r, self.cy + v1 * self.r)
        self.draw.rounded_rectangle(box, radius=radius * self.r, fill=fill)

    def polygon(self, points, fill):
        self.draw.polygon(self.xy(points), fill=fill)

    def line(self, points, fill, width):
        self.draw.line(self.xy(points), fill=fill, width=self.width(width), joint="curve")

    def outline_box(self, u, v, a, b, colour, width, round_=True):
        x, y = self.cx + u * self.r, self.cy + v * self.r
        box = (x - a * self.r, y - b * self.r, x + a * self.r, y + b * self.r)
        if round_:
            self.draw.ellipse(box, outline=colour, width=self.width(width))
        else:
            self.draw.rectangle(box, outline=colour, width=self.width(width))


def _head_outline(ident: Identity, yaw: float, n: int = 40) -> np.ndarray:
    """[n, 2] face outline in head units; its bounding box is the face box."""
    half_width, exponent, taper = HEADS[ident.head]
    if ident.age == "child":
        half_width += 0.05
    half_width *= 1 - 0.2 * abs(yaw)  # a turned head shows a narrower face
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    u = half_width * np.sign(c) * np.abs(c) ** (2 / exponent)
    v = np.sign(s) * np.abs(s) ** (2 / exponent)
    u = u * (1 - taper * np.clip(v, 0, None) ** 2)
    return np.stack([u, v], axis=1)


def _top_cap(outline: np.ndarray, hairline: float, grow: float) -> list:
    """The part of the (grown) outline above `hairline`, closed along the hairline."""
    pts = outline * (1 + grow)
    upper = pts[pts[:, 1] < 0]
    order = np.argsort(upper[:, 1])
    half = float(np.interp(hairline, upper[order, 1], np.abs(upper[order, 0])))
    top = pts[pts[:, 1] < hairline]
    top = top[np.argsort(top[:, 0])]  # the outline is convex: its top runs left to right
    return [(-half, hairline), *map(tuple, top), (half, hairline)]


def _draw_hair_back(pen: _Pen, ident: Identity, hw: float, colour):
    style = ident.hair_style
    if style == "bob":
        pen.rect(-hw - 0.18, -1.05, hw + 0.18, 0.5, colour, radius=0.45)
    elif style == "long":
        pen.rect(-hw - 0.24, -1.05, hw + 0.24, 1.55, colour, radius=0.5)
    elif style == "curly":
        for angle in np.linspace(-0.15 * np.pi, 1.15 * np.pi, 11):
            pen.ellipse(1.02 * (hw + 0.1) * np.cos(angle), -0.2 - 0.95 * np.sin(angle), 0.34, 0.34, colour)
    elif style == "bun":
        pen.ellipse(0, -1.12, 0.3, 0.3, colour)
    if style != "bald":
        pen.ellipse(0, -0.04, hw + 0.07, 1.05, colour)  # the rim of hair around the top of the head


def _draw_hair_front(pen: _Pen, ident: Identity, outline: np.ndarray, colour):
    style = ident.hair_style
    if style == "bald":
        return
    hairline = {"bob": -0.36, "crop": -0.62, "spiky": -0.64, "long": -0.5}.get(style, -0.58)
    pen.polygon(_top_cap(outline, hairline, 0.06), colour)
    hw = np.abs(outline[:, 0]).max()
    if style == "side_part":
        pen.polygon([(-hw - 0.05, -0.62), (0.25, -0.62), (-0.3, -0.42), (-hw, -0.2)], colour)
    elif style == "spiky":
        for k in range(5):
            u = (k - 2) * 0.32 * hw
            pen.polygon([(u - 0.2, -0.85), (u + 0.2, -0.85), (u + 0.05 * (k - 2), -1.38)], colour)
    elif style == "long":
        pen.line([(0, -1.02), (0, -0.62)], _shade(colour, 0.6), 0.04)  # the parting
    elif style == "curly":
        for k in range(7):
            pen.ellipse((k - 3) * 0.26 * hw, -0.66 + 0.05 * (k % 2), 0.17, 0.15, colour)


def _draw_hat(pen: _Pen, ident: Identity, outline: np.ndarray, hw: float):
    colour = HAT[ident.hat_colour]
    if ident.hat == "cap":
        pen.polygon(_top_cap(outline, -0.5, 0.1), colour)
        pen.ellipse(0, -0.52, hw + 0.08, 0.12, _shade(colour, 0.7))  # the brim, seen from the front
    elif ident.hat == "beanie":
        pen.polygon(_top_cap(outline, -0.45, 0.12), colour)
        pen.rect(-hw - 0.1, -0.62, hw + 0.1, -0.42, _shade(colour, 1.25), radius=0.05)
        pen.ellipse(0, -1.16, 0.17, 0.17, _shade(colour, 1.4))
    elif ident.hat == "top_hat":
        pen.rect(-0.68 * hw, -1.65, 0.68 * hw, -0.7, colour)
        pen.rect(-0.68 * hw, -0.86, 0.68 * hw, -0.76, (225, 225, 215))  # the band
        pen.rect(-hw - 0.3, -0.74, hw + 0.3, -0.62, colour, radius=0.04)


def _draw_character(draw: ImageDraw.ImageDraw, ident: Identity, pose: Pose, cx: float, cy: float, r: float):
    """Draws the character; returns the face outline and the five landmarks, both in head units."""
    pen = _Pen(draw, cx, cy, r)
    child = ident.age == "child"
    skin, hair = SKIN[ident.skin], HAIR[ident.hair_colour]
    facial_hair = _shade(hair, 0.8)  # a shade darker, so that it stands out on light skin
    yaw, pitch = float(np.clip(pose.yaw, -1, 1)), float(np.clip(pose.pitch, -1, 1))
    outline = _head_outline(ident, yaw)
    hw = float(np.abs(outline[:, 0]).max())

    # Features sit on a curved face: turning the head moves the nose most, the eyes and mouth less;
    # nodding moves them all down (or up) across the face.
    def at(u, v, depth):
        return u * (1 - 0.2 * abs(yaw)) + yaw * depth * hw, v + 0.3 * pitch

    _draw_hair_back(pen, ident, hw, hair)
    shoulder = 1.05 if child else 1.55
    pen.ellipse(0, 2.05, shoulder, 0.8, SHIRT[ident.shirt])
    pen.rect(-0.28, 0.6, 0.28, 1.32, _shade(skin, 0.86))
    pen.polygon([(-0.28, 1.28), (0.28, 1.28), (0, 1.5)], _shade(skin, 0.86))  # the collar's V
    if ident.hair_style == "long":
        for side in (-1, 1):  # locks falling in front of the shoulders
            pen.rect(side * (hw + 0.02) - 0.14, -0.3, side * (hw + 0.02) + 0.14, 1.45, hair, radius=0.1)
    for side in (-1, 1):
        if yaw * side < 0.3:  # the ear on the side the face turns to disappears behind the head
            pen.ellipse(side * (hw - 0.02) - 0.25 * yaw, 0.02 + 0.3 * pitch, 0.12, 0.2, _shade(skin, 0.9))
    pen.polygon([tuple(p) for p in outline], skin)

    # facial detail under the features
    if child:
        if "freckles" in ident.detail:
            for side in (-1, 1):
                for du, dv in ((-0.08, 0.0), (0.06, -0.03), (0.0, 0.07), (0.1, 0.06), (-0.1, 0.09)):
                    pen.ellipse(*at(side * 0.5 * hw + du, 0.2 + dv, 0.35), 0.025, 0.025, _shade(skin, 0.62))
        if "cheeks" in ident.detail:
            for side in (-1, 1):
                pen.ellipse(*at(side * 0.52 * hw, 0.3, 0.35), 0.14, 0.09, _mix(skin, (236, 92, 110), 0.55))
    elif ident.detail == "beard":
        lower = [tuple(p * 1.03) for p in outline if p[1] > 0.05]
        lower.sort(key=lambda p: -math.atan2(p[1], p[0]))
        pen.polygon(lower + [at(-0.35, 0.3, 0.4), at(0, 0.36, 0.4), at(0.35, 0.3, 0.4)], facial_hair)
    elif ident.detail == "goatee":
        pen.polygon([at(-0.2, 0.6, 0.4), at(0.2, 0.6, 0.4), at(0.11, 0.95, 0.4), at(-0.11, 0.95, 0.4)], facial_hair)

    # nose
    nose_colour = _shade(skin, 0.72)
    nx, ny = at(0, 0.24, 0.55)
    if ident.nose == "button":
        pen.ellipse(nx, ny, 0.08, 0.065, nose_colour)
    elif ident.nose == "triangle":
        pen.polygon([at(0, -0.04, 0.55), (nx - 0.12, ny + 0.03), (nx + 0.12, ny + 0.03)], _shade(skin, 0.8))
    elif ident.nose == "long":
        pen.line([at(0, -0.1, 0.5), (nx, ny)], nose_colour, 0.06)
        pen.line([(nx - 0.09, ny), (nx + 0.09, ny)], nose_colour, 0.05)
    else:
        pen.ellipse(nx, ny, 0.18, 0.08, nose_colour)

    # mouth
    mw = MOUTH_WIDTH[ident.mouth] * (1 - 0.3 * abs(yaw))
    mx, my = at(0, 0.5, 0.4)
    lips = ((236, 120, 150) if child else (200, 24, 52)) if ident.makeup != "none" else _mix(skin, (150, 40, 50), 0.45)
    if pose.mouth == "open":
        pen.ellipse(mx, my + 0.03, 0.7 * mw + 0.03, 0.14, (70, 20, 26))
    elif pose.mouth == "smile":
        x0, y0 = cx + (mx - mw) * r, cy + (my - 0.12) * r
        draw.chord((x0, y0, x0 + 2 * mw * r, y0 + 0.26 * r), 0, 180, fill=(110, 28, 36))
        pen.line([(mx - mw, my + 0.01), (mx + mw, my + 0.01)], (245, 245, 240), 0.03)
    else:
        pen.ellipse(mx, my, mw, 0.06 if ident.makeup != "none" else 0.045, lips)
    if ident.detail == "moustache" and not child:
        pen.polygon([at(-0.26, 0.33, 0.45), at(0.26, 0.33, 0.45), at(0.32, 0.47, 0.45), at(0, 0.42, 0.45),
                     at(-0.32, 0.47, 0.45)], facial_hair)

    # eyes, brows, lashes
    eye_half = 0.19 if child else 0.16
    eye_y = 0.0 if child else -0.1
    eye_h = eye_half * EYE_OPENNESS[ident.eye_shape] * (1 - 0.3 * abs(pitch))
    eyes = []
    for side in (-1, 1):
        ex, ey = at(side * EYE_SPACING[ident.eye_spacing] * hw / (1 - 0.2 * abs(yaw)), eye_y, 0.35)
        # the eye on the side the face turns to is further away: foreshortened
        ew = eye_half * (1 - 0.45 * max(0.0, side * yaw) + 0.1 * max(0.0, -side * yaw))
        eyes.append((ex, ey))
        if pose.eyes_closed:
            pen.line([(ex - ew, ey), (ex, ey + 0.03), (ex + ew, ey)], (40, 30, 30), 0.04)
        else:
            pen.ellipse(ex, ey, ew, eye_h, (250, 250, 250))
            iris = min(eye_h * 0.95, ew * 0.6)
            pen.ellipse(ex + 0.25 * yaw * ew, ey, iris, iris, EYES[ident.eye_colour])
            pen.ellipse(ex + 0.25 * yaw * ew, ey, iris * 0.5, iris * 0.5, (10, 10, 10))
        if ident.makeup != "none":
            pen.line([(ex - ew, ey - 0.2 * eye_h), (ex, ey - eye_h - 0.02), (ex + ew * 1.1, ey - eye_h)],
                     (20, 16, 16), 0.04)
        brow_colour = _shade(hair, 0.8)
        by = ey - eye_h - 0.13
        inner, outer = ex - side * ew, ex + side * ew  # inner end faces the nose
        if ident.brows == "thin":
            pen.line([(inner, by), (outer, by)], brow_colour, 0.035)
        elif ident.brows == "thick":
            pen.line([(inner, by), (outer, by)], brow_colour, 0.085)
        elif ident.brows == "arched":
            pen.line([(inner, by + 0.02), (ex, by - 0.06), (outer, by + 0.03)], brow_colour, 0.05)
        else:
            pen.line([(inner, by + 0.05), (outer, by - 0.05)], brow_colour, 0.065)

    _draw_hair_front(pen, ident, outline, hair)

    if ident.glasses != "none":
        frame = (24, 24, 28)
        gw, gh = eye_half * 1.6, eye_half * 1.25
        for ex, ey in eyes:
            if ident.glasses == "sunglasses":
                pen.rect(ex - gw, ey - gh, ex + gw, ey + gh, (18, 18, 28), radius=0.08)
            else:
                pen.outline_box(ex, ey, gw, gh, frame, 0.045, round_=ident.glasses == "round")
        (lx, ly), (rx, ry) = eyes
        pen.line([(lx + gw, ly - 0.02), (rx - gw, ry - 0.02)], frame, 0.04)

    _draw_hat(pen, ident, outline, hw)

    if pose.wave is not None:
        # the raised hand swings on an arc beside the head, on the image's right
        shoulder = ((0.8 if child else 1.15), 1.6)
        angle = 0.1 + 0.4 * math.sin(pose.wave)
        hand = (shoulder[0] + 0.55 + 1.5 * math.sin(angle), shoulder[1] - 1.5 * math.cos(angle))
        pen.line([shoulder, hand], SHIRT[ident.shirt], 0.3)
        pen.ellipse(hand[0], hand[1] - 0.12, 0.2, 0.24, skin)

    (lx, ly), (rx, ry) = eyes
    landmarks = np.array([[lx, ly], [rx, ry], [nx, ny], [mx - mw, my], [mx + mw, my]], dtype=np.float32)
    return outline, landmarks


def render(ident: Identity, pose: Pose | None = None, light: Light | None = None,
           background: np.ndarray | None = None, size: tuple[int, int] = (64, 64)) -> Render:
    """Draws `ident` in `pose` (default: frontal, centred) under `light` (default: neutral) onto `background`
    ([H, W, 3] uint8, None for white) in a frame of `size` (height, width)."""
    return render_group([ident], [pose or Pose()], light, background, size)[0]


def render_group(idents: list[Identity], poses: list[Pose], light: Light | None = None,
                 background: np.ndarray | None = None, size: tuple[int, int] = (64, 64)) -> list[Render]:
    """Draws several characters into one frame, in list order (a later one in front of an earlier one), as
    `render` draws one. One Render per character, all with the same image; a character's mask is the part of it
    still visible in front of the ones drawn before it and behind the ones drawn after."""
    if len(idents) != len(poses):
        raise ValueError(f"{len(idents)} identities but {len(poses)} poses")
    light = light or Light()
    height, width = size
    if background is None:
        background = np.full((height, width, 3), 255, dtype=np.uint8)
    if background.shape != (height, width, 3):
        raise ValueError(f"background must be [{height}, {width}, 3], got {list(background.shape)}")
    ss = supersampling(size)
    image = background.astype(np.float32)
    drawn = []
    for ident, pose in zip(idents, poses):
        canvas = Image.new("RGBA", (width * ss, height * ss), (0, 0, 0, 0))
        r = pose.scale * height * ss / 2
        cx, cy = pose.x * width * ss, pose.y * height * ss
        cy += 0.15 * r * pose.pitch  # a nodding head dips a little
        outline, landmarks = _draw_character(ImageDraw.Draw(canvas), ident, pose, cx, cy, r)

        layer = np.asarray(canvas.reduce(ss), dtype=np.float32)
        alpha = layer[..., 3:] / 255.0
        image = image * (1 - alpha) + layer[..., :3] * alpha
        # Directional key light across the character (each its own, around its centre).
        xs = (np.arange(width, dtype=np.float32) + 0.5 - cx / ss) / max(1.3 * r / ss, 1e-3)
        side_light = 1 + light.strength * light.direction * np.clip(xs, -1, 1)
        image = image * (1 + (side_light[None, :, None] - 1) * alpha)

        to_pixels = lambda uv: np.stack([(cx + uv[:, 0] * r) / ss, (cy + uv[:, 1] * r) / ss], axis=1)
        face = to_pixels(outline)
        box = np.array([face[:, 0].min(), face[:, 1].min(), face[:, 0].max(), face[:, 1].max()], dtype=np.float32)
        drawn = [(b, lm, mask * (1 - alpha[..., 0])) for b, lm, mask in drawn]  # hidden where this one covers
        drawn.append((box, to_pixels(landmarks).astype(np.float32), alpha[..., 0]))
    # The scene's brightness and colour cast on everything.
    image = image * light.brightness * np.asarray(light.tint, dtype=np.float32)
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return [Render(image=image, box=box, landmarks=landmarks, mask=mask) for box, landmarks, mask in drawn]


# ---------------------------------------------------------------------------------------------------------------
# Scenery: places and times of day.

PLACES = ("beach", "forest", "city", "snow", "room", "desert")
TIMES = ("morning", "noon", "evening", "night")

SKY = {"morning": ((136, 186, 236), (250, 206, 170)), "noon": ((66, 138, 232), (162, 206, 246)),
       "evening": ((72, 58, 132), (250, 140, 66)), "night": ((6, 10, 32), (30, 40, 84))}
# brightness, tint, direction, strength of each time of day, before per-clip jitter
DAYLIGHT = {"morning": Light(1.0, (1.06, 1.0, 0.9), -0.7, 0.25), "noon": Light(1.1, (1.0, 1.0, 1.0), 0.0, 0.1),
            "evening": Light(0.85, (1.15, 0.84, 0.68), 0.7, 0.3), "night": Light(0.7, (0.74, 0.86, 1.18), 0.3, 0.15)}


def time_light(time: str, rng: np.random.Generator) -> Light:
    """The light of a time of day, jittered so that no two clips are lit exactly alike."""
    base = DAYLIGHT[time]
    return Light(brightness=base.brightness * rng.uniform(0.92, 1.08),
                 tint=tuple(float(t * rng.uniform(0.96, 1.04)) for t in base.tint),
                 direction=float(np.clip(base.direction + rng.uniform(-0.3, 0.3), -1, 1)),
                 strength=base.strength * rng.uniform(0.7, 1.3))


def _sky(draw_size, time, horizon, rng, image):
    height, width = draw_size
    top, bottom = SKY[time]
    t = np.clip(np.arange(height) / max(horizon, 1), 0, 1)[:, None]
    image[:] = (np.array(top) * (1 - t) + np.array(bottom) * t)[:, None, :]
    if time == "night":
        for _ in range(int(width * height / 300)):
            y, x = rng.integers(0, max(horizon, 1)), rng.integers(0, width)
            image[y, x] = 235


def background(place: str, time: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """A [H, W, 3] uint8 view of `place` at `time`; `seed` varies the layout."""
    if place not in PLACES or time not in TIMES:
        raise ValueError(f"unknown place/time {place!r}/{time!r}; places {PLACES}, times {TIMES}")
    rng = np.random.default_rng([seed, PLACES.index(place), TIMES.index(time)])
    ss = 2
    height, width = size[0] * ss, size[1] * ss
    sky = np.zeros((height, width, 3), dtype=np.float32)
    horizon = int(height * rng.uniform(0.35, 0.55))
    _sky((height, width), time, horizon, rng, sky)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    night = time == "night"
    H, W = height, width

    def sun(y_max):
        x, y, radius = rng.uniform(0.1, 0.9) * W, rng.uniform(0.05, y_max) * H, rng.uniform(0.04, 0.07) * W
        colour = (232, 232, 210) if night else (255, 236, 150)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)

    if place == "beach":
        sun(0.25)
        sea_end = horizon + int(H * rng.uniform(0.12, 0.2))
        draw.rectangle((0, horizon, W, sea_end), fill=(34, 118, 176))
        for _ in range(6):
            y, x = rng.uniform(horizon + 2, sea_end - 1), rng.uniform(0, W)
            draw.line((x, y, x + rng.uniform(0.1, 0.25) * W, y), fill=(190, 225, 240), width=max(1, H // 100))
        draw.rectangle((0, sea_end, W, H), fill=(232, 206, 150))
        draw.rectangle((0, sea_end, W, sea_end + H * 0.03), fill=(200, 174, 118))
    elif place == "forest":
        draw.rectangle((0, int(H * 0.75), W, H), fill=(66, 104, 42))
        for _ in range(int(rng.integers(5, 9))):
            x, w = rng.uniform(0, W), rng.uniform(0.04, 0.09) * W
            draw.rectangle((x - w / 2, H * 0.15, x + w / 2, H * rng.uniform(0.8, 0.9)), fill=(86, 56, 30))
        for _ in range(40):
            x, y, radius = rng.uniform(0, W), rng.uniform(-0.05, 0.42) * H, rng.uniform(0.06, 0.13) * W
            green = ((32, 92, 44), (54, 124, 54), (24, 72, 34))[int(rng.integers(0, 3))]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=green)
    elif place == "city":
        street = int(H * 0.8)
        x = -rng.uniform(0, 0.1) * W
        while x < W:
            w, top = rng.uniform(0.15, 0.3) * W, H * rng.uniform(0.12, 0.5)
            grey = int(rng.integers(105, 170))
            draw.rectangle((x, top, x + w, street), fill=(grey, grey, grey + 8))
            for wy in np.arange(top + H * 0.04, street - H * 0.06, H * 0.08):
                for wx in np.arange(x + w * 0.12, x + w - w * 0.2, w * 0.28):
                    lit = rng.random() < (0.7 if time in ("evening", "night") else 0.0)
                    draw.rectangle((wx, wy, wx + w * 0.14, wy + H * 0.04),
                                   fill=(250, 220, 118) if lit else (168, 198, 222))
            x += w
        draw.rectangle((0, street, W, H), fill=(78, 78, 84))
        for dx in np.arange(rng.uniform(0, 0.2) * W, W, 0.25 * W):
            draw.rectangle((dx, H * 0.89, dx + 0.1 * W, H * 0.91), fill=(236, 236, 236))
    elif place == "snow":
        sun(0.2)
        for _ in range(int(rng.integers(2, 4))):
            x, w, top = rng.uniform(0, W), rng.uniform(0.3, 0.6) * W, horizon - rng.uniform(0.12, 0.25) * H
            draw.polygon([(x - w / 2, horizon), (x, top), (x + w / 2, horizon)], fill=(148, 164, 192))
            draw.polygon([(x - w * 0.12, top + (horizon - top) * 0.25), (x, top),
                          (x + w * 0.12, top + (horizon - top) * 0.25)], fill=(244, 246, 250))
        draw.rectangle((0, horizon, W, H), fill=(236, 241, 248))
        for _ in range(int(rng.integers(2, 5))):
            x, h = rng.uniform(0, W), rng.uniform(0.15, 0.3) * H
            draw.polygon([(x - h * 0.35, horizon + h * 0.3), (x, horizon - h * 0.7), (x + h * 0.35, horizon + h * 0.3)],
                         fill=(30, 70, 52))
        for _ in range(60):
            x, y, radius = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.004, 0.01) * W
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(252, 252, 255))
    elif place == "room":
        walls = ((216, 196, 164), (190, 206, 216), (222, 200, 200), (200, 216, 190))
        floor = int(H * rng.uniform(0.68, 0.76))
        draw.rectangle((0, 0, W, floor), fill=walls[int(rng.integers(0, len(walls)))])
        wx, wy = rng.uniform(0.05, 0.55) * W, rng.uniform(0.08, 0.2) * H
        window = Image.fromarray(sky[: int(H * 0.3), : int(W * 0.3)].astype(np.uint8))
        draw.rectangle((wx - 3, wy - 3, wx + W * 0.3 + 3, wy + H * 0.3 + 3), fill=(246, 246, 246))
        image.paste(window, (int(wx), int(wy)))
        draw.line((wx + W * 0.15, wy, wx + W * 0.15, wy + H * 0.3), fill=(246, 246, 246), width=3)
        px = rng.uniform(0.6, 0.85) * W
        draw.rectangle((px, H * 0.15, px + W * 0.13, H * 0.3), fill=(92, 60, 34))
        draw.rectangle((px + 4, H * 0.15 + 4, px + W * 0.13 - 4, H * 0.3 - 4),
                       fill=tuple(int(c) for c in rng.integers(60, 230, 3)))
        draw.rectangle((0, floor, W, H), fill=(150, 100, 60))
        for y in np.arange(floor + H * 0.06, H, H * 0.07):
            draw.line((0, y, W, y), fill=(118, 78, 44), width=2)
        draw.rectangle((0, floor - H * 0.02, W, floor), fill=(236, 232, 222))
    elif place == "desert":
        sun(0.22)
        tones = ((236, 186, 116), (224, 160, 90), (206, 136, 70))
        for k, tone in enumerate(tones):
            base = horizon + (k * 0.12 + rng.uniform(0, 0.05)) * H
            xs = np.linspace(0, W, 24)
            ys = base + rng.uniform(0.03, 0.07) * H * np.sin(xs / W * rng.uniform(4, 8) + rng.uniform(0, 6))
            draw.polygon([(0, H)] + list(zip(xs, ys)) + [(W, H)], fill=tone)
        if rng.random() < 0.7:
            x, y = rng.uniform(0.05, 0.95) * W, horizon + rng.uniform(0.05, 0.15) * H
            draw.rectangle((x - 0.02 * W, y - 0.18 * H, x + 0.02 * W, y), fill=(58, 128, 60))
            draw.rectangle((x - 0.07 * W, y - 0.12 * H, x - 0.02 * W, y - 0.09 * H), fill=(58, 128, 60))
            draw.rectangle((x - 0.07 * W, y - 0.16 * H, x - 0.05 * W, y - 0.09 * H), fill=(58, 128, 60))
    return np.asarray(image.reduce(ss))
