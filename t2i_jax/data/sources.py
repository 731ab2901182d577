"""Random-access image-caption sources read from caption files on disk.

Every source is a grain `RandomAccessDataSource`: `len(source)` records, and
`source[i]` is a dict

    {"image": absolute path (str), "captions": [str, ...], "key": str}

where `key` names the image (its path relative to the dataset folder). Images
are not opened here: decoding happens in the pipeline (`transforms.DecodeImage`)
so that a missing or corrupt file is skipped and counted there instead of
failing the whole run. Caption files are parsed once, at construction, into
plain lists (cheap to pickle into grain worker processes).

Layouts handled:
- Flickr8k (Kaggle): `captions.txt` (CSV, header `image,caption`, several rows
  per image) + `Images/`.
- Flickr30k (Kaggle): `results.csv` (`image_name| comment_number| comment`,
  "|" separated) + `flickr30k_images/`.
- COCO captions: `captions_<split>.json` (`images`, `annotations`) + images.
- Generic JSONL (`{"image": path, "caption": str | [str]}` per line) and CSV
  (`image,caption` columns by default), relative paths resolved against the
  file's folder (or `images=`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence

__all__ = [
    "CaptionSource",
    "coco_captions",
    "csv_source",
    "flickr8k",
    "flickr30k",
    "jsonl_source",
]


class CaptionSource:
    """An in-memory list of (image path, captions) with a stable `repr`.

    grain checks `repr(data_source)` when an iterator state is restored, so the
    repr names the dataset and its size but holds no object addresses.
    """

    def __init__(self, name: str, origin: str, images: Sequence[str], captions: Sequence[Sequence[str]],
                 keys: Sequence[str]):
        if not (len(images) == len(captions) == len(keys)):
            raise ValueError("images, captions and keys must have the same length")
        if not images:
            raise ValueError(f"{name} at {origin} holds no captioned images")
        self.name = name
        self.origin = origin
        self._images = list(images)
        self._captions = [list(c) for c in captions]
        self._keys = list(keys)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {"image": self._images[index], "captions": list(self._captions[index]), "key": self._keys[index]}

    def __repr__(self) -> str:
        return f"CaptionSource(name={self.name!r}, origin={self.origin!r}, records={len(self)})"

    @property
    def num_captions(self) -> int:
        """Total number of captions over all images."""
        return sum(len(c) for c in self._captions)


# ---------------------------------------------------------------------------
# Helpers shared by the layouts.
# ---------------------------------------------------------------------------


def _require_file(path: str, what: str, fix: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist; {fix}")


def _require_dir(path: str, what: str, fix: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist or is not a folder; {fix}")


def _not_utf8(what: str, path: str, line_no: int, line: bytes, start: int, end: int, reason: str) -> ValueError:
    """The error for bytes line[start:end] of line `line_no` not being UTF-8."""
    return ValueError(
        f"{what} {path} line {line_no} is not UTF-8: byte {start + 1} of the line is {line[start:end]!r} ({reason}), "
        f"in {line[max(0, start - 20):end + 20]!r}. Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
        f"{os.path.basename(path)} > fixed` if it is Latin-1 (Windows-1252: `-f cp1252`), and point the config at "
        "the fixed file.")


def _decode(data: bytes) -> str:
    """UTF-8 bytes -> str, without a leading byte-order mark (Excel and Notepad write one).
    Raises UnicodeDecodeError with offsets into `data` itself."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError("utf-8", data, e.start + bom, e.end + bom, e.reason) from None


def _text_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text with its newline) of a UTF-8 file (a BOM is dropped). A byte
    that is not UTF-8 raises a ValueError naming the file, the line and the fix."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                yield line_no, _decode(line) if line_no == 1 else line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(what, path, line_no, line, e.start, e.end, e.reason) from None


