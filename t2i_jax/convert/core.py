"""PyTorch <-> Flax conversion machinery shared by every source format.

A checkpoint becomes Flax params in three steps:

1. *Read* the tensors to numpy: safetensors with a small reader of our own
   (memory-mapped, bf16 through ml_dtypes, no torch), pickles (`.bin`,
   `.ckpt`, `.pt`) with `torch.load(weights_only=True)` only.
2. *Rename* source keys to the canonical diffusers/transformers names with the
   source format's table of `Rule`s (regex -> replacement, optional transform).
3. *Place* each Flax leaf from its canonical key. Flax modules carry the same
   names as the PyTorch ones, so the leaf <-> key mapping is mechanical
   (`layers_3/fc1/kernel` <-> `layers.3.fc1.weight`, transposed); see
   `flax_path_to_torch_key`. The same mapping runs backwards for export.

Every load produces a `Report` of missing, unexpected and misshapen keys;
strict loads raise `ConversionError` carrying the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]

# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """Reads a `.safetensors` file into numpy arrays (memory-mapped, no torch)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path} is not a safetensors file: it is shorter than 8 bytes")
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size:
            raise ConversionError(f"{path} is not a safetensors file: bad header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} is not a safetensors file or is truncated: bad header ({e})") from e
    header.pop("__metadata__", None)
    if not header:
        return {}
    size = path.stat().st_size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which is not supported")
        start, end = info["data_offsets"]
        if end > size:
            raise ConversionError(
                f"{path} is truncated: tensor {key!r} needs bytes {start}..{end} of the data section, "
                f"which holds {size}. Download or copy the file again."
            )
        arr = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[key] = arr
    return out


def write_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays as a `.safetensors` file, atomically (tmp + rename)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for key in sorted(state):
        arr = _contiguous(state[key])
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write tensor {key!r} of dtype {arr.dtype} to safetensors")
        header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for an 8-byte aligned header
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())

    atomic_write(path, write)


def _contiguous(x) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays (CLIP's logit_scale) into 1-d.
    return np.require(np.asarray(x), requirements="C")


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Calls `write(f)` on a temporary file beside `path`, then renames it onto
    `path`: readers never see a half-written file, and a failure (or a kill)
    leaves the old file, if any, untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_torch_pickle(path: str | os.PathLike) -> StateDict:
    """Reads a pickled PyTorch checkpoint with `torch.load(weights_only=True)`.

    Lightning-style checkpoints keep the weights under `state_dict`; that level
    is unwrapped. Non-tensor entries (step counters...) are dropped.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConversionError(
            f"{path} is a pickled PyTorch checkpoint; reading it needs torch. "
            "Install it with `pip install torch` (or `pip install t2i_jax[torch]`), "
            "or convert the file to .safetensors."
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach()
        if value.dtype == torch.bfloat16:
            out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = value.numpy()
    return out


_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_checkpoint(path: str | os.PathLike) -> StateDict:
    """Reads one checkpoint file, safetensors or pickle, by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in _PICKLE_SUFFIXES:
        return read_torch_pickle(path)
    raise ConversionError(
        f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors or one of {_PICKLE_SUFFIXES}"
    )


def find_weights(folder: str | os.PathLike, stems: Sequence[str], variant: str | None = None) -> list[Path]:
    """The weight files of a transformers/diffusers model folder.

    Looks, in order, for `STEM[.VARIANT].safetensors`, its sharded index
    `STEM[.VARIANT].safetensors.index.json`, then the `.bin` equivalents, for
    each stem in `stems` (e.g. `model`, `pytorch_model`,
    `diffusion_pytorch_model`). `variant` is diffusers' `fp16` and the like.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    tried = []
    for stem in stems:
        name = f"{stem}.{variant}" if variant else stem
        for suffix in (".safetensors", ".bin"):
            single = folder / f"{name}{suffix}"
            index = folder / f"{name}{suffix}.index.json"
            tried += [single.name, index.name]
            if single.is_file():
                return [single]
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return [folder / shard for shard in sorted(set(weight_map.values()))]
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {', '.join(tried)}; the folder holds {present or 'nothing'}"
        + ("" if variant is None else f". Drop variant={variant!r} to load the default weights.")
    )


def read_weights_dir(folder: str | os.PathLike, stems: Sequence[str], variant: str | None = None) -> StateDict:
    """Reads all weights of a model folder (see `find_weights`) into one dict."""
    out: StateDict = {}
    for f in find_weights(folder, stems, variant):
        out.update(read_checkpoint(f))
    return out


# --------------------------------------------------------------------------
# Renaming source keys (the per-format tables)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """Renames source keys matching `pattern` (a full-match regex).

    `replacement` uses `re` group syntax (`\\1`). `transform`, when given,
    maps (canonical key, array) to a dict of canonical keys -> arrays, for the
    few tensors that are split or reshaped between formats (a fused qkv
    projection, a 1x1 conv stored where a linear layer is expected).
    """

    pattern: str
    replacement: str
    transform: Callable[[str, np.ndarray], dict[str, np.ndarray]] | None = None

    def match(self, key: str) -> str | None:
        """Returns the renamed key, or None if `key` does not match."""
        m = re.fullmatch(self.pattern, key)
        return None if m is None else m.expand(self.replacement)


def apply_rules(state: Mapping[str, np.ndarray], rules: Sequence[Rule],
                passthrough: bool = True) -> tuple[StateDict, dict[str, str]]:
    """Renames a state dict with the first matching rule for each key.

    Keys that no rule matches are kept as they are when `passthrough` (so a
    table only lists the keys that differ), else dropped. Returns the renamed
    dict and, for error messages, a map canonical key -> source key.
    """
    out: StateDict = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        for rule in rules:
            new = rule.match(key)
            if new is not None:
                produced = rule.transform(new, value) if rule.transform else {new: value}
                break
        else:
            if not passthrough:
                continue
            produced = {key: value}
        for new_key, new_value in produced.items():
            if new_key in out:
                raise ConversionError(f"keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
            out[new_key] = new_value
            origin[new_key] = key
    return out, origin


# --------------------------------------------------------------------------
# Flax leaf <-> canonical PyTorch key
# --------------------------------------------------------------------------

# Flax names list members `NAME_i`; PyTorch `NAME.i`. Only these container
# names are lists, so `linear_1` (a real name) is not split.
LIST_MODULES = frozenset({
    "layers", "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "to_out", "net", "blocks",
})
_LIST_NAME = re.compile(r"(.+)_(\d+)")


def flax_path_to_torch_key(path: Sequence[str], ndim: int) -> tuple[str, str]:
    """Maps a Flax param path to its PyTorch key and the kind of transform.

    Kinds: `linear` (transpose), `conv` (OIHW <-> HWIO), `copy`.
    """
    parts = []
    for p in path[:-1]:
        m = _LIST_NAME.fullmatch(p)
        if m and m.group(1) in LIST_MODULES:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(p)
    leaf = path[-1]
    kind = "copy"
    if leaf == "kernel":
        leaf = "weight"
        kind = {2: "linear", 4: "conv"}.get(ndim)
        if kind is None:
            raise ValueError(f"kernel {'/'.join(path)} has {ndim} dims; expected 2 or 4")
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return ".".join(parts + [leaf]), kind


def torch_to_flax(kind: str, x: np.ndarray) -> np.ndarray:
    """Converts a PyTorch-layout array to the Flax layout of `kind`."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def flax_to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """Inverse of `torch_to_flax`."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Flattens a nested dict to {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """Inverse of `flatten`."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


# --------------------------------------------------------------------------
# Loading with a report
# --------------------------------------------------------------------------


class ConversionError(ValueError):
    """A checkpoint does not fit the model; `report` says how, when known."""

    def __init__(self, message: str, report: Report | None = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class Report:
    """What a conversion found: keys missing from the checkpoint, keys it had
    that the model does not use, and keys whose shapes differ."""

    source: str
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    misshapen: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshapen)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.loaded} tensors loaded"]

        def section(title, items, fmt):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend("    " + fmt(i) for i in items[:20])
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")

        section("missing from the checkpoint", self.missing, str)
        section("unexpected in the checkpoint", self.unexpected, str)
        section("with the wrong shape", self.misshapen,
                lambda t: f"{t[0]}: model expects {t[1]}, checkpoint has {t[2]}")
        return "\n".join(lines)


