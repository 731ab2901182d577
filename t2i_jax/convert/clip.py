"""transformers CLIP checkpoints <-> Flax params.

Reads `config.json` + `model.safetensors` / `pytorch_model.bin` / sharded
index files from a folder or hub id, for CLIPModel, CLIPTextModel(WithProjection)
and CLIPVisionModel(WithProjection). transformers 5.6+ saves the standalone
CLIPTextModel / CLIPVisionModel without their `text_model.` /
`vision_model.` prefix; 4.x kept it. Both load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.convert import core, hub
from t2i_jax.models import clip

# architecture -> (tower prefix that 5.6+ drops, or None)
_ARCHS = {
    "CLIPModel": None,
    "CLIPTextModel": "text_model.",
    "CLIPTextModelWithProjection": None,
    "CLIPVisionModel": "vision_model.",
    "CLIPVisionModelWithProjection": None,
}
_MODEL_TYPES = {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel"}
_WEIGHT_STEMS = ("model", "pytorch_model")
# Non-persistent buffers that older transformers versions saved.
_IGNORE = (r"position_ids$",)


def architecture(config: dict[str, Any], where: str = "config.json") -> str:
    """The transformers class a CLIP `config.json` describes."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in _ARCHS:
            return a
    mt = config.get("model_type")
    if mt in _MODEL_TYPES and not archs:
        return _MODEL_TYPES[mt]
    raise core.ConversionError(
        f"{where} describes {archs or mt!r}, not a CLIP model; expected one of {sorted(_ARCHS)}"
    )


def build_module(config: dict[str, Any], *, tower: str | None = None, dtype=jnp.float32,
                 attention_impl: str | None = None, remat: bool = False, where: str = "config.json"):
    """The Flax module for a transformers CLIP `config.json` dict.

    `tower` picks one tower of a CLIPModel checkpoint: "text" gives a
    CLIPTextModel with projection, "vision" a CLIPVisionModel with projection.
    """
    arch = architecture(config, where)
    kw = dict(dtype=dtype, attention_impl=attention_impl, remat=remat)
    if arch == "CLIPModel":
        cfg = clip.CLIPConfig.from_hf(config)
        if tower is None:
            return clip.CLIPModel(cfg, **kw)
        if tower == "text":
            return clip.CLIPTextModel(_with_proj(cfg.text, cfg.projection_dim), True, **kw)
        if tower == "vision":
            return clip.CLIPVisionModel(_with_proj(cfg.vision, cfg.projection_dim), True, **kw)
        raise ValueError(f"tower {tower!r}: choose 'text', 'vision' or None")
    text = arch.startswith("CLIPText")
    if tower is not None and tower != ("text" if text else "vision"):
        raise ValueError(f"{where} is a {arch}; it has no {tower} tower")
    proj = arch.endswith("WithProjection")
    if text:
        return clip.CLIPTextModel(clip.CLIPTextConfig.from_hf(config), proj, **kw)
    return clip.CLIPVisionModel(clip.CLIPVisionConfig.from_hf(config), proj, **kw)


def _with_proj(cfg, dim):
    import dataclasses
    return dataclasses.replace(cfg, projection_dim=dim)


