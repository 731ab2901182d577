"""PyTorch <-> Flax conversion machinery shared by every source format.

A checkpoint becomes Flax params in three steps:

1. *Read* the tensors to numpy: safetensors with the `safetensors` package
   (bf16 through ml_dtypes, no torch), pickles (`.bin`, `.ckpt`, `.pt`) with
   `torch.load(weights_only=True)` only.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from t2i_jax.files import atomic_path

StateDict = dict[str, np.ndarray]

# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """Reads a `.safetensors` file into numpy arrays with the `safetensors` package (no torch;
    bf16 tensors come back as `ml_dtypes.bfloat16` arrays)."""
    path = Path(path)
    try:
        # "pread" reads each tensor straight into its array. The default
        # "mmap" copies out of a mapping and holds the file twice: 2x the peak
        # memory of pread and no faster (200 MB: 430 vs 230 MB). bf16 works
        # because ml_dtypes is imported above: safetensors asks numpy for a
        # dtype named "bfloat16", which exists once ml_dtypes registered it.
        with safetensors.safe_open(path, framework="np", backend="pread") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118  a safe_open is not a dict
    except safetensors.SafetensorError as e:
        raise ConversionError(_unreadable(path, e)) from e


def _unreadable(path: Path, err: Exception) -> str:
    """What is wrong with a file safetensors refused, for the user: its own
    messages ("incomplete metadata, file not fully covered") name neither the
    file nor the tensor, so the header is read here only to say which tensor
    a truncated download cut."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (struct.error, ValueError):  # too short for a length, or a header that is not JSON
        header = None
    if not isinstance(header, dict):
        return (f"{path} is not a safetensors file, or is cut inside its header ({err}). "
                "Download or copy the file again.")
    data = size - 8 - n
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    for (start, end), key in tensors:
        if end > data:
            return (f"{path} is truncated: tensor {key!r} needs bytes {start}..{end} of the data section, "
                    f"which holds {data}. Download or copy the file again.")
    return f"{path}: safetensors cannot read it ({err})"


def write_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy arrays (bf16 as `ml_dtypes.bfloat16`) as a `.safetensors` file with the
    `safetensors` package, atomically (tmp + rename); `metadata` goes to the header's
    `__metadata__` (e.g. {"format": "pt"}, which transformers and diffusers expect)."""
    arrays = {key: _contiguous(value) for key, value in state.items()}
    for key, arr in arrays.items():
        try:
            safetensors.TensorSpec(dtype=arr.dtype.name, shape=arr.shape, data_ptr=arr.ctypes.data,
                                   data_len=arr.nbytes)
        except Exception as e:  # the library's message lists the dtypes it takes
            raise ValueError(f"cannot write tensor {key!r} of dtype {arr.dtype} to safetensors: {e}") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)


def _contiguous(x) -> np.ndarray:
    # Not np.ascontiguousarray: it turns 0-d arrays (CLIP's logit_scale) into 1-d.
    return np.require(np.asarray(x), requirements="C")


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
    for path, leaf in traverse_util.flatten_dict(expected).items():
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
    return traverse_util.unflatten_dict(flat), report


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
    for path, leaf in traverse_util.flatten_dict(params).items():
        arr = np.asarray(leaf)
        key, kind = flax_path_to_torch_key(path, arr.ndim)
        arr = _contiguous(flax_to_torch(kind, arr))
        out[key] = arr if dtype is None else arr.astype(dtype)
    return out
