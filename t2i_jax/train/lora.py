"""LoRA training for the latent-diffusion trainer: low-rank adapters on layers matched by pattern.

    python -m t2i_jax.train --config configs/lora_shapes.py --workdir runs/lora_teal

With `config.lora.rank` > 0 the ldm trainer trains only adapters: for every
Dense or conv layer of the U-Net whose module path (the diffusers name,
e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`) matches
`lora.targets` (`re.search`), and of the CLIP text encoder matching
`lora.text_encoder_targets`, the layer's output y = W x + b becomes

    y + (alpha / rank) * up(down(dropout(x)))

with `down` [in, rank] initialised as PEFT does (kaiming-uniform, bound
1 / sqrt(in)) and `up` [rank, out] at zero, so training starts at the base
model. A k x k conv (a ResNet's conv1/conv2, a down/upsampler's conv) gets
kohya's LoCon form, what PEFT builds for a Conv2d: `down` a k x k conv to
`rank` channels with the layer's own strides and padding ([k, k, in, rank],
bound 1 / sqrt(k * k * in)), `up` a 1x1 conv [rank, out]; merged, up @ down is
a k x k kernel, so the files are ordinary LoRA files that diffusers loads.

The adapters are the train state's `params` (optimizer moments, EMA,
donation and checkpoints hold them alone); the base weights are a frozen,
non-donated argument of the step, kernels cast to the compute dtype.

The branch is added by a flax method interceptor (`nn.intercept_methods`) on
the matched layers' `__call__`, not merged into W: dropout acts on the
branch's input, which a weight merge cannot express, and the models need no
LoRA-specific code. For sampling and export the adapters are merged
(`t2i_jax.convert.lora.merge_loras`) and written as diffusers/PEFT and kohya
files (`t2i_jax.convert.lora.save_lora`).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from flax.linen import linear as flax_linear

from t2i_jax.convert import core
from t2i_jax.convert import lora as lora_convert

__all__ = ["default_config", "enabled", "scale", "Target", "find_targets", "abstract_adapters", "init_adapters",
           "apply", "frozen_base", "frozen_params", "to_layers", "merged_params", "state_bytes"]

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder")


def default_config() -> ml_collections.ConfigDict:
    """The `config.lora` keys (rank 0: LoRA off, the whole U-Net is trained)."""
    c = ml_collections.ConfigDict()
    c.rank = 0  # adapter rank; 0: off (full fine-tune)
    c.alpha = 0.0  # the branch is scaled by alpha / rank; 0: alpha = rank (scale 1)
    c.dropout = 0.0  # dropout on the branch's input (PEFT's lora_dropout)
    # U-Net module paths (re.search); add "|ff.net" for the feed-forward, "|resnets.*conv|samplers" for LoCon
    c.targets = "to_q|to_k|to_v|to_out"
    c.text_encoder_targets = ""  # CLIP text encoder module paths, e.g. "q_proj|k_proj|v_proj|out_proj"
    return c


def enabled(config) -> bool:
    """Whether `config` trains LoRA adapters instead of the whole U-Net."""
    return "lora" in config and int(config.lora.rank) > 0


def scale(config) -> float:
    """alpha / rank of `config.lora`."""
    rank = int(config.lora.rank)
    return float(config.lora.alpha or rank) / rank


# ===========================================================================
# Targets and adapters
# ===========================================================================

@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted layer: its Flax module path in `component` and its diffusers/transformers name."""

    component: str
    path: tuple[str, ...]  # Flax module path (the params path without "kernel")
    module: str  # canonical torch module path (`core.flax_path_to_torch_key`)
    kind: str  # "linear" (Dense) or "conv"
    d_in: int
    d_out: int
    kernel: tuple[int, int] = (1, 1)  # a conv's window; (1, 1) for Dense and 1x1 convs

    @property
    def fan_in(self) -> int:
        return self.d_in * self.kernel[0] * self.kernel[1]


