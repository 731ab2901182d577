"""SDXL conditioning for the ldm trainer: both frozen text encoders and per-image time ids.

When the U-Net loaded by `model.init_from` is SDXL's (`addition_embed_type="text_time"`),
`t2i_jax.train.ldm` conditions it as diffusers' examples/text_to_image/train_text_to_image_sdxl.py
and the SDXL paper train it:

- context: the penultimate hidden states of both text encoders side by side, and
  `text_embeds`: the second encoder's projected pooled output (`t2i_jax.sdxl.encode_text`,
  the sampler's own function); caption dropout encodes "" with both, as diffusers'
  `proportion_empty_prompts` does (not the zeros of `force_zeros_for_empty_prompt`, which
  only the sampler's negative prompt uses);
- time ids per example: original size (height, width of the image before the resize),
  crop top-left (in the resized image, as the model sees it) and the target size
  (resolution, resolution), built by `t2i_jax.sdxl.time_ids`; the loader records the first
  two per image (`data.make_loader(size_conditioning=True)`), the cache computes them from
  its center crop.

Only the base is trained: the refiner's time ids end in an aesthetic score that captioned
data does not carry, so it is refused with a message (as are DreamBooth and text-encoder
LoRA, which the SD1 path alone implements).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from t2i_jax import sdxl as sdxl_lib
from t2i_jax.models import unet as unet_lib

__all__ = ["is_sdxl", "check", "num_time_ids", "example_time_ids", "batch_time_ids", "batch_keys",
           "stream_prepare", "encode", "empty_ids", "condition"]

# What the U-Net reads besides latents and timesteps, per example: the pooled embedding and time ids.
CACHED_KEYS = ("mean", "std", "context", "pooled", "time_ids")
STREAM_KEYS = ("image", "input_ids", "input_ids_2", "time_ids")


def is_sdxl(unet) -> bool:
    """True for an SDXL U-Net (the text-time addition embedding)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def check(config, parts) -> None:
    """ValueError for what SDXL training does not cover, naming the setting and the way out."""
    if parts.get("text_encoder") is None or parts.get("text_encoder_2") is None:
        raise ValueError(f"model.init_from {config.model.init_from!r} is an SDXL refiner (one text encoder, "
                         "aesthetic-score time ids); the trainer fine-tunes the SDXL base only: use "
                         "stabilityai/stable-diffusion-xl-base-1.0 or a folder of it")
    if config.dreambooth.enabled:
        raise ValueError("dreambooth.enabled with an SDXL model: DreamBooth is implemented for SD 1.x/2.x; "
                         "turn it off (dreambooth.enabled=False) or use an SD 1.x/2.x model")
    if "lora" in config and int(config.lora.rank) > 0 and config.lora.text_encoder_targets:
        raise ValueError(f"lora.text_encoder_targets {config.lora.text_encoder_targets!r} with an SDXL model: "
                         "LoRA on SDXL adapts the U-Net only; set lora.text_encoder_targets=''")


def num_time_ids(parts) -> int:
    """Time ids the U-Net takes (6 for the SDXL base)."""
    return unet_lib.text_time_sizes(parts["unet"].config, parts["text_encoder_2"].config.projection_dim)


def example_time_ids(original_size, crop_top_left, resolution: int, num_ids: int = 6) -> np.ndarray:
    """float32 [K]: original (h, w) + crop (top, left) + target (resolution, resolution)."""
    cond = sdxl_lib.Conditions(original_size=tuple(int(v) for v in original_size),
                               crops_coords_top_left=tuple(int(v) for v in crop_top_left),
                               target_size=(int(resolution), int(resolution)))
    return sdxl_lib.time_ids(cond, int(resolution), int(resolution), aesthetic=False, img2img=False,
                             num_ids=num_ids)[0]


def batch_time_ids(original_sizes, crops, resolution: int, num_ids: int = 6) -> np.ndarray:
    """float32 [B, K] from [B, 2] original sizes and [B, 2] crops (`example_time_ids` per row)."""
    return np.stack([example_time_ids(o, c, resolution, num_ids) for o, c in zip(original_sizes, crops)])


def batch_keys(cached: bool) -> tuple[str, ...]:
    """The host arrays of an SDXL train batch."""
    return CACHED_KEYS if cached else STREAM_KEYS


def stream_prepare(resolution: int, num_ids: int, extra_keys: tuple[str, ...] = ()):
    """`loop.fit`'s `prepare` for streamed SDXL batches: a loader batch (with `original_size`,
    `crop_top_left`) -> the step's arrays, time ids built on the prefetch thread."""
    def prepare(host: dict) -> dict:
        out = {k: host[k] for k in ("image", "input_ids", "input_ids_2", *extra_keys)}
        out["time_ids"] = batch_time_ids(host["original_size"], host["crop_top_left"], resolution, num_ids)
        return out
    return prepare


def encode(parts, frozen, ids, ids_2):
    """(context [B, L, D1 + D2], pooled [B, P]) of token ids, fp32."""
    ctx, pooled = sdxl_lib.encode_text(parts["text_encoder"], parts["text_encoder_2"], frozen["text_encoder"],
                                       frozen["text_encoder_2"], ids, ids_2)
    return ctx.astype(jnp.float32), pooled.astype(jnp.float32)


def empty_ids(parts) -> tuple[np.ndarray, np.ndarray]:
    """The "" caption's token ids for each tokenizer (the second pads with "!")."""
    return parts["tokenizer"]([""])[0], parts["tokenizer_2"]([""])[0]


def condition(parts, frozen, mb, *, cached: bool, empty, empty_pooled=None):
    """(context, added_cond_kwargs) of a micro-batch with its caption dropout (`mb["drop"]`) applied.

    Cached: `empty` / `empty_pooled` are the "" caption's states; streamed: `empty` is
    `empty_ids(parts)`, and both encoders run on the (dropped-out) ids."""
    drop = mb["drop"]
    if cached:
        ctx = jnp.where(drop[:, None, None], jnp.asarray(empty)[None].astype(mb["context"].dtype), mb["context"])
        pooled = jnp.where(drop[:, None], jnp.asarray(empty_pooled)[None].astype(mb["pooled"].dtype), mb["pooled"])
    else:
        ids = jnp.where(drop[:, None], jnp.asarray(empty[0])[None], mb["input_ids"])
        ids_2 = jnp.where(drop[:, None], jnp.asarray(empty[1])[None], mb["input_ids_2"])
        ctx, pooled = encode(parts, frozen, ids, ids_2)
    return ctx, {"text_embeds": pooled, "time_ids": mb["time_ids"].astype(jnp.float32)}
