"""The built-in `shapes` dataset: coloured geometric objects with natural captions, generated deterministically.

Every image is a function of (seed, index) alone, so any prefix of a split is the same whatever the count, and the
arrays are cached on disk (``$VLMEDGE_CACHE/shapes``). Each sample keeps its structured description (objects, their
colour, shape, size, position and, for two objects, their spatial relation), which gives

* captions from several templates, drawn anew at every use;
* an exact image-caption match matrix (a caption matches every image it truly describes): training leaves such
  pairs out of the contrastive softmax, so two images of "a red circle" in one batch are not pushed apart;
* evaluation sets: zero-shot colour x shape classes, retrieval pairs and hard negatives (colour or relation swapped).

A set of colour x shape combinations (`HELD_OUT`) never appears in the ``train`` split: the compositional test.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .._progress import Progress
from ..disk import atomic_file, cache_dir
from ..errors import VlmedgeError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")
SIZES = ("small", "large")
# One combination per colour and per shape, so every colour and every shape is still seen in training.
HELD_OUT = frozenset((c, SHAPES[(i + 2) % len(SHAPES)]) for i, c in enumerate(COLOURS))
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
TWO_OBJECT_FRACTION = 0.3

_H = ("left", "center", "right")
_V = ("top", "middle", "bottom")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    x: float  # centre, fraction of the width
    y: float

    @property
    def cell(self) -> tuple[int, int]:
        """(column, row) of the 3 x 3 grid the centre falls in."""
        return min(int(self.x * 3), 2), min(int(self.y * 3), 2)

    @property
    def position(self) -> str:
        col, row = self.cell
        h, v = _H[col], _V[row]
        if h == "center" and v == "middle":
            return "center"
        if v == "middle":
            return h
        if h == "center":
            return v
        return f"{v} {h}"


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`, along the axis on which they differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


# --- sampling ------------------------------------------------------------------------------------------------------

# Objects sit in the cells of a 3 x 3 grid (centres at 0.2, 0.5, 0.8 of the side, jittered by less than the gap to
# a cell border), so a caption's "top left" or "to the left of" is never a coin flip at a border: with positions
# drawn uniformly, an object centred 1 px either side of a third of the image got a different caption, and a small
# ViT learned no position at all (a linear probe of its embeddings read the 9 positions at chance).
CELL_CENTRES = (0.2, 0.5, 0.8)
CELL_JITTER = 0.04


def _sample_objects(rng: np.random.Generator, split: str, single: bool) -> list[Obj]:
    n = 1 if single or rng.random() >= TWO_OBJECT_FRACTION else 2
    objs: list[Obj] = []
    while len(objs) < n:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        if split == "train" and (colour, shape) in HELD_OUT:
            continue
        size = str(rng.choice(SIZES))
        col, row = (int(v) for v in rng.integers(3, size=2))
        if objs:
            other = objs[0]
            other_col, other_row = other.cell
            if (col == other_col) == (row == other_row):
                continue  # the second object shares exactly one of row and column: one clear relation
            if colour == other.colour and shape == other.shape:
                continue
        x, y = (CELL_CENTRES[v] + rng.uniform(-CELL_JITTER, CELL_JITTER) for v in (col, row))
        if objs and max(abs(x - objs[0].x), abs(y - objs[0].y)) < _radius(size) + _radius(objs[0].size) + 0.01:
            continue  # touching objects
        objs.append(Obj(colour, shape, size, float(x), float(y)))
    return objs


def _radius(size: str) -> float:
    return 0.11 if size == "small" else 0.15


# --- rendering -----------------------------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.33
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return None  # circle


def render(objs: Sequence[Obj], resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Draw objects on a light grey background; 2x supersampled for smooth edges. Returns HxWx3 uint8.

    The background is neutral on purpose: a random tint competes with a small object's colour in every patch and
    held a from-scratch ViT on a loss plateau.
    """
    from PIL import Image, ImageDraw

    big = resolution * 2
    background = (int(rng.integers(225, 250)),) * 3
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    for o in objs:
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[o.colour], jitter))
        cx, cy, r = o.x * big, o.y * big, _radius(o.size) * big * rng.uniform(0.9, 1.05)
        poly = _polygon(o.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return np.asarray(img.resize((resolution, resolution), Image.BILINEAR), dtype=np.uint8)


# --- captions ------------------------------------------------------------------------------------------------------

_SINGLE_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "an image with one {colour} {shape}",
    "a {size} {shape} coloured {colour}",
    "a picture of a {size} {colour} {shape} {where}",
)
_PAIR_TEMPLATES = (
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a photo of a {c1} {s1} {rel} a {c2} {s2}",
    "there is a {c1} {s1} {rel} a {c2} {s2}",
    "a {z1} {c1} {s1} {rel} a {z2} {c2} {s2}",
)


