"""The Stable Diffusion 1.x / 2.x / XL U-Net (diffusers UNet2DConditionModel), NHWC.

Module and parameter names follow diffusers (`conv_in`, `time_embedding`,
`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`...), so a
diffusers state dict maps onto the params with no key table.

    cfg = UNetConfig.named("sd15")
    unet = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    eps = unet.apply({"params": params}, latents_nhwc, t, text_states)

SDXL (`addition_embed_type="text_time"`) also takes the pooled text
embedding and the micro-conditioning time ids:

    eps = unet.apply({"params": params}, x, t, states,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from t2i_jax.models.layers import (
    Downsample2D,
    Dtype,
    GroupNorm,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    config_from_diffusers,
    config_to_diffusers,
    conv,
    dense,
)

CLASS_NAME = "UNet2DConditionModel"

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers UNet2DConditionModel fields we accept only at their default (the
# SD 1.x/2.x/XL value): class embeddings, other addition embeddings and time
# embeddings, dual or cross-only attention, other resnets... (Kandinsky, IF, ...).
_FIXED = {
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "num_attention_heads": None,  # diffusers itself rejects it for this class
    "act_fn": "silu",
    "dropout": 0.0,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet2DConditionModel; field names and defaults are diffusers'.

    A field missing from a `config.json` takes diffusers' default, as
    diffusers' own `from_pretrained` does.
    """

    # Latent side the checkpoint was trained at (64 for SD1.5, 96 for SD2.1-v);
    # informational, any size runs.
    sample_size: int | None = None
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted noise / v channels out
    center_input_sample: bool = False  # feed 2 * x - 1 instead of x
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin] instead of [sin, cos]
    freq_shift: int = 0  # frequencies exp(-ln(1e4) * i / (half - freq_shift))
    # One entry per resolution, highest first: "CrossAttnDownBlock2D" or "DownBlock2D".
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # or None: no middle block
    # Lowest resolution first: "UpBlock2D" or "CrossAttnUpBlock2D".
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks get one more)
    downsample_padding: int = 1  # 1: symmetric stride-2 conv; 0: pad bottom/right only
    mid_block_scale_factor: float = 1.0  # mid-block resnet outputs are divided by this
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # resnet / output GroupNorm eps (transformer norms use 1e-6)
    cross_attention_dim: int | tuple[int, ...] = 1280  # text-state width: 768 SD1, 1024 SD2
    # BasicTransformerBlocks per attention layer (int, or one per down block).
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # NUMBER OF HEADS per block (diffusers' historical misnomer): SD1 8 everywhere,
    # SD2 (5, 10, 20, 20); head size is then channels // heads.
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False  # transformer proj_in/out as Linear (SD2) or 1x1 conv (SD1)
    upcast_attention: bool = False  # attention in fp32 (SD2.1 768-v needs it in fp16)
    # SDXL: "text_time" adds add_embedding(concat(pooled text embedding,
    # sinusoidal embedding of each time id)) to the time embedding; None (SD1/SD2): nothing.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (256 in SDXL)
    # add_embedding's input width: pooled width + ids * addition_time_embed_dim
    # (SDXL base 1280 + 6 * 256 = 2816; the refiner's 5 ids, aesthetic score for two sizes: 2560).
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; block_out_channels has {n}")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"down block type {t!r} is not supported; use one of {_DOWN_TYPES}")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"up block type {t!r} is not supported; use one of {_UP_TYPES}")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"mid_block_type {self.mid_block_type!r} is not supported; use one of {_MID_TYPES}")
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                     "attention_head_dim"):
            v = getattr(self, name)
            if isinstance(v, tuple):
                if len(v) != n:
                    raise ValueError(f"{name} {v} has {len(v)} entries; block_out_channels has {n}")
                if name == "transformer_layers_per_block" and any(isinstance(x, tuple) for x in v):
                    raise ValueError("per-layer transformer_layers_per_block (SDXL-style) is not supported")
        for i, (ch, heads) in enumerate(zip(self.block_out_channels, self.per_block("attention_head_dim"))):
            if ch % heads:
                raise ValueError(f"block {i}: {ch} channels do not split into {heads} heads (attention_head_dim)")
            if ch % self.norm_num_groups:
                raise ValueError(f"block {i}: {ch} channels do not split into norm_num_groups={self.norm_num_groups}")

        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {self.addition_embed_type!r} is not supported; use None "
                             "(SD 1.x/2.x) or 'text_time' (SDXL)")
        if self.addition_embed_type == "text_time" and not (
                self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type 'text_time' needs addition_time_embed_dim (256 in SDXL) and "
                             "projection_class_embeddings_input_dim (2816 for SDXL base, 2560 for the refiner)")

    def per_block(self, name: str) -> tuple:
        """An int-or-tuple field as one value per down block."""
        v = getattr(self, name)
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config.json") -> UNetConfig:
        """Reads a diffusers UNet2DConditionModel `config.json` dict.

        Unknown fields, and known ones set to a variant we do not implement,
        raise ValueError naming the field and `source`.
        """
        return config_from_diffusers(cls, config, class_name=CLASS_NAME, source=source, fixed=_FIXED)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' `UNet2DConditionModel.from_pretrained` reads."""
        return config_to_diffusers(self, CLASS_NAME)

    @classmethod
    def named(cls, name: str) -> UNetConfig:
        """A named variant: "tiny" (tests, toy training), "sd15", "sd21" (768-v), "sdxl"
        (SDXL 1.0 base), "sdxl-refiner"."""
        if name not in _NAMED:
            raise ValueError(f"unknown U-Net variant {name!r}; choose one of {sorted(_NAMED)}")
        return cls(**_NAMED[name])


