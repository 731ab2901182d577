"""Community adapter files merged into a model bundle: LoRA and textual inversion.

    pipe = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe = apply_adapters(pipe, loras=[("style.safetensors", 0.8)], embeddings=[("charturner.pt", None)])
    sampler = pipeline.Sampler(pipe)  # compiles with the merged params: no per-step cost

LoRA files come in two layouts, both read here for the U-Net and the CLIP text encoder:

- diffusers/PEFT, as `save_lora_weights` writes them (`pytorch_lora_weights.safetensors`):
  `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.<module>...`; the adapter's
  `lora_alpha` (and per-module `alpha_pattern`) in the header's `lora_adapter_metadata`, else
  alpha = rank, as diffusers reads it. The older diffusers spellings (`<module>.lora.down.weight`,
  `lora_linear_layer.up.weight`, `processor.to_q_lora.down.weight`, `<module>.alpha`) load too.
- kohya/AUTOMATIC1111: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
  `lora_te_` (or `lora_te1_`) for the text encoder, module names as in diffusers.

Each layer W (torch layout [out, in(, kh, kw)]) becomes W + weight * alpha / rank * up @ down.
Module paths are the canonical torch keys of our params (`core.flax_path_to_torch_key`), so the
U-Net and text encoder need no table of their own. Textual-inversion embeddings live in
`t2i_jax.convert.embeddings`. `save_lora` writes layers (e.g. trained by `t2i_jax.train.lora`)
in either layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import safetensors
from flax import traverse_util

from t2i_jax.convert import core

COMPONENTS = ("unet", "text_encoder")
FORMATS = ("diffusers", "kohya")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# (suffix, role) for the diffusers spellings, newest first.
_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
# diffusers' attention-processor LoRA (2023): `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down\.weight|up\.weight|alpha)")
_SHOWN = 5  # unmatched keys named in an error


@dataclasses.dataclass
class LoraLayer:
    """One low-rank update: `module` (canonical torch path in `component`) gets
    scale * up @ down, with `down` [rank, in(, kh, kw)] and `up` [out, rank(, 1, 1)]."""

    component: str
    module: str
    down: np.ndarray
    up: np.ndarray
    scale: float  # alpha / rank, before the user's weight


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def _read(path: Path) -> tuple[core.StateDict, dict]:
    """The tensors of a LoRA file and diffusers' adapter metadata (from a safetensors header)."""
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    state = core.read_checkpoint(path)
    meta = {}
    if path.suffix == ".safetensors":
        with safetensors.safe_open(path, framework="np") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            meta = json.loads(raw)
    return state, meta


def _module_tables(params: Mapping) -> dict[str, dict[str, tuple[tuple, str]]]:
    """component -> {canonical torch module path: (Flax kernel path, kind)} of every Dense/Conv."""
    out = {}
    for comp in COMPONENTS:
        table = {}
        for path, leaf in traverse_util.flatten_dict(params[comp]).items():
            if path[-1] == "kernel":
                key, kind = core.flax_path_to_torch_key(path, len(leaf.shape))
                table[key[: -len(".weight")]] = (path, kind)
        out[comp] = table
    return out


def _split(key: str, suffixes) -> tuple[str, str] | None:
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _group(state: Mapping[str, np.ndarray], tables) -> tuple[dict, list[str]]:
    """Sorts a LoRA state dict into {(component, module): {role: (key, array)}}; returns the
    groups and the keys that name no LoRA tensor of a layer this model has."""
    kohya = any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in state)
    underscored = {c: {m.replace(".", "_"): m for m in tables[c]} for c in COMPONENTS} if kohya else {}
    groups: dict[tuple[str, str], dict] = {}
    unmatched = []
    for key, value in state.items():
        if kohya:
            prefix = next((p for p in _KOHYA_PREFIXES if key.startswith(p)), None)
            split = _split(key[len(prefix):], _KOHYA_SUFFIXES) if prefix else None
            comp = _KOHYA_PREFIXES.get(prefix)
            module = None
            if split:  # transformers 5.6+ saves a CLIPTextModel without its `text_model.` level
                names = underscored[comp]
                te_short = comp == "text_encoder" and names.get("text_model_" + split[0])
                module = names.get(split[0]) or te_short or None
        else:
            comp, rest = ("text_encoder", key[len("text_encoder."):]) if key.startswith("text_encoder.") else (
                "unet", key.removeprefix("unet."))
            m = _PROCESSOR.fullmatch(rest)
            if m:
                split = (m.group(1) + "." + ("to_out.0" if m.group(2) == "to_out" else m.group(2)),
                         m.group(3).split(".")[0])
            else:
                split = _split(rest, _DIFFUSERS_SUFFIXES)
            module = None
            if split:  # (a text encoder without its `text_model.` level, as above)
                module = next((c for c in (split[0], "text_model." + split[0]) if c in tables[comp]), None)
        if module is None:
            unmatched.append(key)
            continue
        groups.setdefault((comp, module), {})[split[1]] = (key, value)
    return groups, unmatched


