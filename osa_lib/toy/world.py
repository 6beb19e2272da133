"""A procedurally generated toy world where every image comes with ground truth.

Grammar (every caption and every toy prompt follows it)::

    caption   := "a" character ("and a" character)* "in the" scene
    character := [colour] shape
    colour    := red | yellow | green | blue | purple
    shape     := circle | square | triangle | diamond
    scene     := meadow | beach | night | snow | desert

Example: ``"a red circle and a blue square in the snow"``; ``"a triangle in the desert"``
names no colour, so the colour is free and varies between seeds.

World rules: a scene holds 1-3 characters with pairwise distinct shapes and distinct colour
families, so a shape word names exactly one character. Words pin down *named* attributes
(shape, colour family); each character also has *identity details* that no word names: the
exact hue inside its family, brightness, size and an inner mark (none, dot or bar, light or
dark). Characters may be apart, touching or overlapping; later characters occlude earlier ones
and ground-truth masks are the visible pixels.
"""
from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass, field, asdict

import numpy as np

__all__ = [
    "COLOURS", "SHAPES", "SCENES", "MARKS", "RELATIONS", "VOCABULARY", "IMAGE_SIZE",
    "Character", "Scene", "ToyGrammarError", "normalise_prompt", "parse_caption", "make_caption",
    "sample_scene", "sample_pair", "sample_story_pair", "render_scene", "shape_mask", "BACKGROUNDS",
]

IMAGE_SIZE = 32
# colour family -> hue centre in degrees (HSV). Families are >= 55 degrees apart and the
# identity hue jitter is at most +-10 degrees, so families never touch.
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 225.0, "purple": 285.0}
SHAPES = ("circle", "square", "triangle", "diamond")
# scene word -> (sky RGB, ground RGB, horizon row as a fraction). Backgrounds are muted
# (HSV saturation <= 0.5) so saturated characters stand out from every background.
BACKGROUNDS = {
    "meadow": ((170, 200, 225), (105, 140, 85), 0.35),
    "beach": ((120, 165, 185), (220, 205, 160), 0.45),
    "night": ((20, 24, 55), (40, 40, 60), 0.7),
    "snow": ((200, 210, 225), (235, 238, 242), 0.3),
    "desert": ((235, 220, 180), (200, 160, 105), 0.4),
}
SCENES = tuple(BACKGROUNDS)
MARKS = ("none", "dot", "bar")
MARK_RGB = {"light": (245, 245, 245), "dark": (25, 25, 25)}
RELATIONS = ("apart", "touching", "overlapping")
FUNCTION_WORDS = ("a", "and", "in", "the")
VOCABULARY = FUNCTION_WORDS + tuple(COLOURS) + SHAPES + SCENES

HUE_JITTER = 10.0  # degrees, identity detail
SIZE_RANGE = (5.0, 8.0)  # "radius" in pixels at 32x32


class ToyGrammarError(ValueError):
    """A prompt or caption that the toy world's grammar does not accept."""


@dataclass
class Character:
    """One character: named attributes (shape, colour) and unnamed identity details."""

    shape: str
    colour: str
    hue: float  # exact hue in degrees, within HUE_JITTER of the family centre
    value: float  # HSV brightness in [0.8, 1]
    size: float  # radius in pixels
    mark: str  # one of MARKS
    mark_tone: str  # "light" or "dark"
    center: tuple[float, float] = (16.0, 16.0)  # (row, col)

    @property
    def rgb(self) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb((self.hue % 360) / 360.0, 0.9, self.value)
        return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))

    def identity(self) -> dict:
        """The identity details that no word names."""
        return {"hue": self.hue, "value": self.value, "size": self.size,
                "mark": self.mark, "mark_tone": self.mark_tone}


@dataclass
class Scene:
    """A rendered scene: image (H, W, 3) uint8, caption, and per-character ground truth."""

    scene: str
    characters: list[Character]
    caption: str
    relation: str
    image: np.ndarray | None = None
    masks: np.ndarray | None = None  # (n_characters, H, W) bool, visible pixels
    show_colour: list[bool] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"scene": self.scene, "caption": self.caption, "relation": self.relation,
                "characters": [asdict(c) for c in self.characters]}


def make_caption(scene: str, characters: list[Character], show_colour: list[bool] | None = None) -> str:
    """Caption in the world's grammar; colours can be left out per character."""
    show_colour = show_colour or [True] * len(characters)
    parts = [f"{c.colour} {c.shape}" if show else c.shape
             for c, show in zip(characters, show_colour)]
    return "a " + " and a ".join(parts) + f" in the {scene}"