def load_params(
    state: Mapping[str, np.ndarray],
    expected: Mapping,
    *,
    source: str,
    origin: Mapping[str, str] | None = None,
    ignore: Iterable[str] = (),
    dtype: Any = np.float32,
    strict: bool = True,
) -> tuple[dict, Report]:
    """Builds the Flax param tree `expected` (shapes, e.g. from `jax.eval_shape`)
    from a canonical-keyed state dict.

    Keys matching a regex in `ignore` (buffers such as `position_ids`) are not
    reported as unexpected. With `strict`, any missing, unexpected or
    misshapen key raises `ConversionError`; otherwise missing leaves are left
    out of the returned tree and the report says which.
    """
    origin = origin or {}
    ignore_re = [re.compile(p) for p in ignore]
    report = Report(source=source)
    used = set()
    flat = {}
    for path, leaf in flatten(expected).items():
        shape = tuple(leaf.shape)
        key, kind = flax_path_to_torch_key(path, len(shape))
        if key not in state:
            report.missing.append(key)
            continue
        used.add(key)
        arr = torch_to_flax(kind, np.asarray(state[key]))
        if tuple(arr.shape) != shape:
            report.misshapen.append((origin.get(key, key), shape, tuple(arr.shape)))
            continue
        flat[path] = np.asarray(arr, dtype=dtype)
    report.unexpected = sorted(
        origin.get(k, k) for k in state if k not in used and not any(r.search(k) for r in ignore_re)
    )
    report.loaded = len(flat)
    if strict and not report.ok:
        raise ConversionError(f"checkpoint does not fit the model.\n{report}", report)
    return unflatten(flat), report


# What exported folders were verified to load with (tests/test_unet.py,
# test_vae.py, test_clip.py and the pipeline export tests read them back with
# from_pretrained): named in config.json when the library is not installed.
VERIFIED_VERSIONS = {"diffusers": "0.42.1", "transformers": "5.24.0"}


def target_version(library: str) -> str:
    """The `library` version ("diffusers" or "transformers") an exported
    config.json names (`_diffusers_version`, `transformers_version`): the
    installed one, whose from_pretrained the export is meant for, else the
    version the format was last verified against (`VERIFIED_VERSIONS`)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return VERIFIED_VERSIONS[library]


def export_state_dict(params: Mapping, dtype: Any = None) -> StateDict:
    """Flax params -> canonical PyTorch-layout state dict (numpy)."""
    out = {}
    for path, leaf in flatten(params).items():
        arr = np.asarray(leaf)
        key, kind = flax_path_to_torch_key(path, arr.ndim)
        arr = _contiguous(flax_to_torch(kind, arr))
        out[key] = arr if dtype is None else arr.astype(dtype)
    return out