def find_targets(params, config) -> list[Target]:
    """The layers of `params` ({"unet": tree, "text_encoder": tree}, arrays or shapes) that
    `config.lora` adapts (convs of any window: k x k ones as LoCon). Raises ValueError for a
    pattern that matches nothing."""
    patterns = {"unet": config.lora.targets, "text_encoder": config.lora.text_encoder_targets}
    out = []
    for comp in COMPONENTS:
        pattern = patterns[comp]
        if not pattern:
            continue
        rx = re.compile(pattern)
        found = []
        for path, leaf in traverse_util.flatten_dict(params[comp]).items():
            if path[-1] != "kernel":
                continue
            shape = tuple(leaf.shape)
            key, kind = core.flax_path_to_torch_key(path, len(shape))
            module = key[: -len(".weight")]
            if not rx.search(module):
                continue
            window = tuple(shape[:2]) if kind == "conv" else (1, 1)
            found.append(Target(comp, tuple(path[:-1]), module, kind, shape[-2], shape[-1], window))
        if not found:
            names = sorted(core.flax_path_to_torch_key(p, 2)[0] for p in traverse_util.flatten_dict(params[comp])
                           if p[-1] == "kernel")[:3]
            raise ValueError(f"lora {'targets' if comp == 'unet' else 'text_encoder_targets'} {pattern!r} match no "
                             f"Dense or conv layer of the {comp} (its layers are named like {names}); fix the pattern")
        out += found
    return out


def abstract_adapters(params: dict, config) -> tuple[list[Target], dict]:
    """(targets, the adapters' shapes) for the base `params` ({"unet", "text_encoder"}) and
    `config.lora`; raises ValueError when there is no base U-Net (a from-scratch config)."""
    if params.get("unet") is None:
        raise ValueError(f"lora.rank {config.lora.rank} needs a trained U-Net to adapt; set model.init_from "
                         "(a diffusers folder, hub id or single file), or lora.rank=0 to train from scratch")
    targets = find_targets(params, config)
    return targets, jax.eval_shape(lambda: init_adapters(jax.random.PRNGKey(0), targets, int(config.lora.rank)))


def init_adapters(key, targets: list[Target], rank: int) -> dict:
    """{component: {Flax module path...: {"lora_down" [in, rank], "lora_up" [rank, out]}}}, fp32:
    down kaiming-uniform (PEFT's a = sqrt(5): bound 1 / sqrt(fan in)), up zero. A k x k conv's
    down is a conv kernel [k, k, in, rank] (HWIO)."""
    flat = {}
    for i, t in enumerate(targets):
        bound = 1.0 / np.sqrt(t.fan_in)
        shape = (t.d_in, rank) if t.kernel == (1, 1) else (*t.kernel, t.d_in, rank)
        down = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound)
        flat[(t.component, *t.path, "lora_down")] = down
        flat[(t.component, *t.path, "lora_up")] = jnp.zeros((rank, t.d_out), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def frozen_base(tree, dtype):
    """Base weights as the frozen step argument: kernels and embedding tables (ndim >= 2, nearly
    all the bytes) in the compute `dtype`, which the layers cast them to anyway; biases and norm
    params stay fp32 (the norms compute in fp32)."""
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, tree)


def frozen_params(params: dict, config) -> dict:
    """The frozen step argument of a LoRA run from host {"unet", "text_encoder", "vae"} params:
    U-Net and text encoder (SDXL: both) through `frozen_base` in `config.model.dtype`, the VAE as it is."""
    keys = COMPONENTS + (("text_encoder_2",) if params.get("text_encoder_2") is not None else ())
    return {"vae": params["vae"], **{k: frozen_base(params[k], config.model.dtype) for k in keys}}


# ===========================================================================
# Forward with adapters
# ===========================================================================