def _read_text(path: str, what: str) -> str:
    """A whole UTF-8 file (a BOM is dropped); errors as `_text_lines`."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _decode(data)
    except UnicodeDecodeError as e:
        first = data.rfind(b"\n", 0, e.start) + 1
        last = data.find(b"\n", e.start)
        line = data[first:len(data) if last < 0 else last]
        raise _not_utf8(what, path, data.count(b"\n", 0, e.start) + 1, line, e.start - first, e.end - first,
                        e.reason) from None


def _group(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """(image, caption) rows -> images in first-seen order and their captions."""
    captions: dict[str, list[str]] = {}
    for image, caption in pairs:
        captions.setdefault(image, []).append(caption)
    return list(captions), list(captions.values())


def _build(name: str, origin: str, image_root: str, images: list[str], captions: list[list[str]]) -> CaptionSource:
    paths = [os.path.normpath(os.path.join(image_root, i)) for i in images]
    return CaptionSource(name, origin, paths, captions, images)


def _clean(caption: str) -> str:
    return " ".join(caption.split())


# ---------------------------------------------------------------------------
# Layouts.
# ---------------------------------------------------------------------------


def csv_source(path: str | os.PathLike, *, images: str | os.PathLike | None = None, image_column: str = "image",
               caption_column: str = "caption", name: str = "csv") -> CaptionSource:
    """A CSV file with one row per (image, caption); rows of one image are grouped.

    Args:
      path: the CSV file (first row is the header).
      images: folder that image paths are relative to (default: the CSV's folder).
      image_column, caption_column: header names of the two columns.
      name: the dataset name used in messages and the source's repr.
    """
    path = os.fspath(path)
    _require_file(path, f"{name} captions file", "check the path")
    root = os.fspath(images) if images is not None else os.path.dirname(os.path.abspath(path))
    _require_dir(root, f"{name} image folder", "pass images= the folder the image paths are relative to")
    # Decoded line by line so that a non-UTF-8 byte is reported with its line number.
    with contextlib.closing(_text_lines(path, f"{name} captions file")) as lines:
        reader = csv.reader(text for _, text in lines)
        header = [h.strip() for h in next(reader, [])]
        expected = [image_column, caption_column]
        if image_column not in header or caption_column not in header:
            raise ValueError(
                f"captions file {path} has columns {header}; expected columns {expected}. "
                "Rename the header or pass image_column= / caption_column= (config keys of the same names).")
        i_img, i_cap = header.index(image_column), header.index(caption_column)
        pairs = []
        for row in reader:
            if not row:
                continue
            if len(row) <= max(i_img, i_cap):
                raise ValueError(f"captions file {path} line {reader.line_num}: {len(row)} fields, expected "
                                 f"{len(header)} (columns {header})")
            if len(row) > len(header) and i_cap == len(header) - 1:
                # An unquoted caption with commas in it (seen in Flickr8k copies).
                row = row[:i_cap] + [",".join(row[i_cap:])]
            pairs.append((row[i_img].strip(), _clean(row[i_cap])))
    return _build(name, path, root, *_group(pairs))


def flickr8k(root: str | os.PathLike) -> CaptionSource:
    """Flickr8k as on Kaggle: `root/captions.txt` (header `image,caption`) and `root/Images/`."""
    root = os.fspath(root)
    layout = "expected captions.txt and Images/ inside it (the Kaggle Flickr8k layout)"
    _require_dir(root, "Flickr8k folder", f"{layout}")
    _require_file(os.path.join(root, "captions.txt"), "Flickr8k captions file", layout)
    _require_dir(os.path.join(root, "Images"), "Flickr8k image folder", layout)
    return csv_source(os.path.join(root, "captions.txt"), images=os.path.join(root, "Images"), name="flickr8k")


_FLICKR30K_HEADER = ["image_name", "comment_number", "comment"]


def flickr30k(root: str | os.PathLike) -> CaptionSource:
    """Flickr30k as on Kaggle: `root/results.csv` and `root/flickr30k_images/`.

    `results.csv` is `image_name| comment_number| comment`, one row per caption,
    fields separated by "|" (with a space after it). One row of the Kaggle file
    lacks the second separator ("x.jpg| 4 A dog ..."); such rows are repaired.
    """
    root = os.fspath(root)
    layout = "expected results.csv and flickr30k_images/ inside it (the Kaggle Flickr30k layout)"
    _require_dir(root, "Flickr30k folder", layout)
    path = os.path.join(root, "results.csv")
    _require_file(path, "Flickr30k captions file", layout)
    image_root = os.path.join(root, "flickr30k_images")
    _require_dir(image_root, "Flickr30k image folder", layout)
    pairs = []
    with contextlib.closing(_text_lines(path, "Flickr30k captions file")) as lines:
        _, first = next(lines, (1, ""))
        header = [h.strip() for h in first.rstrip("\r\n").split("|")]
        if header != _FLICKR30K_HEADER:
            raise ValueError(
                f"captions file {path} has columns {header}; expected columns {_FLICKR30K_HEADER} "
                "separated by '|' (the Kaggle Flickr30k results.csv).")
        for line_no, line in lines:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = [x.strip() for x in line.split("|", 2)]
            if len(fields) == 2 and (m := re.match(r"(\d+)\s+(.*)", fields[1])):
                fields = [fields[0], m.group(1), m.group(2)]
            if len(fields) != 3:
                raise ValueError(f"{path} line {line_no}: expected 3 '|'-separated fields, got {line!r}")
            pairs.append((fields[0], _clean(fields[2])))
    return _build("flickr30k", path, image_root, *_group(pairs))


def coco_captions(annotations: str | os.PathLike, images: str | os.PathLike) -> CaptionSource:
    """COCO captions: `captions_<split>.json` (`images` [{id, file_name}],
    `annotations` [{image_id, caption}]) and the folder of that split's images.

    Images are ordered by the JSON's `images` list; those without a caption are left out.
    """
    annotations, images = os.fspath(annotations), os.fspath(images)
    _require_file(annotations, "COCO captions file", "expected e.g. annotations/captions_train2017.json")
    _require_dir(images, "COCO image folder", "expected e.g. train2017/ holding the split's images")
    data = json.loads(_read_text(annotations, "COCO captions file"))
    missing = [k for k in ("images", "annotations") if k not in data]
    if missing:
        raise ValueError(f"COCO captions file {annotations} has keys {sorted(data)}; expected 'images' and "
                         "'annotations' (a captions_<split>.json file)")
    by_id: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        by_id.setdefault(ann["image_id"], []).append(_clean(ann["caption"]))
    files, captions = [], []
    for img in data["images"]:
        if img["id"] in by_id:
            files.append(img["file_name"])
            captions.append(by_id[img["id"]])
    return _build("coco", annotations, images, files, captions)


def jsonl_source(path: str | os.PathLike, *, images: str | os.PathLike | None = None, image_key: str = "image",
                 caption_key: str = "caption") -> CaptionSource:
    """A JSONL file, one `{"image": path, "caption": str | [str]}` object per line.

    Relative image paths are resolved against `images` (default: the file's folder).
    Lines naming the same image are merged.
    """
    path = os.fspath(path)
    _require_file(path, "JSONL captions file", "check the path")
    root = os.fspath(images) if images is not None else os.path.dirname(os.path.abspath(path))
    _require_dir(root, "JSONL image folder", "pass images= the folder the image paths are relative to")
    pairs = []
    with contextlib.closing(_text_lines(path, "JSONL captions file")) as lines:
        for line_no, line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not valid JSON: {e}") from None
            if not isinstance(obj, dict) or image_key not in obj or caption_key not in obj:
                found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path} line {line_no} has keys {found}; expected keys "
                                 f"{[image_key, caption_key]}. Pass image_key= / caption_key= to use others.")
            caps = obj[caption_key]
            for cap in [caps] if isinstance(caps, str) else caps:
                pairs.append((obj[image_key], _clean(cap)))
    return _build("jsonl", path, root, *_group(pairs))