def normalise_prompt(prompt: str) -> str:
    """What a toy prompt means, as SDXL's tokenizer reads text: lower case, commas as spaces, one
    trailing full stop dropped, whitespace collapsed ("A Red Circle, in the Snow." -> "a red circle in the snow")."""
    text = " ".join(prompt.lower().replace(",", " ").split())
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_caption(prompt: str, id_prompt: bool = False) -> dict:
    """Parse a toy prompt into ``{"scene": str, "characters": [{"shape", "colour"|None}]}``.

    With ``id_prompt=True`` the prompt is a character's ID prompt: one character and no scene
    ("a red circle"); the scene is then None.

    Raises:
        ToyGrammarError: for unknown words or a sentence the grammar does not accept; the
            message lists the accepted words.
    """
    words = normalise_prompt(prompt).split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ToyGrammarError(
            f"unknown word(s) {unknown} in toy prompt {prompt!r}. The toy world knows "
            f"colours {list(COLOURS)}, shapes {list(SHAPES)}, scenes {list(SCENES)} and the "
            f"words {list(FUNCTION_WORDS)}.")
    if id_prompt:
        tokens = words
        if not (len(tokens) in (2, 3) and tokens[0] == "a" and tokens[-1] in SHAPES
                and (len(tokens) == 2 or tokens[1] in COLOURS)):
            raise ToyGrammarError(f"toy ID prompt {prompt!r} must read 'a [colour] shape', e.g. 'a red circle'")
        return {"scene": None, "characters": [{"shape": tokens[-1], "colour": tokens[1] if len(tokens) == 3 else None}]}
    expected = 'expected "a [colour] shape (and a [colour] shape)* in the scene"'
    if len(words) < 4 or words[-3:-1] != ["in", "the"] or words[-1] not in SCENES:
        raise ToyGrammarError(f"toy prompt {prompt!r} must end with 'in the <scene>'; {expected}")
    body, characters = words[:-3], []
    for i, chunk in enumerate(" ".join(body).split(" and ")):
        tokens = chunk.split()
        if not tokens or tokens[0] != "a" or len(tokens) not in (2, 3) or tokens[-1] not in SHAPES \
                or (len(tokens) == 3 and tokens[1] not in COLOURS):
            raise ToyGrammarError(f"cannot read character {i + 1} ({chunk!r}) of {prompt!r}; {expected}")
        characters.append({"shape": tokens[-1], "colour": tokens[1] if len(tokens) == 3 else None})
    shapes = [c["shape"] for c in characters]
    if len(set(shapes)) != len(shapes):
        raise ToyGrammarError(f"toy prompt {prompt!r} names a shape twice; each shape names one character")
    if len(characters) > 3:
        raise ToyGrammarError(f"toy prompt {prompt!r} has {len(characters)} characters; at most 3")
    return {"scene": words[-1], "characters": characters}


@functools.lru_cache(maxsize=4)
def _pixel_grid(hw: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:hw, 0:hw].astype(np.float32) + 0.5
    return rows, cols


