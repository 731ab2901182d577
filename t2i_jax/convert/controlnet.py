"""ControlNet checkpoints -> Flax params: diffusers folders, hub ids, original single files.

Sources `load_controlnet` reads:

- a diffusers ControlNetModel folder (`config.json` +
  `diffusion_pytorch_model[.fp16].safetensors` or `.bin`), or a pipeline
  folder with a `controlnet/` subfolder, or its hub id
  (`lllyasviel/sd-controlnet-canny`, `lllyasviel/control_v11p_sd15_canny`);
- an original single file as lllyasviel publishes them
  (`control_v11p_sd15_canny.pth`, `control_sd15_canny.pth`, `.safetensors`
  conversions), local or on the hub as `org/name/file.pth`. Their keys are
  the LDM U-Net's (`time_embed.*`, `input_blocks.*`, `middle_block.*`) plus
  `input_hint_block.*` (the control image encoder), `zero_convs.*` and
  `middle_block_out.*`, optionally under `control_model.` (the v1.0 files
  also hold the whole SD model beside it, which is skipped). The config is
  inferred from the shapes; what shapes cannot tell (head count: 8 for SD1,
  64-channel heads for SD2; GroupNorm groups; `global_pool_conditions` of the
  shuffle net) comes from the SD conventions and may be overridden with
  `config`.

    net, params = load_controlnet("lllyasviel/sd-controlnet-canny")
    net, params = load_controlnet("control_v11e_sd15_shuffle.pth", config={"global_pool_conditions": True})
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.convert import core, single_file
from t2i_jax.convert import diffusers as diffusers_convert
from t2i_jax.models import controlnet as controlnet_lib

Rule = core.Rule
log = logging.getLogger(__name__)

PREFIX = "control_model."
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# The Flax list `controlnet_down_blocks_N` is not one of core.LIST_MODULES, so
# its canonical key keeps the underscore; diffusers writes `.N`.
DIFFUSERS_RULES = (Rule(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", r"controlnet_down_blocks_\1.\2"),)
_EXPORT_RULES = (Rule(r"controlnet_down_blocks_(\d+)\.(weight|bias)", r"controlnet_down_blocks.\1.\2"),)


# --------------------------------------------------------------------------
# The single-file table
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def single_file_rules(layers_per_block: int, num_levels: int, num_hint_blocks: int) -> tuple[Rule, ...]:
    """Original ControlNet keys (without `control_model.`) -> canonical keys.

    The down path, middle block and time embedding are numbered as in the LDM
    U-Net (`single_file.unet_rules`, whose up-path rules match nothing here).
    `input_hint_block` is a Sequential of convs and SiLUs: conv_in at 0, the
    `num_hint_blocks` inner convs at 2, 4, ..., conv_out after them.
    `zero_convs.i.0` is the i-th down residual's 1x1 conv, `middle_block_out.0`
    the middle one's.
    """
    n_in = 1 + num_levels * (layers_per_block + 1) - 1
    rules = [r for r in single_file.unet_rules(layers_per_block, num_levels)
             if not r.pattern.startswith(("output_blocks", r"out\."))]
    rules += [
        Rule(r"input_hint_block\.0\.(weight|bias)", r"controlnet_cond_embedding.conv_in.\1"),
        Rule(rf"input_hint_block\.{2 * num_hint_blocks + 2}\.(weight|bias)", r"controlnet_cond_embedding.conv_out.\1"),
        Rule(r"middle_block_out\.0\.(weight|bias)", r"controlnet_mid_block.\1"),
    ]
    rules += [Rule(rf"input_hint_block\.{2 * k + 2}\.(weight|bias)", rf"controlnet_cond_embedding.blocks.{k}.\1")
              for k in range(num_hint_blocks)]
    rules += [Rule(rf"zero_convs\.{i}\.0\.(weight|bias)", rf"controlnet_down_blocks_{i}.\1") for i in range(n_in)]
    return tuple(rules)


def infer_config(state: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A diffusers ControlNetModel config from original keys (prefix stripped)."""

    def need(key):
        if key not in state:
            raise core.ConversionError(f"{source}: no {key!r}, which every original ControlNet file has; "
                                       "is this a ControlNet checkpoint?")
        return np.shape(state[key])

    def numbers(pattern):
        r = re.compile(pattern)
        return sorted({int(m.group(1)) for k in state if (m := r.match(k))})

    conv_in = need("input_blocks.0.0.weight")
    n_in = len(numbers(r"input_blocks\.(\d+)\."))
    downs = numbers(r"input_blocks\.(\d+)\.0\.op\.weight")
    lpb = downs[0] - 1 if downs else n_in - 1
    levels = n_in // (lpb + 1)
    if lpb < 1 or n_in != levels * (lpb + 1) or downs != [1 + b * (lpb + 1) + lpb for b in range(levels - 1)]:
        raise core.ConversionError(f"{source}: unexpected ControlNet layout: {n_in} input blocks with "
                                   f"downsamplers at {downs}")
    first = [1 + b * (lpb + 1) for b in range(levels)]
    channels = [int(need(f"input_blocks.{i}.0.in_layers.2.weight")[0]) for i in first]
    down_types = ["CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in state else "DownBlock2D"
                  for i in first]
    cross = next((int(np.shape(v)[1]) for k, v in state.items() if k.endswith(".attn2.to_k.weight")), None)
    if cross is None:
        raise core.ConversionError(f"{source}: the ControlNet has no cross-attention (no *.attn2.to_k.weight)")
    hint = numbers(r"input_hint_block\.(\d+)\.weight")
    if not hint or hint != list(range(0, hint[-1] + 1, 2)) or len(hint) % 2:
        raise core.ConversionError(f"{source}: unexpected input_hint_block layout (convs at {hint}); expected "
                                   "convs at 0, 2, ..., 4 * levels + 2")
    hint_channels = [int(need("input_hint_block.0.weight")[0])]
    hint_channels += [int(need(f"input_hint_block.{j}.weight")[0]) for j in hint[2:-1:2]]
    sd2 = cross == 1024
    return {
        "_class_name": controlnet_lib.CLASS_NAME,
        "in_channels": int(conv_in[1]),
        "conditioning_channels": int(need("input_hint_block.0.weight")[1]),
        "down_block_types": down_types,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": cross,
        "transformer_layers_per_block": len(numbers(r"middle_block\.1\.transformer_blocks\.(\d+)\.")),
        "attention_head_dim": [max(1, c // 64) for c in channels] if sd2 else 8,
        "use_linear_projection": len(need("middle_block.1.proj_in.weight")) == 2,
        "conditioning_embedding_out_channels": hint_channels,
        "norm_num_groups": 32,
    }


def convert_single_file(state: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                        source: str = "checkpoint") -> tuple[dict, core.StateDict, dict[str, str]]:
    """(diffusers config, canonical state dict, canonical -> original key) of an
    original ControlNet state dict. Keys outside `control_model.` (the SD model
    of the v1.0 files) are skipped when the prefix is present."""
    if any(k.startswith(PREFIX) for k in state):
        skipped = sum(not k.startswith(PREFIX) for k in state)
        if skipped:
            log.info("%s: skipping %d keys outside %s* (the base SD model stored beside the ControlNet)",
                     source, skipped, PREFIX)
        prefix = PREFIX
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    else:
        prefix = ""
    if "controlnet_cond_embedding.conv_in.weight" in state:
        raise core.ConversionError(f"{source} already has diffusers keys; save it with its config.json in a "
                                   "folder and load the folder")
    inferred = infer_config(state, source)
    unknown = set(config or ()) - set(controlnet_lib.ControlNetConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"config overrides {sorted(unknown)} are not ControlNetModel fields")
    cfg = {**inferred, **dict(config or {})}
    n_hint = len(cfg["conditioning_embedding_out_channels"]) * 2 - 2
    rules = single_file_rules(cfg["layers_per_block"], len(cfg["block_out_channels"]), n_hint)
    renamed, origin = core.apply_rules(state, rules)
    return cfg, renamed, {k: prefix + v for k, v in origin.items()}


# --------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------


def _is_single_file(s: str) -> bool:
    p = Path(s).expanduser()
    if p.is_file():
        return True
    return not p.exists() and s.count("/") >= 2 and s.endswith(_SINGLE_FILE_SUFFIXES)


def _local_file(s: str) -> Path:
    p = Path(s).expanduser()
    if p.is_file():
        return p
    import huggingface_hub

    repo, filename = "/".join(s.split("/")[:2]), "/".join(s.split("/")[2:])
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename))
    except Exception as e:
        raise FileNotFoundError(f"could not get {filename!r} from hub repo {repo!r} ({type(e).__name__}: {e}). "
                                "If this machine is offline, download the file elsewhere and pass its path") from e


