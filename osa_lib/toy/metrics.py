"""Toy-world story metrics, exact because the analyzer reads every image:

- **IIS-toy** (identity similarity, %): for each character, every pair of scenes where it is
  drawn, the similarity of its *unnamed* identity details — hue, brightness, size and inner
  mark — averaged (each term in [0, 1], see ``detail_similarity``) ×100. Words cannot pin
  these details down, so only a method that carries the character over keeps them.
- **colour kept** (%): of each character's appearances after the first one it is drawn in, the
  share drawn in the colour family of that first one. For an ID prompt that names no colour
  ("a circle") the colour is free in the first scene and only a method that carries the
  character over keeps it (by chance about 1 in 5 when the model draws the five colour
  families equally often, more when it prefers some).
- **attribute accuracy** (%): the character is drawn with its ID prompt's shape and colour
  (any colour when the ID prompt names none).
- **mixing rate** (%): multi-character scenes where a character is drawn in the colour of
  another character of the scene (the blonde girl and black-haired boy both blonde); an
  uncoloured character's colour is the one it is drawn in there.
- **TIS-toy** (%): facts of the scene prompt the image shows (scene, each named shape and
  colour), the toy stand-in for CLIP text-image similarity.
- **flood rate** (%, with ``details``): scenes holding a patch of character colour larger than any
  character the world draws (``analyzer.MAX_SIZE``). No character is read from such a patch, so a
  method that floods the image loses attribute accuracy; this says why.
- **returning drawn** (%, with ``details``): of each character's appearances after its first scene
  (where isolated attention reads its references), the share the analyzer finds at all, in any
  colour. Attribute accuracy falls when a character is drawn in another colour or not drawn (bent
  out of its shape, drawn twice and merged); this says which.

Higher is better for all but the mixing rate. The paper's SDXL metrics live in
``osa_lib.sdxl_metrics``.
"""
from __future__ import annotations

import numpy as np

from . import world
from .analyzer import MAX_SIZE, analyze_image, largest_detection

__all__ = ["identity_terms", "detail_similarity", "IDENTITY_DETAILS", "id_colours", "read_scene", "is_mixed",
           "colour_kept", "toy_story_metrics", "METRIC_NAMES", "classify_scene", "check_prompt"]

METRIC_NAMES = ("IIS-toy", "colour kept", "attribute accuracy", "mixing rate", "TIS-toy")
IDENTITY_DETAILS = ("hue", "brightness", "size", "mark")  # the terms IIS-toy averages
SKY_ROWS, GROUND_ROWS = slice(0, 6), slice(26, 32)  # sky and ground for every scene's horizon
HUE_SCALE, SIZE_SCALE, VALUE_SCALE = 20.0, 3.0, 0.2  # differences at which a term reaches 0


def identity_terms(a, b) -> dict[str, float]:
    """Per-detail similarity, each in [0, 1], of two detections (keys: ``IDENTITY_DETAILS``)."""
    hue_gap = abs((a.hue - b.hue + 180) % 360 - 180)
    return {"hue": 1 - min(1.0, hue_gap / HUE_SCALE),
            "brightness": 1 - min(1.0, abs(a.value - b.value) / VALUE_SCALE),
            "size": 1 - min(1.0, abs(a.size - b.size) / SIZE_SCALE),
            "mark": float(a.mark == b.mark and (a.mark == "none" or a.mark_tone == b.mark_tone))}


def detail_similarity(a, b) -> float:
    """Similarity in [0, 1] of two detections' identity details: the mean of ``identity_terms``.

    (Not ``sdxl_metrics.identity_similarity``, which compares CLIP embeddings of crops.)"""
    return float(np.mean(list(identity_terms(a, b).values())))


def id_colours(story) -> dict[str, str | None]:
    """Each character's colour word, read from its ID prompt (None when it names no colour)."""
    return {n: world.parse_caption(c.id_prompt, id_prompt=True)["characters"][0]["colour"]
            for n, c in story.characters.items()}


def read_scene(story, scene, image, detected: list | None = None) -> dict:
    """The analyzer's detection of each character of ``scene`` in ``image`` (None: not drawn);
    ``detected``: ``analyze_image(image)`` when already computed."""
    detected = analyze_image(image) if detected is None else detected
    return {n: largest_detection(detected, story.characters[n].word) for n in scene.characters}


def is_mixed(found: dict, id_colour: dict[str, str | None]) -> bool:
    """A character of the scene is drawn in the colour of another character of the scene: the
    other's named colour, or for an uncoloured other, the colour it is drawn in here."""
    def colour_of(o):
        return id_colour[o] or (found[o].colour if found[o] is not None else None)
    return any(d is not None and d.colour != id_colour[n]
               and d.colour in {colour_of(o) for o in found if o != n} for n, d in found.items())


def colour_kept(drawn: list) -> list[bool]:
    """For one character's detections in scene order, whether each one after the first is in the
    colour family of the first."""
    return [d.colour == drawn[0].colour for d in drawn[1:]]


