"""The benchmark's named models: their parts, random params, abstract params.

`MODELS` names the configs (`tiny`, `sd15`, `sd21`, `sdxl`, `tiny-sdxl`)
`t2i_jax.bench.core` times; `model_parts` builds their modules and tokenizers,
`random_params` random weights on the devices, and `abstract_params` /
`lower_sample_loop` let a full-size model be compiled without its weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax import parallel, pipeline
from t2i_jax.models import clip as clip_lib
from t2i_jax.models import unet as unet_lib
from t2i_jax.models import vae as vae_lib
from t2i_jax.schedulers.schedule import SD_SCHEDULER
from t2i_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which named parts make up a benchmark model."""

    unet: str
    vae: str
    text: str
    # Replacements in the text encoder config (the tiny CLIP is narrower than
    # the tiny U-Net's cross-attention).
    text_overrides: tuple[tuple[str, Any], ...] = ()
    # Replacements in the named U-Net and VAE configs (a tiny SDXL is the SDXL
    # layout at toy widths; SDXL's VAE is SD's with another latent scale).
    unet_overrides: tuple[tuple[str, Any], ...] = ()
    vae_overrides: tuple[tuple[str, Any], ...] = ()
    # SDXL: the second text encoder (OpenCLIP ViT-bigG, with projection), as
    # a named CLIP text config plus replacements; None for SD 1.x/2.x.
    text_2: str | None = None
    text_2_overrides: tuple[tuple[str, Any], ...] = ()
    scheduler: str = "pndm"  # the sampler of the model's diffusers pipeline (SD: PNDM; SDXL: Euler)

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, pooled text and time ids into the U-Net."""
        return self.text_2 is not None

    def unet_config(self) -> unet_lib.UNetConfig:
        return dataclasses.replace(unet_lib.UNetConfig.named(self.unet), **dict(self.unet_overrides))

    def vae_config(self) -> vae_lib.VAEConfig:
        return dataclasses.replace(vae_lib.VAEConfig.named(self.vae), **dict(self.vae_overrides))

    def text_config(self) -> clip_lib.CLIPTextConfig:
        return dataclasses.replace(clip_lib.named_config(self.text).text, **dict(self.text_overrides))

    def text_2_config(self) -> clip_lib.CLIPTextConfig | None:
        if self.text_2 is None:
            return None
        return dataclasses.replace(clip_lib.named_config(self.text_2).text, **dict(self.text_2_overrides))


# OpenCLIP ViT-bigG/14's text tower, SDXL's second encoder (diffusers' text_encoder_2/config.json).
_BIGG = (("hidden_size", 1280), ("intermediate_size", 5120), ("num_hidden_layers", 32),
         ("num_attention_heads", 20), ("hidden_act", "gelu"), ("projection_dim", 1280))
# SDXL's layout at toy widths, as tests/test_sdxl.py builds it: no attention in
# the first block, 1 and 2 transformer layers, pooled 32 + 6 time ids of 8; one
# resnet per down block (a quicker compile).
_TINY_SDXL_UNET = (("sample_size", 16), ("block_out_channels", (32, 64)), ("layers_per_block", 1),
                   ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
                   ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D")), ("transformer_layers_per_block", (1, 2)),
                   ("attention_head_dim", (2, 4)), ("norm_num_groups", 8), ("cross_attention_dim", 64),
                   ("addition_time_embed_dim", 8), ("projection_class_embeddings_input_dim", 32 + 6 * 8))
_TINY_TEXT = (("hidden_size", 32), ("intermediate_size", 64))
_SDXL_VAE = (("scaling_factor", 0.13025),)

MODELS = {
    "tiny": ModelSpec("tiny", "tiny", "tiny", (("hidden_size", 64), ("intermediate_size", 128))),
    "sd15": ModelSpec("sd15", "sd", "vit-l-14"),
    "sd21": ModelSpec("sd21", "sd", "sd2-text"),
    # SDXL 1.0 base: CLIP ViT-L (768) + OpenCLIP bigG (1280) side by side -> 2048-wide context.
    "sdxl": ModelSpec("sdxl", "sd", "vit-l-14", vae_overrides=_SDXL_VAE, text_2="vit-l-14", text_2_overrides=_BIGG,
                      scheduler="euler"),
    "tiny-sdxl": ModelSpec("sdxl", "tiny", "tiny", _TINY_TEXT, unet_overrides=_TINY_SDXL_UNET,
                           vae_overrides=_SDXL_VAE, text_2="tiny",
                           text_2_overrides=_TINY_TEXT + (("hidden_act", "gelu"), ("projection_dim", 32)),
                           scheduler="euler"),
}


# Below this many params, `random_params` draws on the host: XLA:CPU takes
# seconds to compile the slicing program of a model with hundreds of leaves,
# numpy draws a few million numbers in milliseconds.
HOST_DRAW_MAX = 1 << 24


def random_params(module, dummy: Sequence, key, sharding) -> dict:
    """Random params of `module`'s shape (no init compile of the model
    itself): norm scales 1, biases 0, embeddings N(0, 0.02), kernels
    N(0, 1/fan_in), so activations stay O(1) in any dtype.

    Large models are made on device: one normal draw of the total size is
    cut into the leaves (a draw per leaf would compile hundreds of RNG
    kernels, slow on XLA:CPU). Small ones (under `HOST_DRAW_MAX` params) are
    drawn on the host with numpy, seeded from `key`, and placed.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *dummy)["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [math.prod(leaf.shape) for _, leaf in flat]

    def cut(pool, xp):
        leaves, start = [], 0
        for (path, leaf), size in zip(flat, sizes):
            name = getattr(path[-1], "key", str(path[-1]))
            if name == "scale":
                leaves.append(xp.ones(leaf.shape, leaf.dtype))
            elif name == "bias":
                leaves.append(xp.zeros(leaf.shape, leaf.dtype))
            else:
                std = 0.02 if name == "embedding" else 1.0 / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
                leaves.append((std * pool[start:start + size]).reshape(leaf.shape).astype(leaf.dtype))
            start += size
        return jax.tree_util.tree_unflatten(treedef, leaves)

    if sum(sizes) < HOST_DRAW_MAX:
        seed = np.asarray(jax.random.key_data(key)).astype(np.uint64)
        pool = np.random.default_rng(seed).standard_normal(sum(sizes), np.float32)
        return jax.device_put(cut(pool, np), sharding)
    return jax.jit(lambda k: cut(jax.random.normal(k, (sum(sizes),), jnp.float32), jnp), out_shardings=sharding)(key)


def model_parts(model: str, dtype=jnp.float32, attention: str | None = None, *, remat: bool = False,
                unet_overrides: Sequence[tuple[str, Any]] = ()) -> dict:
    """The modules, tokenizers and pipeline options of a named model, no params:
    the keyword arguments of `pipeline.StableDiffusion` less `params` (SDXL:
    both text encoders and tokenizers, the base's pipeline options).
    `unet_overrides`: UNetConfig fields replaced on top of the model's (a smaller U-Net for tests)."""
    spec = MODELS[model]
    ucfg = dataclasses.replace(spec.unet_config(), **dict(unet_overrides))
    parts = dict(
        tokenizer=Tokenizer.bundled(pad_token="!" if spec.text == "sd2-text" else "<|endoftext|>"),
        text_encoder=clip_lib.CLIPTextModel(spec.text_config(), dtype=dtype, attention_impl=attention),
        unet=unet_lib.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl=attention, remat=remat),
        vae=vae_lib.AutoencoderKL(spec.vae_config(), dtype=dtype),
        scheduler_config=dict(SD_SCHEDULER), source=f"random {model}")
    if spec.is_sdxl:
        # OpenCLIP's tokenizer pads with "!"; the base zeros the empty negative prompt.
        parts.update(tokenizer_2=Tokenizer.bundled(pad_token="!"),
                     text_encoder_2=clip_lib.CLIPTextModel(spec.text_2_config(), with_projection=True, dtype=dtype,
                                                           attention_impl=attention),
                     pipeline_options={"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False})
    return parts


def abstract_params(parts: dict) -> dict:
    """ShapeDtypeStructs of the params of the modules in `parts` (`model_parts(...)`
    or a subset of it) by param part name; nothing is allocated (a full-size
    SDXL is 3.5 B params, 14 GB in fp32)."""
    key = jax.random.key(0)
    out = {}
    if parts.get("unet") is not None:
        out["unet"] = jax.eval_shape(parts["unet"].init, key, *unet_lib.dummy_inputs(parts["unet"].config))["params"]
    if parts.get("vae") is not None:
        vae = parts["vae"]
        side = 8 * vae.config.downsample_factor
        out["vae"] = jax.eval_shape(vae.init, key, jnp.zeros((1, side, side, vae.config.in_channels)))["params"]
    for name in ("text_encoder", "text_encoder_2"):
        if parts.get(name) is not None:
            out[name] = jax.eval_shape(parts[name].init, key, *clip_lib.dummy_inputs(parts[name]))["params"]
    return out


def sample_loop_program(model: str, *, batch: int = 1, steps: int = 30, scheduler: str | None = None,
                        guidance_scale: float = 7.5, resolution: int | None = None, dtype=jnp.float32, mesh=None,
                        unet_overrides: Sequence[tuple[str, Any]] = ()) -> dict:
    """`pipeline.Sampler`'s txt2img program (the denoising loop and the VAE
    decode, as `Sampler.loop` jits it) for a named model and its abstract
    arguments, laid out on `mesh` as the Sampler lays them (params and
    scheduler state replicated, the rest split over the batch); nothing is
    allocated or compiled.

    The conditioning has the shapes and dtypes of the Sampler's own encoders
    (SDXL: both encoders' `context`, the pooled `text_embeds` and the
    `time_ids`; SD 1.x/2.x: the text states). Returns {"sampler", "loop",
    "args" (loop's arguments), "state" (the scheduler state, concrete:
    `state.num_evals` U-Net evaluations), "scheduler", "use_cfg",
    "resolution", "latent_shape", "cond" (abstract), "text_params" (the
    abstract params of the text encoders, which the loop does not read)}.
    """
    spec = MODELS[model]
    parts = model_parts(model, dtype, unet_overrides=unet_overrides)
    mesh = mesh or parallel.make_mesh()
    pipe = pipeline.StableDiffusion(params={}, **parts)
    sampler = pipeline.Sampler(pipe, mesh=mesh, dtype=dtype)  # no params: nothing is placed
    repl, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    S = jax.ShapeDtypeStruct

    def place(tree, sharding):
        return jax.tree_util.tree_map(lambda a: S(a.shape, a.dtype, sharding=sharding), tree)

    params = abstract_params(parts)
    # The loop reads the U-Net's and the VAE's params, kernels in the compute dtype (the Sampler's cast_params).
    loop_params = place({k: jax.eval_shape(functools.partial(pipeline.cast_kernels, dtype=dtype), params[k])
                         for k in ("unet", "vae")}, repl)
    text_params = place({k: v for k, v in params.items() if k.startswith("text_encoder")}, repl)
    res = resolution or spec.unet_config().sample_size * pipe.vae_scale
    lat = (batch, res // pipe.vae_scale, res // pipe.vae_scale, pipe.latent_channels)
    name = scheduler or spec.scheduler
    state = sampler.scheduler(name).set_timesteps(steps, lat)
    ids = S((batch, pipe.tokenizer.max_length), jnp.int32)
    if pipe.is_sdxl:
        context, pooled = jax.eval_shape(sampler._encode_xl, text_params["text_encoder"],
                                         text_params["text_encoder_2"], ids, ids)
        num_ids = unet_lib.text_time_sizes(pipe.unet.config, pipe.text_encoder_2.config.projection_dim)
        cond = {"context": context, "text_embeds": pooled, "time_ids": S((batch, num_ids), jnp.float32)}
    else:
        cond = jax.eval_shape(sampler._encode, text_params["text_encoder"], ids)
    cond = place(cond, bsh)
    use_cfg = guidance_scale > 1.0
    loop = sampler.loop(name, use_cfg, False, False)
    args = (loop_params, cond, cond, S((), jnp.float32, sharding=repl), S((batch,), jnp.uint32, sharding=bsh),
            S(lat, jnp.float32, sharding=bsh), None, place(state, repl))
    return {"sampler": sampler, "loop": loop, "args": args, "state": state, "scheduler": name, "use_cfg": use_cfg,
            "resolution": res, "latent_shape": lat, "cond": cond, "text_params": text_params}


def lower_sample_loop(model: str, *, batch: int = 1, steps: int = 30, scheduler: str | None = None,
                      guidance_scale: float = 7.5, resolution: int | None = None, dtype=jnp.float32, mesh=None):
    """`sample_loop_program`'s loop lowered on its abstract params and inputs:
    compile it for its compile time and cost analysis without holding the
    weights. Returns (lowered, state) with `state` the scheduler state it runs
    (`state.num_evals` U-Net evaluations)."""
    prog = sample_loop_program(model, batch=batch, steps=steps, scheduler=scheduler, guidance_scale=guidance_scale,
                               resolution=resolution, dtype=dtype, mesh=mesh)
    return prog["loop"].lower(*prog["args"]), prog["state"]