def where_words(o: Obj) -> str:
    return "in the center" if o.position == "center" else f"on the {o.position}"


def with_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(objs: Sequence[Obj], rng: np.random.Generator) -> tuple[str, tuple]:
    """A caption and its spec: exactly what it claims (attributes mentioned, position, relation)."""
    if len(objs) == 1:
        o = objs[0]
        t = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
        spec = ("one", o.colour if "{colour}" in t else None, o.shape if "{shape}" in t else None,
                o.size if "{size}" in t else None, o.position if "{where}" in t else None)
        return with_articles(t.format(colour=o.colour, shape=o.shape, size=o.size, where=where_words(o))), spec
    a, b = objs if rng.random() < 0.5 else objs[::-1]
    t = _PAIR_TEMPLATES[rng.integers(len(_PAIR_TEMPLATES))]
    sized = "{z1}" in t
    rel = relation(a, b)
    spec = ("two", (a.colour, a.shape, a.size if sized else None), rel, (b.colour, b.shape, b.size if sized else None))
    text = t.format(c1=a.colour, s1=a.shape, z1=a.size, c2=b.colour, s2=b.shape, z2=b.size, rel=rel)
    return with_articles(text), spec


def _has(o: Obj, colour, shape, size) -> bool:
    return (colour is None or o.colour == colour) and (shape is None or o.shape == shape) \
        and (size is None or o.size == size)


def matches(objs: Sequence[Obj], spec: tuple) -> bool:
    """Does a caption with this spec truthfully describe an image with these objects?"""
    if spec[0] == "one":
        _, colour, shape, size, where = spec
        return len(objs) == 1 and _has(objs[0], colour, shape, size) and (where is None or objs[0].position == where)
    if len(objs) != 2:
        return False
    _, a, rel, b = spec
    return any(_has(x, *a) and _has(y, *b) and relation(x, y) == rel for x, y in (objs, objs[::-1]))


def negative_caption(objs: Sequence[Obj], rng: np.random.Generator) -> tuple[str, tuple]:
    """A caption (and its spec) that is false for these objects and true for a scene one edit away: the two objects
    swapped (so the relation reads backwards), or the one object's colour, shape, size or position changed. The
    text-side hard negative of NegCLIP (Yuksekgonul et al., 2023): the contrastive loss sees it beside the true
    caption, so the text tower must encode the word that changed."""
    if len(objs) == 2:
        a, b = objs
        scenes = [[Obj(b.colour, b.shape, b.size, a.x, a.y), Obj(a.colour, a.shape, a.size, b.x, b.y)]]
    else:
        o = objs[0]
        cells = [(c, r) for c in range(3) for r in range(3) if (c, r) != o.cell]
        c, r = cells[rng.integers(len(cells))]
        scenes = [[Obj(str(rng.choice([k for k in COLOURS if k != o.colour])), o.shape, o.size, o.x, o.y)],
                  [Obj(o.colour, str(rng.choice([k for k in SHAPES if k != o.shape])), o.size, o.x, o.y)],
                  [Obj(o.colour, o.shape, "large" if o.size == "small" else "small", o.x, o.y)],
                  [Obj(o.colour, o.shape, o.size, CELL_CENTRES[c], CELL_CENTRES[r])]]
    for _ in range(16):  # a template that does not name the changed attribute would be true: draw again
        text, spec = caption(scenes[rng.integers(len(scenes))], rng)
        if not matches(objs, spec):
            return text, spec
    return text, spec  # unreachable for shapes' templates (each scene changes an attribute most templates name)


# --- the dataset ---------------------------------------------------------------------------------------------------