def load_controlnet(path_or_id: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32,
                    param_dtype=np.float32, attention_impl: str | None = None,
                    config: Mapping[str, Any] | None = None, strict: bool = True, revision: str | None = None):
    """Loads a ControlNet as (Flax `ControlNetModel`, params); sources in the module docstring.

    `variant` ("fp16") picks `diffusion_pytorch_model.fp16.safetensors` in a
    folder; `config` overrides the inferred config of a single file. `dtype`
    is the module's compute dtype, `param_dtype` the params'. With `strict`,
    missing, unexpected or misshapen keys raise `core.ConversionError` naming them.
    """
    s = os.fspath(path_or_id)
    if _is_single_file(s):
        path = _local_file(s)
        raw, state, origin = convert_single_file(core.read_checkpoint(path), config, str(path))
        source, config_source = str(path), f"{path} (inferred ControlNet config)"
    else:
        if config:
            raise ValueError("config overrides apply to single-file ControlNets; a diffusers folder brings its "
                             "own config.json (edit that instead)")
        folder = diffusers_convert.model_folder(s, "controlnet", what="load_controlnet", variant=variant,
                                                revision=revision)
        path = folder / diffusers_convert.CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        state, origin = core.apply_rules(diffusers_convert.read_weights(folder, variant), DIFFUSERS_RULES)
        source, config_source = str(folder), str(path)
    cfg = controlnet_lib.ControlNetConfig.from_diffusers(raw, config_source)
    module = controlnet_lib.ControlNetModel(cfg, dtype=dtype, attention_impl=attention_impl)
    expected = jax.eval_shape(module.init, jax.random.key(0), *controlnet_lib.dummy_inputs(cfg))["params"]
    params, report = core.load_params(state, expected, source=source, origin=origin, dtype=param_dtype,
                                      strict=strict)
    if not report.ok:
        log.warning("%s", report)
    return module, params


def save_controlnet(params: Mapping, config: controlnet_lib.ControlNetConfig, out_dir: str | os.PathLike, *,
                    dtype=None) -> Path:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` that
    `diffusers.ControlNetModel.from_pretrained(out_dir)` loads."""
    if set(params) == {"params"}:
        params = params["params"]
    state, _ = core.apply_rules(core.export_state_dict(params, dtype=dtype), _EXPORT_RULES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    core.write_safetensors(state, out / diffusers_convert.WEIGHTS_NAME, metadata={"format": "pt"})
    cfg = {**config.to_diffusers(), "_diffusers_version": core.target_version("diffusers")}
    (out / diffusers_convert.CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return out