def toy_story_metrics(story, result, details: bool = False) -> dict:
    """The four toy metrics for one generated story (``StoryResult``) of a toy ``Story``.

    With ``details``, also IIS-toy per identity detail (keys ``"IIS-toy hue"`` etc.: which of
    the unnamed details a method carries from scene to scene) and the counts behind the mixing
    rate: ``"mixed scenes"`` of ``"multi-character scenes"``, and the same for two-character
    scenes alone.
    """
    id_colour = id_colours(story)
    drawn: dict[str, list] = {n: [] for n in story.characters}
    attribute_hits, mixing, mixing_sizes, tis, flooded, returning_drawn, seen = [], [], [], [], [], [], set()
    for scene, res in zip(story.scenes, result.scenes):
        detected = analyze_image(res.image)
        flooded.append(any(d.size > MAX_SIZE for d in detected))
        found = read_scene(story, scene, res.image, detected)
        for name, d in found.items():
            attribute_hits.append(d is not None and id_colour[name] in (None, d.colour))
            if d is not None:
                drawn[name].append(d)
            if name in seen:
                returning_drawn.append(d is not None)
        seen.update(found)
        if len(scene.characters) > 1:
            mixing.append(is_mixed(found, id_colour))
            mixing_sizes.append(len(scene.characters))
        check = check_prompt(res.image, scene.prompt, detected)
        facts = [check["scene_ok"]] + [r["ok"] for r in check["characters"]]
        tis.append(np.mean(facts))
    pairs = [identity_terms(ds[i], ds[j]) for ds in drawn.values()
             for i in range(len(ds)) for j in range(i + 1, len(ds))]
    kept = [k for ds in drawn.values() if ds for k in colour_kept(ds)]
    metrics = {"IIS-toy": 100 * float(np.mean([list(p.values()) for p in pairs])) if pairs else float("nan"),
               "colour kept": 100 * float(np.mean(kept)) if kept else float("nan"),
               "attribute accuracy": 100 * float(np.mean(attribute_hits)),
               "mixing rate": 100 * float(np.mean(mixing)) if mixing else float("nan"),
               "TIS-toy": 100 * float(np.mean(tis)),
               "seconds per scene": float(np.mean([s.seconds for s in result.scenes]))}
    if details:
        metrics["mixed scenes"], metrics["multi-character scenes"] = int(sum(mixing)), len(mixing)
        two = [mixed for mixed, size in zip(mixing, mixing_sizes) if size == 2]
        metrics["mixed two-character scenes"], metrics["two-character scenes"] = int(sum(two)), len(two)
        metrics["flood rate"] = 100 * float(np.mean(flooded))
        metrics["returning drawn"] = 100 * float(np.mean(returning_drawn)) if returning_drawn else float("nan")
        for detail in IDENTITY_DETAILS:
            metrics[f"IIS-toy {detail}"] = 100 * float(np.mean([p[detail] for p in pairs])) if pairs else float("nan")
    return metrics


def classify_scene(image: np.ndarray, character_mask: np.ndarray | None = None) -> str:
    """Scene word from the background: nearest (sky, ground) palette, ignoring character pixels."""
    image = np.asarray(image, np.float32)
    if image.max() <= 1.0:
        image = image * 255.0
    keep = np.ones(image.shape[:2], bool) if character_mask is None else ~character_mask
    def mean_colour(rows):
        pixels = image[rows][keep[rows]]
        # median: robust to character pixels the analyzer did not claim (soft edges of generated shapes)
        return np.median(pixels, 0) if len(pixels) else np.median(image[rows].reshape(-1, 3), 0)
    sky, ground = mean_colour(SKY_ROWS), mean_colour(GROUND_ROWS)
    distances = {name: np.linalg.norm(sky - np.array(s)) + np.linalg.norm(ground - np.array(g))
                 for name, (s, g, _) in world.BACKGROUNDS.items()}
    return min(distances, key=distances.get)


def check_prompt(image: np.ndarray, prompt: str, detected: list | None = None) -> dict:
    """Which facts of a toy prompt the image shows: scene, and per character shape and colour;
    ``detected``: ``analyze_image(image)`` when already computed."""
    parsed = world.parse_caption(prompt)
    detected = analyze_image(image) if detected is None else detected
    union = np.zeros(image.shape[:2], bool)
    for d in detected:
        union |= d.mask
    rows = []
    for c in parsed["characters"]:
        best = largest_detection(detected, c["shape"])
        colour_ok = best is not None and (c["colour"] is None or best.colour == c["colour"])
        rows.append({"shape": c["shape"], "colour": c["colour"], "found": best is not None,
                     "found_colour": None if best is None else best.colour, "ok": bool(colour_ok)})
    scene = classify_scene(image, union)
    return {"scene": parsed["scene"], "found_scene": scene, "scene_ok": scene == parsed["scene"],
            "characters": rows, "n_detected": len(detected),
            "all_ok": scene == parsed["scene"] and all(r["ok"] for r in rows)}