def shape_mask(shape: str, center: tuple[float, float], size: float, hw: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (hw, hw) mask of one shape, sampled at pixel centres."""
    rows, cols = _pixel_grid(hw)
    dy, dx = rows - center[0], cols - center[1]
    if shape == "circle":
        return dx**2 + dy**2 <= size**2
    if shape == "square":
        half = size * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= size * 1.15
    if shape == "triangle":  # apex up, centroid at center
        top, bottom = -size * 1.05, size * 0.75
        half_width = (dy - top) / (bottom - top) * size * 1.15
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    raise ToyGrammarError(f"unknown shape {shape!r}; shapes are {list(SHAPES)}")


def _mark_mask(character: Character, body: np.ndarray) -> np.ndarray:
    rows, cols = _pixel_grid(IMAGE_SIZE)
    dy, dx = rows - character.center[0], cols - character.center[1]
    if character.mark == "dot":
        mark = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    elif character.mark == "bar":
        mark = (np.abs(dy) <= 0.6) & (np.abs(dx) <= character.size * 0.55)
    else:
        mark = np.zeros_like(body)
    return mark & body


def _background(scene: str, rng: np.random.Generator) -> np.ndarray:
    sky, ground, horizon = BACKGROUNDS[scene]
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    split = int(round(horizon * IMAGE_SIZE + rng.integers(-2, 3)))
    image[:split] = sky
    image[split:] = ground
    image += rng.normal(0, 4, image.shape)  # a little texture
    return image


def sample_character(rng: np.random.Generator, shape: str, colour: str) -> Character:
    return Character(
        shape=shape, colour=colour,
        hue=float(COLOURS[colour] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360,
        value=float(rng.uniform(0.8, 1.0)), size=float(rng.uniform(*SIZE_RANGE)),
        mark=str(rng.choice(MARKS)), mark_tone=str(rng.choice(list(MARK_RGB))))


def _place(characters: list[Character], relation: str, rng: np.random.Generator) -> bool:
    """Choose centres so that the pairwise relation holds; False if it failed."""
    margin = 1.0
    for attempt in range(200):
        for c in characters:
            lo, hi = c.size * 0.9 + margin, IMAGE_SIZE - c.size * 0.9 - margin
            c.center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        if len(characters) == 1:
            return True
        bodies = [shape_mask(c.shape, c.center, c.size) for c in characters]
        ok = True
        for i in range(len(bodies)):
            for j in range(i + 1, len(bodies)):
                overlap = (bodies[i] & bodies[j]).sum()
                smaller = min(bodies[i].sum(), bodies[j].sum())
                near = _dilate(bodies[i]) & bodies[j]
                if relation == "apart":
                    ok &= not _dilate(_dilate(bodies[i])).__and__(bodies[j]).any()
                elif relation == "touching":
                    ok &= overlap == 0 and near.any() if (i, j) == (0, 1) else overlap == 0
                else:  # overlapping: a visible but bounded overlap for the first pair
                    if (i, j) == (0, 1):
                        ok &= 0.1 * smaller <= overlap <= 0.3 * smaller
                    else:
                        ok &= overlap == 0
        if ok:
            return True
    return False


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]; out[:-1] |= mask[1:]; out[:, 1:] |= mask[:, :-1]; out[:, :-1] |= mask[:, 1:]
    return out


def render_scene(scene: str, characters: list[Character], rng: np.random.Generator,
                 relation: str = "apart", show_colour: list[bool] | None = None) -> Scene:
    """Draw characters (already placed) over the scene's background."""
    image = _background(scene, rng)
    masks = np.zeros((len(characters), IMAGE_SIZE, IMAGE_SIZE), bool)
    for k, c in enumerate(characters):
        body = shape_mask(c.shape, c.center, c.size)
        image[body] = c.rgb
        if c.mark != "none":  # a character read from a drawing without a mark has no tone ("none")
            image[_mark_mask(c, body)] = MARK_RGB[c.mark_tone]
        masks[:k] &= ~body  # later characters occlude earlier ones
        masks[k] = body
    show_colour = show_colour or [True] * len(characters)
    return Scene(scene=scene, characters=characters, relation=relation,
                 caption=make_caption(scene, characters, show_colour),
                 image=np.clip(image, 0, 255).astype(np.uint8), masks=masks,
                 show_colour=list(show_colour))


def sample_scene(rng: np.random.Generator, n_characters: int | None = None,
                 relation: str | None = None, p_drop_colour: float = 0.2,
                 exclude: set[tuple[str, str, str]] | frozenset = frozenset(),
                 only: set[tuple[str, str, str]] | None = None) -> Scene:
    """Sample and render a random scene.

    Args:
        n_characters: 1-3, random (1: 40 %, 2: 45 %, 3: 15 %) when None.
        relation: "apart", "touching" or "overlapping" (random when None).
        p_drop_colour: probability that the caption leaves out a character's colour.
        exclude: (colour, shape, scene) triples that must not appear (held out from training).
        only: if given, every character's (colour, shape, scene) triple must be in it.
    """
    for _ in range(1000):
        n = n_characters or int(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15]))
        rel = relation or str(rng.choice(RELATIONS, p=[0.6, 0.2, 0.2]))
        scene = str(rng.choice(SCENES))
        shapes = rng.choice(SHAPES, size=n, replace=False)
        colours = rng.choice(list(COLOURS), size=n, replace=False)
        triples = [(str(c), str(s), scene) for c, s in zip(colours, shapes)]
        if any(t in exclude for t in triples) or (only is not None and not all(t in only for t in triples)):
            continue
        characters = [sample_character(rng, str(s), str(c)) for s, c in zip(shapes, colours)]
        if not _place(characters, rel, rng):
            continue
        show = [bool(rng.random() >= p_drop_colour) for _ in characters]
        return render_scene(scene, characters, rng, rel, show)
    raise RuntimeError("could not sample a scene under these constraints; loosen `exclude`/`only`")


