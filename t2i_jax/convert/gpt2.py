"""transformers GPT-2 checkpoints -> Flax params (`t2i_jax.models.gpt2`).

Reads `config.json` + `model.safetensors` / `pytorch_model.bin` (or sharded
index files) from a folder or hub id. GPT2LMHeadModel checkpoints carry the
`transformer.` prefix; a bare GPT2Model's keys (`wte.weight`, `h.0...`) get
it added. The tied `lm_head.weight` (saved by older versions, left out by
newer ones) is not read: the head is `wte`.

GPT-2 stores its linear layers as transformers `Conv1D`, weight [in, out],
which is already Flax's Dense kernel layout. `core.load_params` transposes
every 2-D kernel (nn.Linear is [out, in]), so the table transposes Conv1D
weights once beforehand and the two cancel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.convert import core, hub
from t2i_jax.models import gpt2

_WEIGHT_STEMS = ("model", "pytorch_model")


def _conv1d(key: str, x: np.ndarray) -> dict[str, np.ndarray]:
    return {key: x.T}


RULES = (
    # Conv1D weights [in, out]; see the module docstring.
    core.Rule(r"transformer\.h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.weight",
              r"transformer.h_\1.\2.\3.weight", _conv1d),
    # Flax names the blocks `h_N` ("h" is not one of core.LIST_MODULES).
    core.Rule(r"transformer\.h\.(\d+)\.(.*)", r"transformer.h_\1.\2"),
)
# Causal-mask buffers older transformers versions saved (`attn.bias`, `attn.masked_bias`); not `c_attn.bias`.
_BUFFERS = (r"\.attn\.(bias|masked_bias)$",)


def canonical_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the `transformer.` prefix a bare GPT2Model checkpoint lacks (keys other than `lm_head.*`)."""
    if any(k.startswith("transformer.") for k in state):
        return dict(state)
    return {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in state.items()}


def expected_shapes(module: gpt2.GPT2LMHeadModel) -> dict:
    """The param tree of `module` as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(module.init, jax.random.key(0), *gpt2.dummy_inputs())["params"]


def convert_state(state: dict[str, np.ndarray], config: gpt2.GPT2Config, *, source: str = "state dict",
                  param_dtype=np.float32, strict: bool = True) -> tuple[dict, core.Report]:
    """A transformers GPT-2 state dict (numpy) -> (Flax params, report). With `strict`, a missing,
    unexpected or misshapen key raises `core.ConversionError` carrying the report."""
    renamed, origin = core.apply_rules(canonical_state(state), RULES)
    ignore = list(_BUFFERS)
    if config.tie_word_embeddings:
        ignore.append(r"^lm_head\.weight$")
    return core.load_params(renamed, expected_shapes(gpt2.GPT2LMHeadModel(config)), source=source,
                            origin=origin, ignore=ignore, dtype=param_dtype, strict=strict)


def hub_patterns() -> list[str]:
    """The config, tokenizer files and PyTorch weights of a GPT-2 repo (not TF/Flax/ONNX copies,
    not `training_args.bin`)."""
    return ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "special_tokens_map.json", "added_tokens.json", "model.safetensors",
            "model.safetensors.index.json", "model-*-of-*.safetensors", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


def load_gpt2(path_or_id: str | os.PathLike, *, dtype=jnp.float32, param_dtype=np.float32,
              strict: bool = True) -> tuple[gpt2.GPT2LMHeadModel, dict, Path]:
    """Loads a transformers GPT-2 checkpoint (folder or hub id) as (module, params, local folder).

    The folder is returned so the caller can read the tokenizer next to the weights.
    """
    folder = hub.resolve(path_or_id, allow_patterns=hub_patterns())
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a transformers model folder")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in ("gpt2", None):
        raise core.ConversionError(f"{config_path} describes model_type {config.get('model_type')!r}; "
                                   "expected a GPT-2 model (model_type 'gpt2')")
    cfg = gpt2.GPT2Config.from_hf(config)
    files = core.find_weights(folder, _WEIGHT_STEMS)
    state = {}
    for f in files:
        state.update(core.read_checkpoint(f))
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    params, _ = convert_state(state, cfg, source=source, param_dtype=param_dtype, strict=strict)
    return gpt2.GPT2LMHeadModel(cfg, dtype), params, folder