@dataclass
class ShapesData:
    """A split of the shapes dataset held in memory: images (N,H,W,3 uint8) and structured objects."""

    images: np.ndarray
    objects: list[list[Obj]]
    split: str
    seed: int

    def __len__(self) -> int:
        return len(self.objects)

    def captions(self, indices: Sequence[int], rng: np.random.Generator) -> list[str]:
        """Full captions (colour and shape always named): what evaluation uses."""
        return [caption(self.objects[i], rng)[0] for i in indices]

    def training_captions(self, indices: Sequence[int], rng: np.random.Generator):
        """Captions with their specs (for `match`)."""
        texts, specs = zip(*(caption(self.objects[i], rng) for i in indices))
        return list(texts), list(specs)

    def negative_captions(self, indices: Sequence[int], rng: np.random.Generator):
        """One false caption per image that differs from a true one in one thing (`negative_caption`), with specs."""
        texts, specs = zip(*(negative_caption(self.objects[i], rng) for i in indices))
        return list(texts), list(specs)

    def match(self, indices: Sequence[int], specs: Sequence[tuple]) -> np.ndarray:
        """match[i, j]: caption j (by its spec) truthfully describes image indices[i]."""
        return np.array([[matches(self.objects[i], sp) for sp in specs] for i in indices], dtype=np.float32)


def _cache_path(split: str, count: int, resolution: int, seed: int, single: bool) -> Path:
    spec = json.dumps({"v": 4, "split": split, "n": count, "res": resolution, "seed": seed, "single": single,
                       "colours": COLOURS, "shapes": SHAPES})
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return cache_dir() / "shapes" / f"{split}-{count}-{resolution}px{'-single' if single else ''}-{digest}.npz"


def load_shapes(split: str = "train", count: int = 20000, resolution: int = 64, seed: int = 0,
                single_object: bool = False, progress: bool = False) -> ShapesData:
    """Generate (or load from the cache) `count` images of a split. `seed` offsets every split's own seed."""
    if split not in SPLIT_SEEDS:
        raise VlmedgeError(f"shapes: unknown split {split!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    base_seed = SPLIT_SEEDS[split] + 1000 * seed + (500 if single_object else 0)
    path = _cache_path(split, count, resolution, base_seed, single_object)
    objects = [_sample_objects(np.random.default_rng([base_seed, i, 0]), split, single_object) for i in range(count)]
    if path.exists():
        try:
            with np.load(path) as z:
                images = z["images"]
            if images.shape == (count, resolution, resolution, 3):
                return ShapesData(images, objects, split, seed)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is regenerated
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    with Progress(f"rendering shapes/{split}", count, enabled=progress, unit="images") as bar:
        for i in range(count):
            images[i] = render(objects[i], resolution, np.random.default_rng([base_seed, i, 1]))
            bar.update(i + 1)
    with atomic_file(path, "wb") as f:  # DDP ranks may render the same split at once
        np.savez(f, images=images)
    return ShapesData(images, objects, split, seed)


# --- evaluation sets -----------------------------------------------------------------------------------------------

ZERO_SHOT_TEMPLATES = ("a {colour} {shape}", "a photo of a {colour} {shape}", "an image with one {colour} {shape}")


def zero_shot_classes() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def zero_shot_prompts(colour: str, shape: str) -> list[str]:
    return [with_articles(t.format(colour=colour, shape=shape)) for t in ZERO_SHOT_TEMPLATES]


def swapped_caption(objs: Sequence[Obj], kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """A true caption and a false one that differs only in `kind`: colour, shape, position (one object; the object
    moved to another cell of the 3 x 3 grid) or relation (two objects, swapped)."""
    if kind == "relation":
        a, b = objs
        rel = relation(a, b)
        t = _PAIR_TEMPLATES[rng.integers(len(_PAIR_TEMPLATES))]
        fmt = dict(rel=rel)
        true = t.format(c1=a.colour, s1=a.shape, z1=a.size, c2=b.colour, s2=b.shape, z2=b.size, **fmt)
        false = t.format(c1=b.colour, s1=b.shape, z1=b.size, c2=a.colour, s2=a.shape, z2=a.size, **fmt)
        return with_articles(true), with_articles(false)
    o = objs[0]
    if kind == "position":
        placed = [t for t in _SINGLE_TEMPLATES if "{where}" in t]
        t = placed[rng.integers(len(placed))]
        cells = [(c, r) for c in range(3) for r in range(3) if (c, r) != o.cell]
        c, r = cells[rng.integers(len(cells))]
        other = Obj(o.colour, o.shape, o.size, CELL_CENTRES[c], CELL_CENTRES[r])
    else:
        t = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
        other = Obj(str(rng.choice([c for c in COLOURS if c != o.colour])), o.shape, o.size, o.x, o.y) \
            if kind == "colour" else Obj(o.colour, str(rng.choice([s for s in SHAPES if s != o.shape])), o.size,
                                         o.x, o.y)
    fmt = lambda x: with_articles(t.format(colour=x.colour, shape=x.shape, size=x.size, where=where_words(x)))  # noqa: E731
    return fmt(o), fmt(other)
