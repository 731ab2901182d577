"""grain transforms: decode, skip bad images, crop/flip/scale, pick a caption, tokenize.

The order in a loader is

    DecodeImage (Map)  ->  DropBad (Filter)  ->  Preprocess (RandomMap)  ->  [Tokenize (Map)]  ->  Batch

A record that cannot be decoded (missing file, random bytes, truncated JPEG)
becomes a marker `{"error": ..., "key": ...}` in `DecodeImage`, and `DropBad`
filters it out, counting it in a `SkipLog` and logging a warning with the path.
Dropping records inside the grain pipeline (not by raising, not by looping in
Python around the iterator) keeps the iterator state an index into the sampler,
so checkpoints stay exact.

A dataset whose images mostly (or all) fail would make the filter drop record
after record forever, so `DropBad` also enforces a `SkipLimit`: it raises
`TooManyBadImages`, naming the count and some of the bad files with their
reasons, when none of the first `first_good_within` records it saw decoded, or
when more than `max_bad_fraction` of the last `bad_window` records were bad.
Each grain worker process checks the records it reads; the error reaches the
trainer through grain (and the trainer's prefetch thread) like any other.

Randomness (caption choice, random crop offset, flip) comes from the rng grain
hands to `RandomMap`: a Philox stream keyed by (loader seed + position of the
record in the sampler's global order), so it is a function of (seed, epoch,
index) and survives checkpoint/restore and any worker count.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import grain
import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DecodeImage",
    "Delay",
    "DropBad",
    "Preprocess",
    "SkipLimit",
    "SkipLog",
    "Tokenize",
    "TooManyBadImages",
    "decode_image",
]

log = logging.getLogger(__name__)

# The key of the marker record a source or `DecodeImage` returns for a record it could not load.
ERROR_KEY = "error"


class SkipLog:
    """Counts (and remembers) the records skipped because their image would not load.

    In-process by default. grain worker processes each get a pickled copy, so
    for `worker_count > 0` pass `path`: every skip is then also appended as a
    line to that file, and `count` / `skipped` read the file, summing over all
    processes. `count` is cheap enough for every log step: it reads only the
    bytes appended since its last call.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self._skipped: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._read_bytes = 0  # file-backed: how far `count` has read, and the lines it saw there
        self._read_lines = 0

    def add(self, key: str, reason: str) -> None:
        """Records one skipped image (and logs a warning naming it)."""
        log.warning("skipping image %s: %s", key, reason)
        with self._lock:
            self._skipped.append((key, reason))
            if self.path is not None:
                # One short O_APPEND write per line is atomic across processes.
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{key}\t{' '.join(reason.split())}\n")

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path or key, reason) of every skipped record so far."""
        if self.path is None:
            with self._lock:
                return list(self._skipped)
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]

    @property
    def count(self) -> int:
        """Number of records skipped so far (host only: no device work, no full re-read of the file)."""
        with self._lock:
            if self.path is None:
                return len(self._skipped)
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._read_bytes)
                    new = f.read()
            except FileNotFoundError:
                return self._read_lines
            # A line still being written has no newline yet; it is counted on a later call.
            self._read_bytes += len(new)
            self._read_lines += new.count(b"\n")
            return self._read_lines

    def __getstate__(self):
        return {"path": self.path, "_skipped": list(self._skipped)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._read_bytes = self._read_lines = 0

    def __repr__(self) -> str:
        return f"SkipLog(count={self.count}, path={self.path!r})"


class TooManyBadImages(RuntimeError):
    """Raised by `DropBad` when a `SkipLimit` is exceeded (the message says which, and names bad files)."""


@dataclass(frozen=True)
class SkipLimit:
    """When skipping bad images turns into stopping the run (see `DropBad`).

    The data config keys of the same names set these; the defaults let a
    dataset with a few broken files train and stop one that is mostly broken
    after at most `bad_window` records per process.
    """

    # Stop if none of the first N records a process reads decodes (0: no such check). Catches a
    # wrong image folder or an unreadable format early.
    first_good_within: int = 100
    # Stop if more than this fraction of the last `bad_window` records were bad (>= 1: never).
    max_bad_fraction: float = 0.5
    bad_window: int = 1000

    def __post_init__(self):
        if not (isinstance(self.first_good_within, int) and self.first_good_within >= 0):
            raise ValueError(f"first_good_within {self.first_good_within!r} must be an int >= 0 (0: no check); "
                             "the default is 100")
        if not (isinstance(self.bad_window, int) and self.bad_window >= 1):
            raise ValueError(f"bad_window {self.bad_window!r} must be an int >= 1; the default is 1000")
        if not 0 <= float(self.max_bad_fraction):
            raise ValueError(f"max_bad_fraction {self.max_bad_fraction!r} must be a fraction in [0, 1) (0: stop at the "
                             "first bad image; 1 or more turns the window check off); the default is 0.5")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """A 16-bit (uint16, or int32 holding 16-bit values as PIL's mode "I") array -> uint8,
    round(v * 255 / 65535). `convert("RGB")` would clip it to 255 instead: nearly white."""
    v = np.clip(arr.astype(np.int64), 0, 65535)
    # 65535 is odd, so v * 255 / 65535 = v / 257 is never a tie: +32767 then floor rounds it.
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.dtype == np.uint16:
        arr = _to_uint8(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array has dtype {arr.dtype}; expected uint8 (or uint16, scaled to 8 bits)")
    if arr.ndim == 2 or arr.shape[-1] == 1:
        arr = np.repeat(arr.reshape(arr.shape[0], arr.shape[1], 1), 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image array has shape {arr.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    if arr.shape[-1] == 4:
        return _on_white(Image.fromarray(np.ascontiguousarray(arr)))
    return Image.fromarray(np.ascontiguousarray(arr))


def _on_white(img: Image.Image) -> Image.Image:
    """An image with alpha -> RGB, composited over white (what a viewer shows for transparency)."""
    img = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")


def decode_image(image, resolution: int | None = None, *, with_size: bool = False):
    """Path, encoded bytes or array -> uint8 RGB [H, W, 3]; shorter side resized to `resolution`.

    `with_size`: returns (array, (height, width) of the image before any resize, after its EXIF
    orientation), the original size SDXL's micro-conditioning reads.

    Applies EXIF orientation. Modes: 16-bit grayscale (PIL "I;16*", and "I", taken as 16-bit
    values clipped to [0, 65535]) and uint16 arrays are scaled to 8 bits as round(v * 255 / 65535);
    16-bit RGB(A) PNGs come from PIL already cut to their high byte (within 1 of that); images
    with alpha (RGBA, LA, PA, palette with transparency, 4-channel arrays) are composited over
    white; palette, bilevel, CMYK and YCbCr images are converted by PIL. Raises on a missing or
    undecodable file.
    """
    if isinstance(image, np.ndarray):
        img = _array_to_image(image)
        original = (img.size[1], img.size[0])
    else:
        img = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray, np.bytes_)) else image)
        # Read before `draft` shrinks a JPEG; EXIF orientations 5-8 turn the image by 90 degrees.
        original = (img.size[1], img.size[0])
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            original = original[::-1]
        if resolution is not None and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale that still covers the target size.
            scale = resolution / min(img.size)
            img.draft("RGB", (int(np.ceil(img.size[0] * scale)), int(np.ceil(img.size[1] * scale))))
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            img = Image.fromarray(_to_uint8(np.asarray(img)))  # 2-D uint8: mode "L"
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
            img = _on_white(img)
        img = img.convert("RGB")
    if resolution is not None and min(img.size) != resolution:
        w, h = img.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr, original) if with_size else arr


@dataclass
class DecodeImage(grain.transforms.Map):
    """Decodes `image` and resizes its shorter side to `resolution`; marks failures.

    A failure returns `{"error": reason, "key": path}` for `DropBad` to remove. With
    `record_size`, adds `original_size`: int32 [2], (height, width) before the resize (SDXL).
    """

    resolution: int
    record_size: bool = False

    def map(self, element: dict) -> dict:
        if ERROR_KEY in element:  # the source could not read this record (e.g. `TfdsSource`)
            return element
        image = element["image"]
        where = image if isinstance(image, str) else element.get("key", "<unknown>")
        try:
            arr, original = decode_image(image, self.resolution, with_size=True)
        # Any failure of one image (OSError, PIL's SyntaxError/ValueError,
        # DecompressionBombError...) must cost that image, never the run.
        except Exception as e:  # noqa: BLE001
            return {ERROR_KEY: f"{type(e).__name__}: {e}", "key": where}
        out = dict(element)
        out["image"] = arr
        if self.record_size:
            out["original_size"] = np.asarray(original, np.int32)
        return out


@dataclass
class DropBad(grain.transforms.Filter):
    """Drops records marked by `DecodeImage`, counting each in `skips` and logging a warning;
    raises `TooManyBadImages` when `limit` is exceeded.

    The limit is checked on the records this process filters (with grain workers, each
    worker checks its own share), so it holds whatever the worker count.
    """

    skips: SkipLog = field(default_factory=SkipLog)
    limit: SkipLimit = field(default_factory=SkipLimit)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._seen = 0  # records filtered by this process
        self._good = 0
        self._window: deque = deque(maxlen=self.limit.bad_window)  # 1 = bad, of the last bad_window records
        self._bad_in_window = 0
        self._examples: deque = deque(maxlen=5)  # recent distinct (key, reason), for the message

    def __getstate__(self):
        # A worker process starts its own counts.
        return {"skips": self.skips, "limit": self.limit}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def filter(self, element: dict) -> bool:
        bad = ERROR_KEY in element
        if bad:
            self.skips.add(element["key"], element[ERROR_KEY])
        with self._lock:
            self._seen += 1
            self._good += not bad
            if len(self._window) == self._window.maxlen:
                self._bad_in_window -= self._window[0]
            self._window.append(int(bad))
            self._bad_in_window += bad
            if bad and all(k != element["key"] for k, _ in self._examples):
                self._examples.append((element["key"], element[ERROR_KEY]))
            self._check()
        return not bad

    def _check(self) -> None:
        lim = self.limit
        if lim.first_good_within and not self._good and self._seen >= lim.first_good_within:
            what = (f"none of the first {self._seen} records read by this process has an image that loads "
                    f"(data.first_good_within={lim.first_good_within})")
        elif lim.max_bad_fraction < 1 and self._bad_in_window > lim.max_bad_fraction * lim.bad_window:
            what = (f"{self._bad_in_window} of the last {len(self._window)} records read by this process have "
                    f"images that do not load, more than data.max_bad_fraction={lim.max_bad_fraction} of "
                    f"data.bad_window={lim.bad_window}")
        else:
            return
        examples = "; ".join(f"{k} ({' '.join(r.split())})" for k, r in self._examples)
        raise TooManyBadImages(
            f"too many bad images: {what}; {self.skips.count} skipped in all so far. Some of them: {examples}. "
            "Check that the image paths are right (relative to the captions file's folder or images=) and "
            "that the files are images; remove or re-encode the broken ones, or raise data.max_bad_fraction "
            "/ data.bad_window (data.first_good_within=0 turns the check of the first records off).")


@dataclass
class Preprocess(grain.transforms.RandomMap):
    """Crop to `resolution` (center or random), optional random flip, scale to [-1, 1]; pick a caption.

    Input: a decoded record with shorter side == resolution. Output: the record with
    `image` float32 [R, R, 3] in [-1, 1] and `caption` (one of `captions`, drawn per
    record and epoch) instead of `captions`. Other fields pass through.

    With `record_crop`, adds `crop_top_left`: int32 [2], (top, left) of the crop in the resized
    image as the model sees it: for a flipped image, in the flipped one (diffusers' SDXL training
    script flips, then crops), so left becomes w - R - left.
    """

    resolution: int
    random_crop: bool = False
    random_flip: bool = False
    record_crop: bool = False

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        out = dict(element)
        captions = out.pop("captions")
        # Always draw in the same order, so turning one option on or off does
        # not change the other draws.
        pick, u_y, u_x, u_flip = rng.integers(len(captions)), rng.random(), rng.random(), rng.random()
        img = out["image"]
        h, w = img.shape[:2]
        r = self.resolution
        if self.random_crop:
            top, left = int(u_y * (h - r + 1)), int(u_x * (w - r + 1))
        else:
            top, left = (h - r) // 2, (w - r) // 2
        img = img[top:top + r, left:left + r]
        flip = self.random_flip and u_flip < 0.5
        if flip:
            img = img[:, ::-1]
        out["image"] = img.astype(np.float32) / 127.5 - 1.0
        if self.record_crop:
            out["crop_top_left"] = np.asarray((top, w - r - left if flip else left), np.int32)
        out["caption"] = captions[int(pick)]
        return out


@dataclass
class Tokenize(grain.transforms.Map):
    """Adds `key` (`input_ids`): the caption's token ids, int32 [max_length], from a
    `t2i_jax.tokenizer.Tokenizer`."""

    tokenizer: object
    key: str = "input_ids"

    def map(self, element: dict) -> dict:
        out = dict(element)
        out[self.key] = np.asarray(self.tokenizer(element["caption"])[0], dtype=np.int32)
        return out


@dataclass
class Delay(grain.transforms.Map):
    """Sleeps `ms` per element (a batch, placed after Batch): stands in for a slow source in
    benchmarks of data/compute overlap."""

    ms: float

    def map(self, element):
        time.sleep(self.ms / 1000.0)
        return element
