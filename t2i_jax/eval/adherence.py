"""Prompt adherence for the synthetic shapes domain, read straight from pixels.

A shapes prompt ("a small red circle on a blue background") names four
attributes that a few pixel statistics recover without any learned model:

- background colour: the per-channel median of a border band of pixels,
  classified as the nearest palette colour (`shapes.COLORS`) in CIELAB;
- shape colour: the median of the core of the shape (the half of its pixels
  farthest from the background colour, clear of the blended rim), nearest
  palette colour other than the background one (the generator never draws a
  shape in its background colour);
- shape kind: from the foreground mask's largest 4-connected component, the
  fill ratio of its bounding box (square 1, circle pi/4, triangle 1/2), the
  skewness of its mass along rows and columns (a triangle's profile is
  lopsided, a disc's and a square's are not) and how full the corners of the
  box are (a square's are, a circle's are not); nearest prototype;
- size: the component's extent (longer box side) over the image side,
  nearest `shapes.SIZES` fraction in log space.

The foreground mask is every pixel nearer (in Lab) to the shape colour than
to the background colour. That is a 50% threshold between the two, so a
symmetric blur moves no straight edge, and noise flips a pixel only when it
moves it halfway across palette colours at least ~100 RGB units apart.

Colours outside the default palette (`shapes.EXTRA_COLORS`, e.g. "teal" for a
LoRA taught a new colour) join the palette only where a call names them
(`extra_colors`), so every default classification stays as it was; captions
with those words always parse.

The image is classified from its pixels alone; only then are the predictions
compared with what the prompt says (`parse_caption`, the inverse of
`shapes.shapes_caption`, tolerant of wording).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from t2i_jax.data.shapes import COLORS, EXTRA_COLORS, SHAPES, SIZES

__all__ = ["ATTRIBUTES", "ShapesPrompt", "parse_caption", "srgb_to_lab", "nearest_color", "shape_features",
           "classify_shape", "classify_size", "analyze_image",
           "AdherenceReport", "evaluate", "format_adherence_table"]

ATTRIBUTES = ("background", "color", "shape", "size")
_COLOR_NAMES = tuple(COLORS)
_COLOR_WORDS = {**COLORS, **EXTRA_COLORS}  # what a caption may name
# Features of the ideal shapes (see `shape_features`): (bounding-box fill
# ratio, skewness, corner fullness). A triangle's two base corners are full.
_PROTOTYPES = {"square": (1.0, 0.0, 1.0), "circle": (np.pi / 4, 0.0, 0.0),
               "triangle": (0.5, 2 * np.sqrt(2) / 5, 0.5)}
# How much each feature counts in the nearest-prototype distance. The fill
# ratio alone confuses a small pixelated disc (fill up to ~0.89) with a square
# and a small triangle (up to ~0.67) with a disc; skew and corners settle
# those. Skew counts most: it separates triangles from the rest most widely
# under noise and blur (<= 0.15 vs >= 0.35 at 32 px, sigma 8/255, blur 0.6 px).
_WEIGHTS = (1.0, 4.0, 1.0)
# Lab distance above which a pixel is surely not background (palette colours
# are >= 31 apart, blue-purple; sigma 8/255 RGB noise is ~3 in Lab).
_FG_TOLERANCE = 15.0
# Images larger than this are box-downsampled first: the statistics need no
# more pixels, and the connected-component search is plain Python.
_MAX_SIDE = 256
# A component smaller than this many pixels is not taken for a shape.
_MIN_AREA = 4


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapesPrompt:
    """The attributes a shapes prompt states; None for an attribute it leaves out."""

    shape: str | None
    color: str | None = None
    size: str | None = None
    background: str | None = None

    def stated(self) -> dict[str, str]:
        """{attribute: value} for the attributes the prompt names."""
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


def _nearest_before(positions: Sequence[int], anchor: int, window: int) -> int | None:
    """The largest position in [anchor - window, anchor), if any."""
    before = [p for p in positions if anchor - window <= p < anchor]
    return max(before) if before else None


def parse_caption(text: str) -> ShapesPrompt | None:
    """The shapes attributes a caption states, or None if it names no single shape.

    Reads words, not a template: the shape is the one shape word (`SHAPES`,
    singular); the background is the colour word just before "background";
    the shape's colour and size are the colour and size words just before the
    shape word (within three words), e.g. "a small red circle on a blue
    background", "a blue background with a small red circle", "small red
    circle, blue background", "cinematic photo of a red circle". A caption
    that names two different shapes is not a single-shape prompt (None).
    """
    words = re.findall(r"[a-z]+", text.lower())
    shape_at = [i for i, w in enumerate(words) if w in SHAPES]
    if not shape_at or len({words[i] for i in shape_at}) > 1:
        return None
    shape_pos = shape_at[0]
    color_at = [i for i, w in enumerate(words) if w in _COLOR_WORDS]
    background, bg_pos = None, None
    for i, w in enumerate(words):
        if w == "background":
            bg_pos = _nearest_before(color_at, i, 2)
            background = None if bg_pos is None else words[bg_pos]
            break
    color_pos = _nearest_before([p for p in color_at if p != bg_pos], shape_pos, 3)
    size_pos = _nearest_before([i for i, w in enumerate(words) if w in SIZES], shape_pos, 3)
    return ShapesPrompt(
        shape=words[shape_pos],
        color=None if color_pos is None else words[color_pos],
        size=None if size_pos is None else words[size_pos],
        background=background,
    )


# --------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 255] (any leading shape, last axis 3) -> CIELAB (D65), float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = srgb_to_lab(np.array([COLORS[n] for n in _COLOR_NAMES]))


def _palette(extra_colors: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    if not extra_colors:
        return _COLOR_NAMES, _PALETTE_LAB
    unknown = [c for c in extra_colors if c not in EXTRA_COLORS]
    if unknown:
        raise ValueError(f"extra_colors {unknown} are not shapes.EXTRA_COLORS ({list(EXTRA_COLORS)})")
    names = _COLOR_NAMES + tuple(c for c in extra_colors if c not in _COLOR_NAMES)
    return names, srgb_to_lab(np.array([_COLOR_WORDS[n] for n in names]))


def nearest_color(rgb: Sequence[float], exclude: str | None = None,
                  extra_colors: Sequence[str] = ()) -> tuple[str, float]:
    """The palette colour nearest to an sRGB colour in Lab, and its distance (CIE76 delta E);
    `extra_colors` (names in `shapes.EXTRA_COLORS`) join the palette."""
    names, lab = _palette(extra_colors)
    d = np.linalg.norm(lab - srgb_to_lab(np.asarray(rgb, np.float64)), axis=-1)
    if exclude is not None and exclude in names:
        d[names.index(exclude)] = np.inf
    k = int(np.argmin(d))
    return names[k], float(d[k])


def _as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB from uint8 or float [0, 1] input, gray or RGBA too."""
    im = np.asarray(image)
    if im.ndim == 2:
        im = im[..., None]
    if im.ndim != 3 or im.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image of shape {im.shape} is not HWC with 1, 3 or 4 channels")
    if im.shape[-1] == 1:
        im = np.repeat(im, 3, axis=-1)
    im = im[..., :3]
    if im.dtype != np.uint8:
        im = np.clip(np.round(np.asarray(im, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return im


def _downsample(im: np.ndarray) -> np.ndarray:
    """Box-averages by an integer factor until the longer side is at most _MAX_SIDE."""
    factor = -(-max(im.shape[:2]) // _MAX_SIDE)
    if factor <= 1:
        return im
    h, w = (im.shape[0] // factor) * factor, (im.shape[1] // factor) * factor
    x = im[:h, :w].astype(np.float64).reshape(h // factor, factor, w // factor, factor, 3)
    return np.round(x.mean(axis=(1, 3))).astype(np.uint8)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool mask (first in raster order on ties)."""
    # Imported here: scipy.ndimage takes 0.5 s to import, and `t2i_jax.eval`
    # (which the CLIP trainer imports for retrieval) loads this module.
    from scipy import ndimage

    # ndimage.label numbers components in raster order of their first pixel,
    # and argmax takes the first of equal sizes.
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def shape_features(mask: np.ndarray, alpha: np.ndarray) -> dict[str, float]:
    """Statistics of one shape: a bool mask (one component) and a soft coverage map.

    `alpha` is each pixel's position between the background (0) and shape (1)
    colours; blur spreads it but keeps its mass, centroid and third central
    moments.
    fill: mask area / mask bounding-box area. skew: the larger absolute
    skewness of alpha's row and column marginals (0 for a disc or a square;
    for a triangle its triangular profile gives 2 * sqrt(2) / 5 = 0.566, and a
    gaussian blur, whose third cumulant is 0, lowers it only by raising the
    variance). corners: mean fullness of four corner boxes of the mask's
    bounding box, each a fifth of its side. extent: longer box side in pixels.
    """
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    box = mask[y0:y1 + 1, x0:x1 + 1]
    ch, cw = max(1, round(h / 5)), max(1, round(w / 5))
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    # Soft moments over the mask grown by one pixel (where a slight blur puts
    # the rim), coverage clipped to [0, 1]: the background's noise, weighted
    # by the cubed distance, would otherwise swamp a small shape's skewness.
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    a = np.where(grown, np.clip(alpha, 0.0, 1.0), 0.0)
    skews = []
    for marginal in (a.sum(axis=1), a.sum(axis=0)):
        t = np.arange(len(marginal), dtype=np.float64)
        m = max(marginal.sum(), 1e-9)
        mu = (marginal * t).sum() / m
        var = (marginal * (t - mu) ** 2).sum() / m
        skews.append(abs((marginal * (t - mu) ** 3).sum() / m) / max(var, 1e-9) ** 1.5)
    return {"fill": len(ys) / (h * w), "skew": float(max(skews)), "corners": float(corners),
            "extent": float(max(h, w)), "area": float(len(ys))}


def classify_shape(features: dict[str, float]) -> str:
    """The prototype (`_PROTOTYPES`) nearest to (fill, skew, corners), weighted by `_WEIGHTS`."""
    v = np.array([features["fill"], features["skew"], features["corners"]])
    d = {k: float(np.sqrt(np.sum(np.asarray(_WEIGHTS) * (v - np.array(p)) ** 2))) for k, p in _PROTOTYPES.items()}
    return min(d, key=d.get)


def classify_size(extent_fraction: float) -> str:
    """The `SIZES` name whose extent fraction is nearest in log space."""
    names = list(SIZES)
    d = [abs(np.log(max(extent_fraction, 1e-6) / SIZES[n])) for n in names]
    return names[int(np.argmin(d))]


def _core_median(im: np.ndarray, d_bg: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Median colour of the half of the `where` pixels farthest from the background.

    Blur and antialiasing blend a shape's rim with the background; its core
    keeps the shape's colour.
    """
    d = d_bg[where]
    return np.median(im[where][d >= np.median(d)], axis=0)


def analyze_image(image: np.ndarray, extra_colors: Sequence[str] = ()) -> dict[str, Any]:
    """Predicted shapes attributes of one image, from its pixels alone.

    Args:
      image: HWC uint8 RGB (or float in [0, 1]; gray and RGBA are accepted).
      extra_colors: `shapes.EXTRA_COLORS` names that may be the shape's colour (never the
        background's: sources draw backgrounds from `COLORS` only).
    Returns {"background", "color", "shape", "size"} (shape, colour and size
    are None when no shape is found) and the measurements behind them:
    "background_rgb", "color_rgb", "fill", "skew", "corners", "extent"
    (fraction of the image's shorter side), "area" (fraction of the image).
    """
    im = _downsample(_as_uint8_rgb(image))
    h, w = im.shape[:2]
    side = min(h, w)
    band = max(1, side // 64)
    border = np.concatenate([im[:band].reshape(-1, 3), im[-band:].reshape(-1, 3),
                             im[band:-band, :band].reshape(-1, 3), im[band:-band, -band:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background, _ = nearest_color(bg_rgb)
    out: dict[str, Any] = {"background": background, "color": None, "shape": None, "size": None,
                           "background_rgb": [float(v) for v in bg_rgb]}
    lab = srgb_to_lab(im)
    d_bg = np.linalg.norm(lab - srgb_to_lab(bg_rgb), axis=-1)
    sure = d_bg > _FG_TOLERANCE
    if sure.sum() < _MIN_AREA:
        return out
    # The mask: pixels nearer the shape colour than the background colour, a
    # threshold halfway between them that a symmetric blur leaves in place.
    fg_rgb = _core_median(im, d_bg, sure)
    d_fg = np.linalg.norm(lab - srgb_to_lab(fg_rgb), axis=-1)
    mask = _largest_component(d_fg < d_bg)
    if mask.sum() < _MIN_AREA:
        return out
    color_rgb = _core_median(im, d_bg, mask)
    # Coverage: projection onto the background->shape line in sRGB, where
    # blur and the decoder's blending are (nearly) linear.
    v = color_rgb - bg_rgb
    alpha = (im.astype(np.float64) - bg_rgb) @ v / max(float(v @ v), 1e-9)
    f = shape_features(mask, alpha)
    out.update(
        color=nearest_color(color_rgb, exclude=background, extra_colors=extra_colors)[0],
        shape=classify_shape(f),
        size=classify_size(f["extent"] / side),
        color_rgb=[float(c) for c in color_rgb],
        fill=f["fill"], skew=f["skew"], corners=f["corners"],
        extent=f["extent"] / side, area=f["area"] / (h * w),
    )
    return out


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


@dataclasses.dataclass
class AdherenceReport:
    """Prompt adherence of a set of images.

    accuracy: {attribute: fraction correct} over the images whose prompt
    states that attribute, plus "all": every stated attribute correct.
    counts: {attribute: number of images scored on it} (and "all").
    num_images / num_parsed: images given / with a prompt that parsed.
    per_image: one dict per image: "prompt", "parsed" (bool), "expected",
    "predicted", "correct" ({attribute: bool}), and the measurements.
    """

    accuracy: dict[str, float]
    counts: dict[str, int]
    num_images: int
    num_parsed: int
    per_image: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def evaluate(images: Sequence[np.ndarray], prompts: Sequence[str], extra_colors: Sequence[str] = ()) -> AdherenceReport:
    """Scores each image against the shapes attributes its prompt states; `extra_colors`
    (`shapes.EXTRA_COLORS` names) join the shape-colour palette (`analyze_image`).

    Images whose prompt does not parse (`parse_caption` gives None) are listed
    in `per_image` but left out of every accuracy.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    per_image = []
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    counts = {a: 0 for a in (*ATTRIBUTES, "all")}
    for image, prompt in zip(images, prompts):
        parsed = parse_caption(prompt)
        pred = analyze_image(image, extra_colors)
        row: dict[str, Any] = {"prompt": prompt, "parsed": parsed is not None,
                               "predicted": {a: pred[a] for a in ATTRIBUTES},
                               "measurements": {k: v for k, v in pred.items() if k not in ATTRIBUTES}}
        if parsed is not None:
            expected = parsed.stated()
            correct = {a: pred[a] == v for a, v in expected.items()}
            for a, ok in correct.items():
                hits[a] += ok
                counts[a] += 1
            hits["all"] += all(correct.values())
            counts["all"] += 1
            row.update(expected=expected, correct=correct)
        per_image.append(row)
    accuracy = {a: hits[a] / counts[a] for a in counts if counts[a]}
    return AdherenceReport(accuracy=accuracy, counts={a: c for a, c in counts.items() if c},
                           num_images=len(images), num_parsed=counts["all"], per_image=per_image)


def format_adherence_table(results: dict[str, AdherenceReport] | AdherenceReport) -> str:
    """A text table of accuracies in percent, one row per named report."""
    if isinstance(results, AdherenceReport):
        results = {"adherence": results}
    cols = (*ATTRIBUTES, "all")
    width = max(10, *(len(n) + 2 for n in results))
    lines = [f"{'':{width}s}" + "".join(f"{c:>12s}" for c in cols) + f"{'parsed':>12s}"]
    for name, r in results.items():
        cells = "".join(f"{100 * r.accuracy[c]:12.1f}" if c in r.accuracy else f"{'-':>12s}" for c in cols)
        lines.append(f"{name:{width}s}" + cells + f"{f'{r.num_parsed}/{r.num_images}':>12s}")
    return "\n".join(lines)