def apply(module: nn.Module, variables, adapters: dict | None, *args, lora_scale: float = 1.0,
          dropout: float = 0.0, rng=None, **kwargs):
    """`module.apply(variables, *args, **kwargs)` with each adapted layer's output plus
    `lora_scale * up(down(dropout(x)))`.

    `adapters`: one component's tree from `init_adapters` (None or empty: the plain model).
    `rng`: for dropout, per-example keys [B, 2] (a micro-batch then draws what the whole
    batch would) or one key.
    """
    if not adapters:
        return module.apply(variables, *args, **kwargs)
    table = {path[:-1]: None for path in traverse_util.flatten_dict(adapters)}
    table = {p: (i, _get(adapters, p)) for i, p in enumerate(sorted(table))}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        hit = table.get(tuple(mod.path))
        y = next_fun(*args, **kwargs)
        if hit is None:
            return y
        idx, ad = hit
        x = args[0]
        if dropout > 0 and rng is not None:
            x = _dropout(x, dropout, rng, idx)
        dt = y.dtype
        down = ad["lora_down"].astype(dt)
        if down.ndim == 4:  # LoCon: a k x k conv down to the rank, with the layer's strides and padding
            h = _conv(mod, x.astype(dt), down)
        else:
            h = jnp.matmul(x.astype(dt), down)
        h = jnp.matmul(h, ad["lora_up"].astype(dt))
        return y + (lora_scale * h).astype(dt)

    with nn.intercept_methods(interceptor):
        return module.apply(variables, *args, **kwargs)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _conv(mod: nn.Conv, x, kernel):
    """`x` [B, H, W, C] through `kernel` (HWIO) as the layer `mod` convolves its input."""
    if mod.feature_group_count != 1 or mod.input_dilation not in (None, 1) or mod.kernel_dilation not in (None, 1):
        raise ValueError(f"LoRA on conv {'.'.join(mod.path)}: grouped or dilated convs are not supported")
    strides = mod.strides if mod.strides is not None else 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    padding = flax_linear.canonicalize_padding(mod.padding, 2)  # nn.Conv's own reading of its padding
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _dropout(x, rate: float, rng, idx: int):
    keep = 1.0 - rate
    if rng.ndim == 2 and rng.shape[0] == x.shape[0]:
        mask = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, idx), keep, x.shape[1:]))(rng)
    else:
        mask = jax.random.bernoulli(jax.random.fold_in(rng.reshape(-1, 2)[0], idx), keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


# ===========================================================================
# Export: adapters -> LoraLayer (torch layout), merged params, files
# ===========================================================================

def to_layers(adapters: dict, targets: list[Target], lora_scale: float) -> list[lora_convert.LoraLayer]:
    """Host adapters as `t2i_jax.convert.lora.LoraLayer`s (torch layout: down [rank, in(, kh, kw)],
    up [out, rank(, 1, 1)]), what `merge_loras` and `save_lora` take."""
    layers = []
    for t in targets:
        ad = _get(adapters[t.component], t.path)
        down, up = np.asarray(ad["lora_down"], np.float32), np.asarray(ad["lora_up"], np.float32).T
        if t.kind == "conv":  # down HWIO [kh, kw, in, rank] (a 1x1 conv's stored as [in, rank]) -> [rank, in, kh, kw]
            down = down.reshape(*t.kernel, t.d_in, -1).transpose(3, 2, 0, 1)
            up = up[:, :, None, None]
        else:
            down = down.T
        layers.append(lora_convert.LoraLayer(t.component, t.module, down, up, float(lora_scale)))
    return layers


def merged_params(base: dict, adapters: dict, targets: list[Target], lora_scale: float) -> dict:
    """`base` ({"unet", "text_encoder", ...} host params) with the adapters merged into the kernels:
    W + scale * down @ up, what the trained model computes without dropout."""
    return lora_convert.merge_loras(base, [(to_layers(adapters, targets, lora_scale), 1.0)])


def state_bytes(abstract_state) -> int:
    """Bytes of a (train) state from its arrays' shapes and dtypes (`jax.eval_shape` output works)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(abstract_state)))
