"""diffusers model folders (UNet2DConditionModel, AutoencoderKL) <-> Flax params.

A diffusers folder holds `config.json` and `diffusion_pytorch_model
[.VARIANT].safetensors` (or `.bin`, or a sharded index). Keys already carry
the canonical names; the only table is for VAEs saved before diffusers
renamed the mid-block attention (`query/key/value/proj_attn`), whose weights
some converters also stored as 1x1 convs.

    unet, params = load_unet("stable-diffusion-v1-5/stable-diffusion-v1-5")
    vae, vae_params = load_vae(folder, subfolder="vae")
    save_unet(params, unet.config, "out/unet")  # from_pretrained-able

The savers (`save_unet`, `save_vae`, and `convert.clip.save_clip`) all take
(params, config or module, out_dir, *, dtype=None).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.convert import core, hub
from t2i_jax.models import unet as unet_lib
from t2i_jax.models import vae as vae_lib

WEIGHT_STEMS = ("diffusion_pytorch_model",)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _squeeze_1x1(key: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """A Linear weight stored as a 1x1 conv [out, in, 1, 1] -> [out, in]."""
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        x = x[:, :, 0, 0]
    return {key: x}


_ATTN = r"((?:encoder|decoder)\.mid_block\.attentions\.\d+)"
VAE_RULES = (
    core.Rule(_ATTN + r"\.query\.(weight|bias)", r"\1.to_q.\2", _squeeze_1x1),
    core.Rule(_ATTN + r"\.key\.(weight|bias)", r"\1.to_k.\2", _squeeze_1x1),
    core.Rule(_ATTN + r"\.value\.(weight|bias)", r"\1.to_v.\2", _squeeze_1x1),
    core.Rule(_ATTN + r"\.proj_attn\.(weight|bias)", r"\1.to_out.0.\2", _squeeze_1x1),
    core.Rule(_ATTN + r"\.(to_q|to_k|to_v|to_out\.0)\.weight", r"\1.\2.weight", _squeeze_1x1),
)
UNET_RULES: tuple[core.Rule, ...] = ()


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _patterns(subfolder: str | None, variant: str | None, suffix: str) -> list[str]:
    """Hub file patterns for one model's config and weights (one format, one variant)."""
    v = f".{variant}" if variant else ""
    stem = WEIGHT_STEMS[0]
    out = []
    for prefix in ([f"{subfolder}/"] if subfolder else []) + [""]:
        out += [f"{prefix}{CONFIG_NAME}", f"{prefix}{stem}{v}{suffix}", f"{prefix}{stem}{v}{suffix}.index.json",
                f"{prefix}{stem}{suffix}.index{v}.json", f"{prefix}{stem}-*-of-*{v}{suffix}"]
    return out


def model_folder(path_or_id: str | os.PathLike, subfolder: str | None, *, what: str,
                 variant: str | None = None, revision: str | None = None) -> Path:
    """The folder holding `config.json` + weights: `PATH/subfolder`, or PATH itself
    when it directly holds a `config.json` (a standalone model folder).

    A hub id is fetched with only this model's files: its safetensors, or its
    `.bin` files when the repo has no safetensors.
    """
    if os.path.isfile(path_or_id):
        raise ValueError(
            f"{path_or_id} is a file; {what} loads a diffusers folder (config.json + weights). "
            "For an original single-file SD checkpoint use t2i_jax.convert.single_file"
        )
    on_hub = not Path(path_or_id).expanduser().exists()
    root = hub.resolve(path_or_id, allow_patterns=_patterns(subfolder, variant, ".safetensors"), revision=revision)
    tried = []
    for folder in ([root / subfolder] if subfolder else []) + [root]:
        tried.append(str(folder / CONFIG_NAME))
        if (folder / CONFIG_NAME).is_file():
            if on_hub and not any(folder.glob(f"{WEIGHT_STEMS[0]}*.safetensors")):
                hub.resolve(path_or_id, allow_patterns=_patterns(subfolder, variant, ".bin"), revision=revision)
            return folder
    raise FileNotFoundError(f"no {what} config found: looked for {' and '.join(tried)}")


def read_weights(folder: Path, variant: str | None = None) -> core.StateDict:
    """The state dict of a diffusers model folder (any of its weight file layouts).

    Besides what `core.read_weights_dir` finds, reads diffusers' own name for
    a sharded variant's index (`STEM.safetensors.index.fp16.json`).
    """
    if variant:
        for suffix in (".safetensors", ".bin"):
            index = folder / f"{WEIGHT_STEMS[0]}{suffix}.index.{variant}.json"
            if index.is_file():
                out: core.StateDict = {}
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    out.update(core.read_checkpoint(folder / shard))
                return out
    return core.read_weights_dir(folder, WEIGHT_STEMS, variant)