_NAMED: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
    ),
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(
        sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True, upcast_attention=True,
    ),
    "sdxl": dict(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    "sdxl-refiner": dict(
        sample_size=128, block_out_channels=(384, 768, 1536, 1536),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
    ),
}


# --------------------------------------------------------------------------
# Time embedding
# --------------------------------------------------------------------------


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
    """Sinusoidal embedding of [B] timesteps, fp32 [B, dim] (diffusers `get_timestep_embedding`)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """`linear_1` -> silu -> `linear_2` (the input width is the input's)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.silu(dense(self.dim, name="linear_1", dtype=self.dtype)(x))
        return dense(self.dim, name="linear_2", dtype=self.dtype)(x)


# --------------------------------------------------------------------------
# Blocks. All take (x, temb, context[, ...]) positionally so nn.remat can wrap
# them with one signature.
# --------------------------------------------------------------------------


class _Block(nn.Module):
    """Fields shared by the down/mid/up blocks."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    heads: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    def resnet(self, i: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, self.groups, self.eps, scale, dtype=self.dtype,
                             name=f"resnets_{i}")

    def transformer(self, i: int, channels: int) -> Transformer2DModel:
        return Transformer2DModel(self.heads, channels // self.heads, self.transformer_layers, self.groups,
                                  self.use_linear_projection, self.upcast_attention, self.attention_impl,
                                  dtype=self.dtype, name=f"attentions_{i}")


class DownBlock2D(_Block):
    """diffusers DownBlock2D, or CrossAttnDownBlock2D when `cross_attention` (a
    Transformer2DModel after each resnet). Resnets then an optional stride-2
    downsampler; returns (x, skips)."""

    add_downsample: bool = True
    downsample_padding: int = 1
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, temb, context):
        skips = ()
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.cross_attention:
                x = self.transformer(i, self.out_channels)(x, context)
            skips += (x,)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, True, self.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
            skips += (x,)
        return x, skips


class UNetMidBlock2DCrossAttn(_Block):
    """resnet, then (transformer, resnet) x num_layers."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet(0, self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(i, self.out_channels)(x, context)
            x = self.resnet(i + 1, self.output_scale_factor)(x, temb)
        return x


class UpBlock2D(_Block):
    """diffusers UpBlock2D, or CrossAttnUpBlock2D when `cross_attention`.

    Resnets over [x, skip] concatenations (last skip first), then an optional
    upsampler to `size` (the next skip's H, W)."""

    add_upsample: bool = True
    cross_attention: bool = False

    @nn.compact
    def __call__(self, x, skips, temb, context, size):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.cross_attention:
                x = self.transformer(i, self.out_channels)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, size)
        return x


# --------------------------------------------------------------------------
# The U-Net
# --------------------------------------------------------------------------


