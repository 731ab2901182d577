"""Community adapter files merged into a model bundle: LoRA and textual inversion.

    pipe = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe = apply_adapters(pipe, loras=[("style.safetensors", 0.8)], embeddings=[("charturner.pt", None)])
    sampler = pipeline.Sampler(pipe)  # compiles with the merged params: no per-step cost

LoRA files come in two layouts, both read here for the U-Net and the CLIP text encoder(s):

- diffusers/PEFT, as `save_lora_weights` writes them (`pytorch_lora_weights.safetensors`):
  `unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.<module>...` (and SDXL's
  `text_encoder_2.<module>...`); the adapter's
  `lora_alpha` (and per-module `alpha_pattern`) in the header's `lora_adapter_metadata`, else
  alpha = rank, as diffusers reads it. The older diffusers spellings (`<module>.lora.down.weight`,
  `lora_linear_layer.up.weight`, `processor.to_q_lora.down.weight`, `<module>.alpha`) load too.
- kohya/AUTOMATIC1111: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
  `lora_te_` (or `lora_te1_`) for the text encoder, `lora_te2_` for SDXL's second one, module names
  as in diffusers. SDXL files name the U-Net's modules in Stability's original (sgm/LDM) layout,
  as kohya trains SDXL on that U-Net: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`
  is `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` (`sgm_name`); both spellings load.

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

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # those a bundle has; SDXL has the third
FORMATS = ("diffusers", "kohya")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
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
    """component -> {canonical torch module path: (Flax kernel path, kind)} of every Dense/Conv,
    for the components the bundle has (SD1/SD2: no text_encoder_2; an SDXL refiner: no text_encoder)."""
    out = {}
    for comp in COMPONENTS:
        if params.get(comp) is None:
            continue
        table = {}
        for path, leaf in traverse_util.flatten_dict(params[comp]).items():
            if path[-1] == "kernel":
                key, kind = core.flax_path_to_torch_key(path, len(leaf.shape))
                table[key[: -len(".weight")]] = (path, kind)
        out[comp] = table
    return out


# --------------------------------------------------------------------------
# Stability's original (sgm/LDM) U-Net names, as kohya writes SDXL LoRAs
# --------------------------------------------------------------------------

_SGM_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
_SGM_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
SDXL_LAYERS_PER_BLOCK = 2  # base and refiner


def unet_layout(modules) -> tuple[int, frozenset[int]]:
    """(layers_per_block, up blocks with attention) of a U-Net from its module paths, what the
    original layout's block numbers follow from (`single_file.unet_rules`)."""
    resnets = {m.split(".")[3] for m in modules if m.startswith("down_blocks.0.resnets.")}
    up_attn = frozenset(int(m.split(".")[1]) for m in modules if re.match(r"up_blocks\.\d+\.attentions\.", m))
    return len(resnets) or SDXL_LAYERS_PER_BLOCK, up_attn


def sgm_name(module: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
             up_attention: frozenset[int] | None = None) -> str | None:
    """The original (sgm/LDM) path of a diffusers U-Net module, or None for one it has no name for.

    `down_blocks.1.attentions.0.X` -> `input_blocks.4.1.X` (layers_per_block 2): the input blocks
    count conv_in, then per level the (resnet, attention) pairs and the downsampler; the output
    blocks `layers_per_block + 1` pairs per level, the upsampler of a level at `.2` after an
    attention, else `.1` (`up_attention`: the up blocks with attention; None takes `.2`, SDXL base's).
    """
    if module in _SGM_FIXED:
        return _SGM_FIXED[module]
    lpb = layers_per_block
    m = _MID.fullmatch(module)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if (kind, j) not in _SGM_MID:
            return None
        block = f"middle_block.{_SGM_MID[kind, j]}"
    else:
        m = _BLOCK.fullmatch(module)
        if not m:
            return None
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op" if (j, rest) == (0, "conv") else None
            block = f"input_blocks.{1 + b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}"
        else:
            if kind == "upsamplers":
                inner = 2 if up_attention is None or b in up_attention else 1
                return f"output_blocks.{b * (lpb + 1) + lpb}.{inner}.conv" if (j, rest) == (0, "conv") else None
            block = f"output_blocks.{b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = _SGM_RESNET.get(rest)
        if rest is None:
            return None
    return f"{block}.{rest}"


