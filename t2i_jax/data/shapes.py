"""Synthetic "shapes": one flat-coloured circle, square or triangle on a flat background.

A tiny text-to-image domain whose captions can be checked from pixels: every
image is drawn from (shape, colour, size, background colour, position), and
the caption says the first four ("a small red circle on a blue background").
Colours are exact palette values (no antialiasing), so an evaluator can
classify a generated image by nearest palette colour of its corners
(background) and of its non-background pixels (shape colour, and their count
for the size). `COLORS`, `SHAPES`, `SIZES` are public for that purpose.

Splits (each in its own random stream, so no two splits share an image):
- "train": every (shape, colour) pair except the held-out ones;
- "eval": the same combinations as train, fresh images;
- "holdout": only the held-out (shape, colour) pairs, for testing whether a
  model composes attributes it saw only apart.

`EXTRA_COLORS` are colours the default source never draws (and the bundled
model never saw), for teaching a model a new colour word (LoRA, DreamBooth):
`ShapesSource(colors=[...])` draws shapes in the colours it names (any of
`COLORS` and `EXTRA_COLORS`), always on a `COLORS` background.

Record i of a split depends only on (seed, split, i, resolution), never on the
length or on which other records were read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

__all__ = ["COLORS", "EXTRA_COLORS", "DEFAULT_HOLDOUT", "SHAPES", "SIZES", "SPLITS", "ShapesSource", "render",
           "shapes_caption"]

# name -> RGB. Chosen far apart in RGB so nearest-colour classification of
# generated images is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 0),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Colours outside the default palette: drawn only where a source names them (`colors`), and
# scored only where an evaluation names them (`t2i_jax.eval.adherence.evaluate(extra_colors=)`),
# so nothing the default palette gives changes. Teal is >= 53 Lab units from every colour above.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"teal": (0, 128, 128)}
_RGB = {**COLORS, **EXTRA_COLORS}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# name -> extent of the shape (diameter / side / base) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.4, "large": 0.65}
# (shape, colour) pairs never shown in "train"; "holdout" shows only these.
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("circle", "blue"), ("square", "red"), ("triangle", "green"), ("circle", "yellow"))
SPLITS = ("train", "eval", "holdout")
# Length of an "infinite" source: grain samplers need a finite size; at one
# record per step no run reaches it.
_INFINITE = 2**31 - 1

_TEMPLATES = (
    "a {size} {color} {shape} on a {background} background",
    "a {background} background with a {size} {color} {shape}",
    "{size} {color} {shape}, {background} background",
)


def shapes_caption(shape: str, color: str, size: str, background: str, template: int = 0) -> str:
    """The caption of one combination; template 0 is the canonical one."""
    return _TEMPLATES[template].format(shape=shape, color=color, size=size, background=background)


def render(shape: str, color: str, size: str, background: str, center: tuple[float, float],
           resolution: int) -> np.ndarray:
    """Draws one image, uint8 [resolution, resolution, 3]; `center` is (row, col) in pixels.

    The shape fills the pixels whose centres fall inside it: a disc, an axis-
    aligned square, or an upward isosceles triangle filling the same box.
    """
    half = SIZES[size] * resolution / 2
    cy, cx = center
    y, x = np.mgrid[0:resolution, 0:resolution] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        mask = dy**2 + dx**2 <= half**2
    elif shape == "square":
        mask = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    elif shape == "triangle":
        # Apex at (cy - half, cx), base from (cy + half, cx +- half): the width
        # grows linearly from 0 at the apex to 2 * half at the base.
        mask = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")
    img = np.empty((resolution, resolution, 3), np.uint8)
    img[...] = _RGB[background]
    img[mask] = _RGB[color]
    return img


class ShapesSource:
    """Deterministic synthetic shapes, a grain random-access source.

    `source[i]` is `{"image": uint8 [R, R, 3], "captions": [3 phrasings],
    "key": "shapes/<split>/<i>", "shape", "color", "size", "background"}`.
    """

    def __init__(self, resolution: int = 64, *, split: str = "train", seed: int = 0, length: int | None = None,
                 holdout: Iterable[tuple[str, str]] = DEFAULT_HOLDOUT, colors: Iterable[str] | None = None):
        """Args:
          resolution: image side in pixels (at least 16).
          split: "train", "eval" (train combinations, other images) or "holdout".
          seed: selects the stream; a split's records are a function of (seed, split, index).
          length: number of records; None for an effectively infinite source (2**31 - 1).
          holdout: (shape, colour) pairs kept out of train/eval and used alone in holdout.
          colors: the shape colours drawn (names from `COLORS` or `EXTRA_COLORS`); None: `COLORS`.
            A colour named k times is drawn k times as often. Backgrounds are always `COLORS`.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; choose from {list(SPLITS)}")
        if resolution < 16:
            raise ValueError(f"shapes resolution {resolution} is too small to draw a small shape; use 16 or more")
        if length is not None and length <= 0:
            raise ValueError(f"shapes length {length} must be positive, or None for an endless source")
        holdout = tuple(sorted((str(s), str(c)) for s, c in holdout))
        shape_colors = tuple(COLORS) if colors is None else tuple(str(c) for c in colors)
        unknown = [c for c in shape_colors if c not in _RGB]
        if unknown or not shape_colors:
            raise ValueError(f"shapes colors {unknown or list(shape_colors)}: choose from {list(_RGB)}")
        for s, c in holdout:
            if s not in SHAPES or c not in COLORS:
                raise ValueError(f"held-out pair ({s!r}, {c!r}) is not a (shape, colour) pair; shapes are "
                                 f"{list(SHAPES)}, colours {list(COLORS)}")
        self.resolution = resolution
        self.split = split
        self.seed = seed
        self.length = length
        self.holdout = holdout
        self.colors = None if colors is None else shape_colors
        combos = [
            (shape, color, size, bg)
            for shape, color, size, bg in itertools.product(SHAPES, shape_colors, SIZES, COLORS)
            if bg != color and ((shape, color) in holdout) == (split == "holdout")
        ]
        if not combos:
            raise ValueError(f"shapes split {split!r} has no attribute combinations with holdout={holdout}")
        self.combinations = combos

    def __len__(self) -> int:
        return _INFINITE if self.length is None else self.length

    def __repr__(self) -> str:
        return (f"ShapesSource(resolution={self.resolution}, split={self.split!r}, seed={self.seed}, "
                f"length={self.length}, holdout={self.holdout}"
                + ("" if self.colors is None else f", colors={self.colors}") + ")")

    def attributes(self, index: int) -> dict:
        """The drawn attributes of record `index`: shape, color, size, background, center (row, col)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"shapes index {index} out of range [0, {len(self)})")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        shape, color, size, bg = self.combinations[rng.integers(len(self.combinations))]
        # Keep a one-pixel border of background so the corners always show it.
        half = SIZES[size] * self.resolution / 2
        lo, hi = half + 1, self.resolution - half - 1
        cy, cx = rng.uniform(lo, hi, size=2)
        return {"shape": shape, "color": color, "size": size, "background": bg, "center": (float(cy), float(cx))}

    def __getitem__(self, index: int) -> dict:
        a = self.attributes(index)
        fields = {k: a[k] for k in ("shape", "color", "size", "background")}
        return {
            "image": render(**fields, center=a["center"], resolution=self.resolution),
            "captions": [shapes_caption(**fields, template=t) for t in range(len(_TEMPLATES))],
            "key": f"shapes/{self.split}/{int(index)}",
            **fields,
        }