def canonical_state(state: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """Puts back the tower prefix that transformers 5.6+ leaves out."""
    prefix = _ARCHS[arch]
    if prefix is None or any(k.startswith(prefix) for k in state):
        return dict(state)
    return {prefix + k: v for k, v in state.items()}


def expected_shapes(module) -> dict:
    """The param tree of `module` as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *clip.dummy_inputs(module))["params"]


def _hub_patterns(prefix: str, stem: str, suffix: str, variant: str | None = None) -> list[str]:
    """The config and default-precision weights only (not fp16 copies or other frameworks),
    or, with `variant`, the `STEM.VARIANT` weights too."""
    out = [f"{prefix}config.json", f"{prefix}{stem}{suffix}", f"{prefix}{stem}{suffix}.index.json",
           f"{prefix}{stem}-*-of-*{suffix}"]
    if variant:
        out += [f"{prefix}{stem}.{variant}{suffix}", f"{prefix}{stem}.{variant}{suffix}.index.json",
                f"{prefix}{stem}-*-of-*.{variant}{suffix}"]
    return out


def load_clip(path_or_id: str | os.PathLike, *, subfolder: str | None = None, tower: str | None = None,
              dtype=jnp.float32, param_dtype=np.float32, attention_impl: str | None = None,
              remat: bool = False, strict: bool = True, variant: str | None = None):
    """Loads a transformers CLIP checkpoint as (Flax module, params).

    `path_or_id`: a folder with `config.json` and weights, or a hub id
    (`openai/clip-vit-large-patch14`); `subfolder`: e.g. `text_encoder` of a
    Stable Diffusion folder. `tower`: see `build_module`. `dtype` is the
    compute dtype, `param_dtype` the dtype of the returned params. With
    `strict`, any missing, unexpected or misshapen key raises
    `core.ConversionError` whose `report` names them. `variant` (diffusers'
    "fp16"): read `model.VARIANT.safetensors` where the folder has it, else
    the default weights (SDXL repos ship fp16 copies of their text encoders).
    """
    prefix = f"{subfolder}/" if subfolder else ""
    on_hub = not Path(os.fspath(path_or_id)).expanduser().exists()
    folder = hub.resolve(path_or_id, allow_patterns=_hub_patterns(prefix, "model", ".safetensors", variant))
    if on_hub and not any((folder / prefix).glob("model*.safetensors")):
        # Older repos carry only pickles.
        folder = hub.resolve(path_or_id, allow_patterns=_hub_patterns(prefix, "pytorch_model", ".bin"))
    if subfolder:
        folder = folder / subfolder
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a transformers model folder")
    config = json.loads(config_path.read_text())
    arch = architecture(config, str(config_path))
    module = build_module(config, tower=tower, dtype=dtype, attention_impl=attention_impl, remat=remat,
                          where=str(config_path))
    files = None
    if variant:
        try:
            files = core.find_weights(folder, _WEIGHT_STEMS, variant)
        except FileNotFoundError:
            pass  # the default weights below; their error names what is there
    files = files or core.find_weights(folder, _WEIGHT_STEMS)
    state = {}
    for f in files:
        state.update(core.read_checkpoint(f))
    state = canonical_state(state, arch)
    ignore = list(_IGNORE)
    if arch == "CLIPModel" and tower == "text":
        ignore += [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]
    elif arch == "CLIPModel" and tower == "vision":
        ignore += [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    params, _ = core.load_params(state, expected_shapes(module), source=source, ignore=ignore,
                                 dtype=param_dtype, strict=strict)
    return module, params


def hf_config(module) -> dict[str, Any]:
    """The transformers `config.json` dict for a Flax CLIP module."""
    if isinstance(module, clip.CLIPModel):
        return {"architectures": ["CLIPModel"], "model_type": "clip", **module.config.to_hf()}
    if isinstance(module, clip.CLIPTextModel):
        arch = "CLIPTextModelWithProjection" if module.with_projection else "CLIPTextModel"
        return {"architectures": [arch], "model_type": "clip_text_model", **module.config.to_hf()}
    if isinstance(module, clip.CLIPVisionModel):
        arch = "CLIPVisionModelWithProjection" if module.with_projection else "CLIPVisionModel"
        return {"architectures": [arch], "model_type": "clip_vision_model", **module.config.to_hf()}
    raise TypeError(f"not a CLIP module: {type(module).__name__}")


def save_clip(params, module, out_dir: str | os.PathLike, *, dtype=None) -> Path:
    """Writes `config.json` + `model.safetensors` that transformers' `from_pretrained` loads.

    Arguments in the order of `convert.diffusers.save_unet`: the params, then
    the module (its class picks the transformers architecture, its config the
    fields), the folder. Keys keep the tower prefix (`text_model.`), the
    layout both transformers 4.x and 5.x read. `dtype` (e.g. np.float16)
    casts the saved tensors; `transformers_version` is
    `core.target_version("transformers")`.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"save_clip takes (params, module, out_dir, *, dtype=None); its first argument is a "
                        f"{type(params).__name__}, not a params tree: pass the params first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = core.export_state_dict(params, dtype=dtype)
    core.write_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    config = {**hf_config(module), "transformers_version": core.target_version("transformers")}
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return out