def _peft_alpha(meta: Mapping, comp: str, module: str, rank: int) -> float:
    """alpha / rank for one PEFT module from diffusers' adapter metadata (`unet.lora_alpha`,
    `unet.alpha_pattern`, `unet.use_rslora`); no metadata means alpha = rank, as diffusers reads it."""
    get = lambda name, default=None: meta.get(f"{comp}.{name}", default)  # noqa: E731
    if get("lora_alpha") is None:
        return 1.0
    if get("use_dora"):
        raise core.ConversionError(f"this LoRA's {comp} is a DoRA adapter (use_dora in its metadata), which "
                                   "t2i_jax does not merge; use a plain LoRA file")
    alpha = float(get("lora_alpha"))
    # PEFT matches a pattern against the end of the module name (peft.utils.get_pattern_key).
    for pattern, value in (get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / (rank ** 0.5 if get("use_rslora") else rank)


def read_lora(path: str | os.PathLike, params: Mapping) -> list[LoraLayer]:
    """The layers of a LoRA file (diffusers/PEFT or kohya), matched against a bundle's
    `params` ({"unet": ..., "text_encoder": ...}).

    Raises `core.ConversionError` naming the keys that match no layer of the model (the
    first few and their count), or a layer with an up but no down matrix.
    """
    path = Path(path)
    state, meta = _read(path)
    tables = _module_tables(params)
    groups, unmatched = _group(state, tables)
    incomplete = [d.get("down", d.get("up", d.get("alpha")))[0] for d in groups.values()
                  if "down" not in d or "up" not in d]
    bad = unmatched + incomplete
    if bad or not groups:
        shown = ", ".join(repr(k) for k in bad[:_SHOWN]) + (f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN
                                                             else "")
        what = f"{len(bad)} of its {len(state)} keys match no layer of this model: {shown}" if bad else (
            "it holds no LoRA tensors")
        raise core.ConversionError(
            f"LoRA {path}: {what}. t2i_jax merges LoRA for the SD 1.x/2.x U-Net and text encoder in the "
            "diffusers/PEFT layout (unet.<module>.lora_A.weight, lora_B.weight) or the kohya one "
            "(lora_unet_<module>.lora_down.weight, lora_up.weight, alpha); a file for another model "
            "(SDXL, SD3, Flux) or a LyCORIS/LoHa/LoKr adapter does not load. Use a LoRA made for this model.")
    layers = []
    for (comp, module), d in sorted(groups.items()):
        down = np.asarray(d["down"][1], np.float32)
        up = np.asarray(d["up"][1], np.float32)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise core.ConversionError(f"LoRA {path}: {d['up'][0]!r} has shape {up.shape} but "
                                       f"{d['down'][0]!r} has rank {rank}; the file is damaged")
        if "alpha" in d:  # kohya, and diffusers' older network alphas
            scale = float(np.asarray(d["alpha"][1], np.float32)) / rank
        else:
            scale = _peft_alpha(meta, comp, module, rank)
        layers.append(LoraLayer(comp, module, down, up, scale))
    return layers


# --------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------


def _delta(layer: LoraLayer, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """up @ down in the Flax layout of the kernel (`kind` linear: [in, out]; conv: HWIO)."""
    up = layer.up.reshape(layer.up.shape[:2])  # [out, rank], also from a [out, rank, 1, 1] conv
    down = layer.down
    if kind == "linear":
        if down.ndim == 4 and down.shape[2:] == (1, 1):  # a 1x1-conv LoRA (SD1's proj_in is a conv, SD2's a Dense)
            down = down[:, :, 0, 0]
        delta = (up @ down).T if down.ndim == 2 else None
    else:
        down = down if down.ndim == 4 else down[:, :, None, None]
        delta = np.einsum("or,rihw->hwio", up, down)
    if delta is None or delta.shape != shape:
        got = (layer.up.shape, layer.down.shape)
        raise core.ConversionError(
            f"LoRA layer {layer.component}.{layer.module}: up {got[0]} @ down {got[1]} does not fit its weight "
            f"(Flax shape {shape}); the LoRA is for a model of another size (e.g. SD2 on SD1). Use a LoRA made "
            "for this model.")
    return delta


def merge_loras(params: Mapping, loras: Sequence[tuple[Sequence[LoraLayer], float]]) -> dict:
    """`params` with each (layers, weight) merged: W + weight * scale * up @ down, in fp32,
    cast back to each kernel's dtype. Returns a new tree; `params` is not changed."""
    tables = _module_tables(params)
    flat = {comp: traverse_util.flatten_dict(params[comp]) for comp in COMPONENTS}
    sums: dict[tuple[str, tuple], np.ndarray] = {}
    for layers, weight in loras:
        for layer in layers:
            fpath, kind = tables[layer.component][layer.module]
            shape = tuple(flat[layer.component][fpath].shape)
            k = (layer.component, fpath)
            sums[k] = sums.get(k, 0) + weight * layer.scale * _delta(layer, kind, shape)
    out = dict(params)
    for comp in COMPONENTS:
        mine = {fpath: d for (c, fpath), d in sums.items() if c == comp}
        if not mine:
            continue
        new = dict(flat[comp])
        for fpath, d in mine.items():
            w = np.asarray(new[fpath])
            new[fpath] = (w.astype(np.float32) + d).astype(w.dtype)
        out[comp] = traverse_util.unflatten_dict(new)
    return out


def apply_adapters(pipe, loras: Sequence[tuple[str | os.PathLike, float]] = (),
                   embeddings: Sequence[tuple[str | os.PathLike, str | None]] = ()):
    """A new `StableDiffusion` bundle with LoRA files merged and textual-inversion embeddings added.

    `loras`: (file, weight) pairs, merged together (weights as diffusers' `set_adapters`
    adapter_weights: 1.0 is the LoRA as trained). `embeddings`: (file, token or None for the
    file's own name); see `t2i_jax.convert.embeddings.add_embeddings`. Build the `Sampler`
    from the returned bundle: it then compiles with the merged params.
    """
    from t2i_jax.convert import embeddings as emb_lib

    if embeddings:
        pipe = emb_lib.add_embeddings(pipe, embeddings)
    if loras:
        read = [(read_lora(path, pipe.params), float(weight)) for path, weight in loras]
        pipe = dataclasses.replace(pipe, params=merge_loras(pipe.params, read))
    return pipe


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _suffix(table, role: str) -> str:
    return next(s for s, r in table if r == role)  # the first (newest) spelling of a role


def save_lora(path: str | os.PathLike, layers: Sequence[LoraLayer], *, fmt: str = "diffusers",
              dtype=np.float32) -> Path:
    """Writes `layers` as a LoRA safetensors file that diffusers' `load_lora_weights` and `read_lora` read.

    fmt "diffusers" (PEFT, `pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight` /
    `lora_B.weight`, `text_encoder.<module>...` (module names as transformers 5 spells a
    CLIPTextModel, without `text_model.`), and alpha as diffusers' `save_lora_weights` records it:
    the PEFT LoraConfig (`r`, `lora_alpha`, `target_modules`, `alpha_pattern` for layers whose
    alpha differs) per component in the header's `lora_adapter_metadata`.
    fmt "kohya": `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
    `lora_te_` for the text encoder (with its `text_model_` level, as AUTOMATIC1111 files have it).
    All layers of a component must share one rank.
    """
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r}: use one of {list(FORMATS)}")
    if not layers:
        raise ValueError(f"no LoRA layers to write to {path}")
    state: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {}
    prefix = {comp: p for p, comp in reversed(list(_KOHYA_PREFIXES.items()))}  # unet: lora_unet_, te: lora_te_
    for comp in COMPONENTS:
        mine = [layer for layer in layers if layer.component == comp]
        if not mine:
            continue
        ranks = {layer.down.shape[0] for layer in mine}
        if len(ranks) > 1:
            raise ValueError(f"LoRA {comp} layers have ranks {sorted(ranks)}; save_lora writes one rank per component")
        rank = ranks.pop()
        alphas = {layer.module: layer.scale * rank for layer in mine}
        for layer in mine:
            down, up = np.asarray(layer.down, dtype), np.asarray(layer.up, dtype)
            if fmt == "kohya":
                key = prefix[comp] + layer.module.replace(".", "_")
                state[key + _suffix(_KOHYA_SUFFIXES, "down")] = down
                state[key + _suffix(_KOHYA_SUFFIXES, "up")] = up
                state[key + _suffix(_KOHYA_SUFFIXES, "alpha")] = np.asarray(alphas[layer.module], dtype)
            else:
                module = layer.module.removeprefix("text_model.") if comp == "text_encoder" else layer.module
                state[f"{comp}.{module}" + _suffix(_DIFFUSERS_SUFFIXES, "down")] = down
                state[f"{comp}.{module}" + _suffix(_DIFFUSERS_SUFFIXES, "up")] = up
        if fmt == "diffusers":
            names = {layer.module: (layer.module.removeprefix("text_model.") if comp == "text_encoder"
                                    else layer.module) for layer in mine}
            common = max(set(alphas.values()), key=list(alphas.values()).count)
            meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": common,
                         f"{comp}.target_modules": sorted(names.values()),
                         f"{comp}.alpha_pattern": {re.escape(names[m]): a for m, a in alphas.items() if a != common}})
    header = {"format": "pt"}
    if meta:
        header["lora_adapter_metadata"] = json.dumps(meta, indent=2, sort_keys=True)
    core.write_safetensors(state, path, metadata=header)
    return Path(path)