def sample_pair(rng: np.random.Generator, p_drop_shared_colour: float = 0.6,
                exclude: set[tuple[str, str, str]] | frozenset = frozenset(),
                reference: Scene | None = None) -> tuple[Scene, Scene, int, int]:
    """Two scenes that share one character, identical in every detail but its position: the
    training data that teaches the toy model to copy appearance through self-attention
    (``osa_lib.toy.reference``).

    The reference has 1-2 characters with their colours named as usual, or is the given
    one-character ``reference`` (such as the model's own drawing, ``osa_lib.toy.drawn_pool``); the
    target has 1-3, and its caption leaves the shared character's colour out with probability
    ``p_drop_shared_colour``.

    Returns:
        (reference, target, index of the shared character in the reference, index in the target).
    """
    given = reference
    for _ in range(1000):
        reference = given if given is not None else sample_scene(
            rng, n_characters=int(rng.choice([1, 2], p=[0.6, 0.4])), exclude=exclude)
        i_ref = 0 if given is not None else int(rng.integers(len(reference.characters)))
        shared = reference.characters[i_ref]
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        scene = str(rng.choice(SCENES))
        shapes = [s for s in SHAPES if s != shared.shape]
        colours = [c for c in COLOURS if c != shared.colour]
        others = [sample_character(rng, str(s), str(c)) for s, c in zip(
            rng.choice(shapes, size=n - 1, replace=False), rng.choice(colours, size=n - 1, replace=False))]
        i_tgt = int(rng.integers(n))
        characters = others[:i_tgt] + [Character(**{**asdict(shared), "center": (16.0, 16.0)})] + others[i_tgt:]
        if any((c.colour, c.shape, scene) in exclude for c in characters):
            continue
        relation = str(rng.choice(RELATIONS, p=[0.6, 0.2, 0.2]))
        if not _place(characters, relation, rng):
            continue
        show = [bool(rng.random() >= (p_drop_shared_colour if k == i_tgt else 0.2)) for k in range(n)]
        return reference, render_scene(scene, characters, rng, relation, show), i_ref, i_tgt
    raise RuntimeError("could not sample a scene pair under these constraints; loosen `exclude`")


def sample_story_pair(rng: np.random.Generator, p_drop_colour: float = 0.6,
                      exclude: set[tuple[str, str, str]] | frozenset = frozenset()) -> tuple[Scene, Scene]:
    """Two scenes of one story, the training data of a backbone that learns to copy appearance in
    no method's view (``osa_lib.toy.train --view neutral``).

    A cast of 1-3 characters (distinct shapes and colours, identity details fixed) appears in
    the reference, all of it (1: 40 %, 2: 40 %, 3: 20 %); the target shows 1 or 2 of them,
    identical in every detail but position, in a scene of its own. The target's caption leaves out
    each character's colour with probability ``p_drop_colour``, so copying is the way to get it
    right. Nothing says which character is which: the model must match them itself.

    Returns:
        (reference, target).
    """
    for _ in range(1000):
        k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        shapes, colours = rng.choice(SHAPES, size=k, replace=False), rng.choice(list(COLOURS), size=k, replace=False)
        cast = [sample_character(rng, str(s), str(c)) for s, c in zip(shapes, colours)]
        shown = sorted(int(i) for i in rng.choice(k, size=int(rng.integers(1, min(2, k) + 1)), replace=False))
        scenes = [str(rng.choice(SCENES)) for _ in range(2)]
        members = [cast, [Character(**asdict(cast[i])) for i in shown]]
        if any((c.colour, c.shape, scene) in exclude for scene, chars in zip(scenes, members) for c in chars):
            continue
        relations = [str(rng.choice(RELATIONS, p=[0.6, 0.2, 0.2])) for _ in range(2)]
        if not all(_place(chars, rel, rng) for chars, rel in zip(members, relations)):
            continue
        reference = render_scene(scenes[0], members[0], rng, relations[0],
                                 [bool(rng.random() >= 0.2) for _ in cast])
        target = render_scene(scenes[1], members[1], rng, relations[1],
                              [bool(rng.random() >= p_drop_colour) for _ in shown])
        return reference, target
    raise RuntimeError("could not sample a story pair under these constraints; loosen `exclude`")


def _held_out_triples(n: int = 12, seed: int = 1234) -> frozenset[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    triples = [(c, s, sc) for c in COLOURS for s in SHAPES for sc in SCENES]
    picked = rng.choice(len(triples), size=n, replace=False)
    return frozenset(triples[i] for i in picked)


# (colour, shape, scene) combinations never shown together in training: prompts built from
# them measure whether the toy model composes words it has only seen apart.
HELD_OUT_TRIPLES = _held_out_triples()
__all__.append("HELD_OUT_TRIPLES")