def _read_config(folder: Path) -> tuple[dict, str]:
    path = folder / CONFIG_NAME
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _load(module, folder: Path, rules, variant, param_dtype, strict, dummy) -> dict:
    state = read_weights(folder, variant)
    state, origin = core.apply_rules(state, rules)
    expected = jax.eval_shape(module.init, jax.random.key(0), *dummy)["params"]
    params, report = core.load_params(state, expected, source=str(folder), origin=origin, dtype=param_dtype,
                                      strict=strict)
    if not report.ok:
        logging.warning("%s", report)
    return params


def load_unet(path_or_id: str | os.PathLike, *, subfolder: str | None = "unet", variant: str | None = None,
              dtype=jnp.float32, param_dtype=np.float32, attention_impl: str | None = None,
              remat: bool = False, strict: bool = True, revision: str | None = None):
    """Loads a diffusers UNet2DConditionModel as (Flax module, params).

    `path_or_id`: a pipeline folder or hub id (the `subfolder` "unet" is
    used) or a folder that directly holds config.json + weights. `variant`:
    e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`. `dtype` is the
    module's compute dtype, `param_dtype` that of the returned params. With
    `strict`, any missing, unexpected or misshapen key raises
    `core.ConversionError` whose `report` names them.
    """
    folder = model_folder(path_or_id, subfolder, what="load_unet", variant=variant, revision=revision)
    raw, source = _read_config(folder)
    config = unet_lib.UNetConfig.from_diffusers(raw, source)
    module = unet_lib.UNet2DConditionModel(config, dtype=dtype, attention_impl=attention_impl, remat=remat)
    params = _load(module, folder, UNET_RULES, variant, param_dtype, strict, unet_lib.dummy_inputs(config))
    return module, params


def load_vae(path_or_id: str | os.PathLike, *, subfolder: str | None = "vae", variant: str | None = None,
             dtype=jnp.float32, param_dtype=np.float32, strict: bool = True, revision: str | None = None):
    """Loads a diffusers AutoencoderKL as (Flax module, params); arguments as `load_unet`.

    Old checkpoints' attention names (`query`, `key`, `value`, `proj_attn`,
    also as 1x1 convs) are renamed on the way.
    """
    folder = model_folder(path_or_id, subfolder, what="load_vae", variant=variant, revision=revision)
    raw, source = _read_config(folder)
    config = vae_lib.VAEConfig.from_diffusers(raw, source)
    module = vae_lib.AutoencoderKL(config, dtype=dtype)
    side = config.downsample_factor
    dummy = (jnp.zeros((1, side, side, config.in_channels), jnp.float32),)
    return module, _load(module, folder, VAE_RULES, variant, param_dtype, strict, dummy)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def _check_params_first(what: str, params) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"save_{what} takes (params, config, out_dir, *, dtype=None); its first argument "
                        f"is a {type(params).__name__}, not a params tree: pass the params first")


def _save(params: Mapping, config_dict: dict, out_dir, dtype) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if set(params) == {"params"}:  # accept the {"params": ...} variables dict too
        params = params["params"]
    state = core.export_state_dict(params, dtype=dtype)
    core.write_safetensors(state, out / WEIGHTS_NAME, metadata={"format": "pt"})
    # diffusers writes its own version here; name the one this folder is for.
    config_dict = {**config_dict, "_diffusers_version": core.target_version("diffusers")}
    tmp = out / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config_dict, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out


def save_unet(params: Mapping, config: unet_lib.UNetConfig, out_dir: str | os.PathLike, *, dtype=None) -> Path:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` that
    `diffusers.UNet2DConditionModel.from_pretrained(out_dir)` loads.
    `dtype` (e.g. np.float16) casts the saved tensors; `_diffusers_version`
    is `core.target_version("diffusers")`."""
    _check_params_first("unet", params)
    return _save(params, config.to_diffusers(), out_dir, dtype)


def save_vae(params: Mapping, config: vae_lib.VAEConfig, out_dir: str | os.PathLike, *, dtype=None) -> Path:
    """Writes a folder `diffusers.AutoencoderKL.from_pretrained(out_dir)` loads;
    arguments as `save_unet`."""
    _check_params_first("vae", params)
    return _save(params, config.to_diffusers(), out_dir, dtype)