def _split(key: str, suffixes) -> tuple[str, str] | None:
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _group(state: Mapping[str, np.ndarray], tables) -> tuple[dict, list[str]]:
    """Sorts a LoRA state dict into {(component, module): {role: (key, array)}}; returns the
    groups and the keys that name no LoRA tensor of a layer this model has."""
    kohya = any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in state)
    underscored = {c: {m.replace(".", "_"): m for m in t} for c, t in tables.items()} if kohya else {}
    if kohya and "unet" in tables:  # SDXL files name the U-Net in the original layout
        layout = unet_layout(tables["unet"])
        for m in tables["unet"]:
            name = sgm_name(m, *layout)
            if name:
                underscored["unet"][name.replace(".", "_")] = m
    groups: dict[tuple[str, str], dict] = {}
    unmatched = []
    for key, value in state.items():
        if kohya:
            prefix = next((p for p in _KOHYA_PREFIXES if key.startswith(p)), None)
            split = _split(key[len(prefix):], _KOHYA_SUFFIXES) if prefix else None
            comp = _KOHYA_PREFIXES.get(prefix)
            module = None
            if split:  # transformers 5.6+ saves a CLIPTextModel without its `text_model.` level
                names = underscored.get(comp, {})
                te_short = comp.startswith("text_encoder") and names.get("text_model_" + split[0])
                module = names.get(split[0]) or te_short or None
        else:
            comp = next((c for c in ("text_encoder_2", "text_encoder") if key.startswith(c + ".")), "unet")
            rest = key.removeprefix(comp + ".")
            m = _PROCESSOR.fullmatch(rest)
            if m:
                split = (m.group(1) + "." + ("to_out.0" if m.group(2) == "to_out" else m.group(2)),
                         m.group(3).split(".")[0])
            else:
                split = _split(rest, _DIFFUSERS_SUFFIXES)
            module = None
            if split:  # (a text encoder without its `text_model.` level, as above)
                table = tables.get(comp, {})
                module = next((c for c in (split[0], "text_model." + split[0]) if c in table), None)
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
    `params` ({"unet": ..., "text_encoder": ..., SDXL's "text_encoder_2": ...}).

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
            f"LoRA {path}: {what}. t2i_jax merges LoRA for the SD 1.x/2.x and SDXL U-Net and text encoders "
            "in the diffusers/PEFT layout (unet.<module>.lora_A.weight, lora_B.weight, text_encoder(_2).<module>) "
            "or the kohya one (lora_unet_<module>.lora_down.weight, lora_up.weight, alpha; lora_te1_, lora_te2_); "
            "a file for another model (an SDXL LoRA on SD1, SD3, Flux) or a LyCORIS/LoHa/LoKr adapter does not "
            "load. Use a LoRA made for this model.")
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
    flat = {comp: traverse_util.flatten_dict(params[comp]) for comp in tables}
    sums: dict[tuple[str, tuple], np.ndarray] = {}
    for layers, weight in loras:
        for layer in layers:
            fpath, kind = tables[layer.component][layer.module]
            shape = tuple(flat[layer.component][fpath].shape)
            k = (layer.component, fpath)
            sums[k] = sums.get(k, 0) + weight * layer.scale * _delta(layer, kind, shape)
    out = dict(params)
    for comp in tables:
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
    file's own name); see `t2i_jax.convert.embeddings.add_embeddings`. SD 1.x/2.x and SDXL
    bundles alike: an SDXL LoRA's text_encoder_2 layers merge into the second encoder, an SDXL
    embedding's clip_l / clip_g vectors into the first / second. Build the `Sampler` from the
    returned bundle: it then compiles with the merged params.
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


def _is_sdxl(layers: Sequence[LoraLayer], params: Mapping | None) -> bool:
    """An SDXL LoRA: the bundle has a second text encoder, or (without `params`) the layers touch it,
    SDXL's add_embedding, or a second transformer block in a U-Net attention (SD1/SD2 have one)."""
    if params is not None:
        return params.get("text_encoder_2") is not None
    return any(layer.component == "text_encoder_2" or (layer.component == "unet" and (
        layer.module.startswith("add_embedding.") or re.search(r"\.transformer_blocks\.[1-9]", layer.module)))
        for layer in layers)


def _diffusers_module(comp: str, module: str) -> str:
    # transformers 5 spells a CLIPTextModel without `text_model.`; CLIPTextModelWithProjection keeps it.
    return module.removeprefix("text_model.") if comp == "text_encoder" else module


def save_lora(path: str | os.PathLike, layers: Sequence[LoraLayer], *, fmt: str = "diffusers",
              dtype=np.float32, params: Mapping | None = None) -> Path:
    """Writes `layers` as a LoRA safetensors file that diffusers' `load_lora_weights` and `read_lora` read.

    fmt "diffusers" (PEFT, `pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight` /
    `lora_B.weight`, `text_encoder.<module>...` (module names as transformers 5 spells a
    CLIPTextModel, without `text_model.`), SDXL's `text_encoder_2.text_model.<module>...`, and alpha
    as diffusers' `save_lora_weights` records it: the PEFT LoraConfig (`r`, `lora_alpha`,
    `target_modules`, `alpha_pattern` for layers whose alpha differs) per component in the header's
    `lora_adapter_metadata`.
    fmt "kohya": `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
    `lora_te_` for the text encoder (with its `text_model_` level, as AUTOMATIC1111 files have it).
    For SDXL as kohya writes it: the U-Net's modules in the original layout (`sgm_name`:
    `lora_unet_input_blocks_4_1_...`) and `lora_te1_` / `lora_te2_` for the two encoders.
    `params` (the bundle's, optional) tells SDXL and its U-Net layout; without it a LoRA is SDXL
    when its layers say so (`_is_sdxl`), with SDXL's layout (2 layers per block), and an SDXL LoRA
    taken for an SD one still loads (kohya's diffusers-layout names, which diffusers reads too).
    All layers of a component must share one rank.
    """
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r}: use one of {list(FORMATS)}")
    if not layers:
        raise ValueError(f"no LoRA layers to write to {path}")
    state: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {}
    xl = _is_sdxl(layers, params)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    layout = (SDXL_LAYERS_PER_BLOCK, None)
    if xl and params is not None:
        layout = unet_layout(_module_tables({"unet": params["unet"]})["unet"])
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
                module = (sgm_name(layer.module, *layout) if xl and comp == "unet" else None) or layer.module
                key = prefix[comp] + module.replace(".", "_")
                state[key + _suffix(_KOHYA_SUFFIXES, "down")] = down
                state[key + _suffix(_KOHYA_SUFFIXES, "up")] = up
                state[key + _suffix(_KOHYA_SUFFIXES, "alpha")] = np.asarray(alphas[layer.module], dtype)
            else:
                module = _diffusers_module(comp, layer.module)
                state[f"{comp}.{module}" + _suffix(_DIFFUSERS_SUFFIXES, "down")] = down
                state[f"{comp}.{module}" + _suffix(_DIFFUSERS_SUFFIXES, "up")] = up
        if fmt == "diffusers":
            names = {layer.module: _diffusers_module(comp, layer.module) for layer in mine}
            common = max(set(alphas.values()), key=list(alphas.values()).count)
            meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": common,
                         f"{comp}.target_modules": sorted(names.values()),
                         f"{comp}.alpha_pattern": {re.escape(names[m]): a for m, a in alphas.items() if a != common}})
    header = {"format": "pt"}
    if meta:
        header["lora_adapter_metadata"] = json.dumps(meta, indent=2, sort_keys=True)
    core.write_safetensors(state, path, metadata=header)
    return Path(path)