class UNet2DConditionModel(nn.Module):
    """Predicts noise (or v) from noisy latents, timesteps and text states.

    `dtype` is the compute dtype (bf16 on accelerators); params stay fp32 and
    norms/softmax run in fp32. `remat` recomputes each block's activations in
    the backward pass (training memory). `attention_impl`: None/"xla",
    "cudnn" or "auto" (cuDNN where it applies; `layers.dot_product_attention`).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, *, train: bool = False,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        """sample [B, H, W, in_channels]; timesteps scalar or [B]; encoder_hidden_states
        [B, L, cross_attention_dim]. Returns [B, H, W, out_channels] in fp32.

        `added_cond_kwargs` (SDXL, `addition_embed_type="text_time"`, required
        there): `{"text_embeds": [B, P] pooled text embedding, "time_ids": [B, K]}`
        with P + K * addition_time_embed_dim = projection_class_embeddings_input_dim
        (SDXL base: original size, crop top-left, target size, K = 6; the
        refiner: original size, crop, aesthetic score, K = 5), as diffusers.

        `down_block_additional_residuals` (one per skip connection, conv_in's
        first) and `mid_block_additional_residual` are a ControlNet's outputs,
        added to the skips and to the middle block's output as diffusers adds
        them; None (the default) leaves the U-Net as it is.

        `train` is accepted for the house signature; SD U-Nets use no dropout.
        """
        del train
        cfg = self.config
        b = sample.shape[0]
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))

        ch0 = cfg.block_out_channels[0]
        temb = timestep_embedding(t, ch0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = TimestepEmbedding(4 * ch0, dtype=self.dtype, name="time_embedding")(temb.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if added_cond_kwargs is None or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
                raise ValueError("this SDXL U-Net (addition_embed_type 'text_time') needs added_cond_kwargs="
                                 "{'text_embeds': pooled [B, P], 'time_ids': [B, K]}")
            ids = jnp.asarray(added_cond_kwargs["time_ids"])
            ids = jnp.broadcast_to(ids, (b, ids.shape[-1]))
            # Each id gets its own sinusoid, as diffusers' add_time_proj on the flattened ids.
            tid = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim,
                                     flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift).reshape(b, -1)
            pooled = jnp.asarray(added_cond_kwargs["text_embeds"]).astype(jnp.float32)
            add = jnp.concatenate([pooled, tid], axis=-1).astype(self.dtype)
            temb = temb + TimestepEmbedding(4 * ch0, dtype=self.dtype, name="add_embedding")(add)
        elif added_cond_kwargs is not None:
            raise ValueError("added_cond_kwargs were given, but this U-Net has no addition embedding "
                             "(addition_embed_type None: an SD 1.x/2.x model); drop them")

        x = conv(ch0, 3, name="conv_in", dtype=self.dtype)(x)

        wrap = nn.remat if self.remat else (lambda cls, **kw: cls)
        down_cls = wrap(DownBlock2D)
        mid_cls = wrap(UNetMidBlock2DCrossAttn)
        up_cls = wrap(UpBlock2D, static_argnums=(5,))
        heads = cfg.per_block("attention_head_dim")
        layers = cfg.per_block("layers_per_block")
        tlayers = cfg.per_block("transformer_layers_per_block")
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
                      upcast_attention=cfg.upcast_attention, attention_impl=self.attention_impl, dtype=self.dtype)
        n = len(cfg.block_out_channels)

        skips = (x,)
        for i, kind in enumerate(cfg.down_block_types):
            x, s = down_cls(cfg.block_out_channels[i], layers[i], heads=heads[i], transformer_layers=tlayers[i],
                            add_downsample=i < n - 1, downsample_padding=cfg.downsample_padding,
                            cross_attention=kind == "CrossAttnDownBlock2D", name=f"down_blocks_{i}",
                            **common)(x, temb, context)
            skips += s
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"got {len(down_block_additional_residuals)} down-block residuals for the "
                                 f"U-Net's {len(skips)} skip connections")
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals))

        if cfg.mid_block_type is not None:
            x = mid_cls(cfg.block_out_channels[-1], 1, heads=heads[-1], transformer_layers=tlayers[-1],
                        output_scale_factor=cfg.mid_block_scale_factor, name="mid_block", **common)(x, temb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        rev = lambda v: tuple(reversed(v))  # noqa: E731
        for i, kind in enumerate(cfg.up_block_types):
            nl = rev(layers)[i] + 1
            block_skips, skips = skips[-nl:], skips[:-nl]
            # Upsample to the next skip's size, so odd latent sizes work as in diffusers.
            size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            x = up_cls(rev(cfg.block_out_channels)[i], nl, heads=rev(heads)[i], transformer_layers=rev(tlayers)[i],
                       add_upsample=i < n - 1, cross_attention=kind == "CrossAttnUpBlock2D",
                       name=f"up_blocks_{i}", **common)(x, block_skips, temb, context, size)

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(x))
        x = conv(cfg.out_channels, 3, name="conv_out", dtype=self.dtype)(x)
        return x.astype(jnp.float32)


def text_time_sizes(config: UNetConfig, pooled_dim: int) -> int:
    """How many time ids an SDXL U-Net takes with a `pooled_dim`-wide pooled
    text embedding (6 for SDXL base, 5 for the refiner); ValueError when the
    widths do not add up."""
    extra = config.projection_class_embeddings_input_dim - pooled_dim
    if extra <= 0 or extra % config.addition_time_embed_dim:
        raise ValueError(f"projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim} "
                         f"is not the pooled width {pooled_dim} plus a whole number of time ids of "
                         f"addition_time_embed_dim {config.addition_time_embed_dim}; the text encoder and the "
                         "U-Net do not belong together")
    return extra // config.addition_time_embed_dim


def dummy_inputs(config: UNetConfig, batch: int = 1):
    """Small inputs for `init` / `jax.eval_shape` (shapes do not affect params).

    An SDXL U-Net gets a fourth, its `added_cond_kwargs` (one time id and the
    rest of add_embedding's input width as the pooled embedding: the widths
    are what init reads)."""
    side = 2 ** (len(config.block_out_channels) - 1)
    cross = config.per_block("cross_attention_dim")[0]
    out = (jnp.zeros((batch, side, side, config.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch, 1, cross), jnp.float32))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        out += ({"text_embeds": jnp.zeros((batch, pooled), jnp.float32),
                 "time_ids": jnp.zeros((batch, 1), jnp.float32)},)
    return out
