"""ControlNet for the SD 1.x / 2.x U-Net (diffusers ControlNetModel), NHWC.

A copy of the U-Net's down path and middle block that also reads a control
image (edges, depth, pose...) through a small conv stack, and returns one
residual per U-Net skip connection plus one for the middle block, each through
a zero-initialised 1x1 conv. The U-Net adds them where diffusers does
(`UNet2DConditionModel(..., down_block_additional_residuals=...,
mid_block_additional_residual=...)`).

Module and parameter names follow diffusers (`controlnet_cond_embedding/
conv_in`, `blocks_0`, `conv_out`; `down_blocks_0/...`, `mid_block`;
`controlnet_down_blocks_0`, `controlnet_mid_block`); the down and middle
blocks are the U-Net's own modules.

    cfg = ControlNetConfig.from_diffusers(json.load(open("config.json")))
    net = ControlNetModel(cfg)
    down, mid = net.apply({"params": params}, latents, t, text_states, control_image, 1.0)

`run_controlnets` is the per-step evaluation the sampling loop calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.models.layers import Dtype, config_from_diffusers, config_to_diffusers, conv
from t2i_jax.models.unet import (
    DownBlock2D,
    TimestepEmbedding,
    UNetConfig,
    UNetMidBlock2DCrossAttn,
    timestep_embedding,
)

CLASS_NAME = "ControlNetModel"

# diffusers ControlNetModel fields we accept only at their SD 1.x/2.x value.
_FIXED = {
    "only_cross_attention": False,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a ControlNetModel; field names and defaults are diffusers'."""

    in_channels: int = 4  # latent channels in
    conditioning_channels: int = 3  # control image channels
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280  # text-state width: 768 SD1, 1024 SD2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # head COUNT, as in UNetConfig
    # diffusers' ControlNet takes the head count from here when set (else from attention_head_dim).
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr" flips the control image's channels
    # The control image encoder: one stride-2 conv per entry after the first, so
    # the image is 2 ** (len - 1) times the latents' side (8 for SD).
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    # Residuals averaged over space (the v1.1 "shuffle" net); implies guess mode.
    global_pool_conditions: bool = False

    def __post_init__(self):
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"ControlNet mid_block_type {self.mid_block_type!r} is not supported; "
                             "use 'UNetMidBlock2DCrossAttn' (SD 1.x/2.x)")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order "
                             f"{self.controlnet_conditioning_channel_order!r} is not 'rgb' or 'bgr'")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim!r}: a ControlNet takes one width")
        self.unet_config()  # validates the shared fields

    @property
    def downsample_factor(self) -> int:
        """How many times larger the control image's side is than the latents'."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def unet_config(self) -> UNetConfig:
        """The UNetConfig whose down path and middle block this ControlNet copies."""
        heads = self.attention_head_dim if self.num_attention_heads is None else self.num_attention_heads
        up = tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                   for t in reversed(self.down_block_types))
        return UNetConfig(
            in_channels=self.in_channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            down_block_types=self.down_block_types, up_block_types=up, block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block, downsample_padding=self.downsample_padding,
            mid_block_scale_factor=self.mid_block_scale_factor, norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps, cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block, attention_head_dim=heads,
            use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config.json") -> ControlNetConfig:
        """Reads a diffusers ControlNetModel `config.json` dict (unknown or
        unsupported fields raise ValueError naming the field and `source`)."""
        return config_from_diffusers(cls, config, class_name=CLASS_NAME, source=source, fixed=_FIXED)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' `ControlNetModel.from_pretrained` reads."""
        return config_to_diffusers(self, CLASS_NAME)


def check_fits(config: ControlNetConfig, unet: UNetConfig, vae_scale: int, name: str = "ControlNet",
               latent_channels: int | None = None) -> None:
    """Raises a ValueError when a ControlNet cannot steer this U-Net: its text
    width, its residuals' channels or count, its latent channels, or its
    control-image downsampling differ from the model's. `latent_channels`:
    the VAE's (default: the U-Net's input channels); a ControlNet reads the
    latents alone, also beside a 9-channel inpainting U-Net, as diffusers'
    ControlNet inpainting pipeline does."""
    cross = unet.per_block("cross_attention_dim")[0]
    if config.cross_attention_dim != cross:
        raise ValueError(
            f"{name} has cross_attention_dim {config.cross_attention_dim}, the model's U-Net {cross} (its text "
            f"encoder's width: 768 for SD 1.x, 1024 for SD 2.x); use a ControlNet trained for this model's family")
    latent = unet.in_channels if latent_channels is None else latent_channels
    mine = (config.block_out_channels, config.layers_per_block, config.in_channels)
    theirs = (unet.block_out_channels, unet.layers_per_block, latent)
    if mine != theirs:
        raise ValueError(
            f"{name} has block_out_channels {config.block_out_channels}, layers_per_block {config.layers_per_block}, "
            f"in_channels {config.in_channels}; the model's U-Net {unet.block_out_channels}, "
            f"{unet.layers_per_block}, latent channels {latent}: its residuals do not fit the U-Net's skip "
            "connections. Use a ControlNet made for this base model")
    if config.downsample_factor != vae_scale:
        raise ValueError(
            f"{name} reads control images {config.downsample_factor}x the latent size "
            f"(conditioning_embedding_out_channels {config.conditioning_embedding_out_channels}), but this "
            f"model's VAE downsamples by {vae_scale}; use a ControlNet made for this base model")


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in -> silu -> (conv, silu, stride-2 conv, silu) per level -> conv_out."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ch = self.block_out_channels
        x = nn.silu(conv(ch[0], 3, name="conv_in", dtype=self.dtype)(x))
        for i in range(len(ch) - 1):
            x = nn.silu(conv(ch[i], 3, name=f"blocks_{2 * i}", dtype=self.dtype)(x))
            x = nn.silu(conv(ch[i + 1], 3, stride=2, name=f"blocks_{2 * i + 1}", dtype=self.dtype)(x))
        return conv(self.out_channels, 3, name="conv_out", dtype=self.dtype)(x)


def guess_mode_scales(n: int) -> np.ndarray:
    """diffusers' guess-mode residual weights: `logspace(-1, 0, n)` in fp32,
    0.1 for the first (highest-resolution) residual up to 1.0 for the middle block."""
    return np.logspace(-1.0, 0.0, n, dtype=np.float64).astype(np.float32)


class ControlNetModel(nn.Module):
    """Down-block and mid-block residuals for the U-Net from a control image.

    `dtype` is the compute dtype; params stay fp32, norms and softmax in fp32.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode: bool = False, cond_embedding=None):
        """sample [B, h, w, in_channels]; timesteps scalar or [B]; encoder_hidden_states [B, L, D];
        controlnet_cond [B, h * f, w * f, conditioning_channels] in [0, 1] (f = `downsample_factor`);
        `conditioning_scale` a scalar (traced or not) multiplying every residual. `guess_mode`
        (static) weights the residuals by `guess_mode_scales` too. `cond_embedding`: the control
        image's embedding [B, h, w, C0] from `embed_cond` (then `controlnet_cond` is not read), for a
        loop that embeds its fixed control image once instead of at every step. Returns (down
        residuals tuple, mid residual) in the compute dtype, shaped like the U-Net's skips and
        middle-block output.
        """
        cfg = self.config
        ucfg = cfg.unet_config()
        b = sample.shape[0]
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))

        ch0 = cfg.block_out_channels[0]
        temb = timestep_embedding(t, ch0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = TimestepEmbedding(4 * ch0, dtype=self.dtype, name="time_embedding")(temb.astype(self.dtype))

        x = conv(ch0, 3, name="conv_in", dtype=self.dtype)(x)
        if cond_embedding is None:
            cond_embedding = _cond_embedder(cfg, self.dtype, "controlnet_cond_embedding")(
                _cond_input(cfg, controlnet_cond, self.dtype))
        x = x + cond_embedding.astype(self.dtype)

        heads = ucfg.per_block("attention_head_dim")
        tlayers = ucfg.per_block("transformer_layers_per_block")
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
                      upcast_attention=cfg.upcast_attention, attention_impl=self.attention_impl, dtype=self.dtype)
        n = len(cfg.block_out_channels)
        skips = (x,)
        for i, kind in enumerate(cfg.down_block_types):
            x, s = DownBlock2D(cfg.block_out_channels[i], cfg.layers_per_block, heads=heads[i],
                               transformer_layers=tlayers[i], add_downsample=i < n - 1,
                               downsample_padding=cfg.downsample_padding,
                               cross_attention=kind == "CrossAttnDownBlock2D", name=f"down_blocks_{i}",
                               **common)(x, temb, context)
            skips += s
        x = UNetMidBlock2DCrossAttn(cfg.block_out_channels[-1], 1, heads=heads[-1], transformer_layers=tlayers[-1],
                                    output_scale_factor=cfg.mid_block_scale_factor, name="mid_block",
                                    **common)(x, temb, context)

        down = [conv(s.shape[-1], 1, name=f"controlnet_down_blocks_{j}", dtype=self.dtype)(s)
                for j, s in enumerate(skips)]
        mid = conv(x.shape[-1], 1, name="controlnet_mid_block", dtype=self.dtype)(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.asarray(guess_mode_scales(len(down) + 1)) * scale
            down = [d * scales[j].astype(d.dtype) for j, d in enumerate(down)]
            mid = mid * scales[-1].astype(mid.dtype)
        else:
            down = [d * scale.astype(d.dtype) for d in down]
            mid = mid * scale.astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return tuple(down), mid



def _cond_embedder(config: ControlNetConfig, dtype, name: str | None = None) -> ControlNetConditioningEmbedding:
    return ControlNetConditioningEmbedding(config.block_out_channels[0], config.conditioning_embedding_out_channels,
                                           dtype=dtype, name=name)


def _cond_input(config: ControlNetConfig, controlnet_cond, dtype):
    cond = controlnet_cond.astype(dtype)
    return cond[..., ::-1] if config.controlnet_conditioning_channel_order == "bgr" else cond


def embed_cond(net: ControlNetModel, params, controlnet_cond):
    """The control image's embedding alone (what `ControlNetModel` adds to its `conv_in` output), for its
    `cond_embedding=`: it does not depend on the step, so a sampling loop computes it once."""
    return _cond_embedder(net.config, net.dtype).apply({"params": params["controlnet_cond_embedding"]},
                                                       _cond_input(net.config, controlnet_cond, net.dtype))


def dummy_inputs(config: ControlNetConfig, batch: int = 1):
    """Small inputs for `init` / `jax.eval_shape`."""
    side = 2 ** (len(config.block_out_channels) - 1)
    f = config.downsample_factor
    return (jnp.zeros((batch, side, side, config.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, config.cross_attention_dim), jnp.float32),
            jnp.zeros((batch, side * f, side * f, config.conditioning_channels), jnp.float32))


# --------------------------------------------------------------------------
# The per-step evaluation inside the sampling loop
# --------------------------------------------------------------------------


@flax.struct.dataclass
class Control:
    """The ControlNet inputs of one sampling call, a pytree for the jitted loop.

    `images`: one [n, H, W, C] array in [0, 1] per net (not duplicated for
    guidance); `scales`: [nets] float32 `controlnet_conditioning_scale`;
    `keep`: [num_evals, nets] float32, 1 where evaluation i lies inside the
    net's control guidance start/end (diffusers' `controlnet_keep`). The
    modules and `guess_mode` are static (part of the tree structure, so they
    select the compiled program).
    """

    images: tuple
    scales: jax.Array
    keep: jax.Array
    nets: tuple = flax.struct.field(pytree_node=False, default=())
    guess_mode: bool = flax.struct.field(pytree_node=False, default=False)


def keep_mask(num_evals: int, starts: Sequence[float], ends: Sequence[float]) -> np.ndarray:
    """[num_evals, nets] float32: diffusers' `controlnet_keep`, indexed like its
    loop over `timesteps` (one entry per model evaluation, so Heun's 2n - 1
    evaluations are counted as diffusers counts them)."""
    n = num_evals
    return np.array([[1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(starts, ends)]
                     for i in range(n)], np.float32).reshape(n, len(starts))


def embed_images(control: Control, params: Sequence, *, use_cfg: bool, interleave) -> tuple:
    """Each net's control-image embedding (`embed_cond`), in the layout its nets read at every step:
    both guidance halves (interleaved) under guidance, unless guess mode runs the nets on the conditional
    half alone. Computed once, before the loop: it does not depend on the step."""
    both = use_cfg and not control.guess_mode
    embeds = (embed_cond(net, p, image) for net, p, image in zip(control.nets, params, control.images))
    return tuple(interleave(e, e) if both else e for e in embeds)


def run_controlnets(control: Control, params: Sequence, embeds: Sequence, sample, xin, t, context, i, *,
                    use_cfg: bool, split, interleave) -> dict:
    """The U-Net's residual keyword arguments for evaluation `i`: every net's
    residuals, scaled by its scale times its keep flag, summed (diffusers'
    MultiControlNetModel).

    `embeds`: `embed_images`' control-image embeddings. `sample`: the scaled
    model input of one guidance half [n, ...]; `xin` the U-Net's input
    ([2n, ...] interleaved under guidance), `t` its timesteps, `context` its
    text states. In guess mode under guidance the nets see only the
    conditional half and the unconditional rows get zero residuals, as in
    diffusers. `interleave`/`split` are the pipeline's guidance layout helpers.
    """
    guess = control.guess_mode and use_cfg
    # The conditional rows by the guidance layout (not a slice of the first n
    # rows, which would live on other devices once the batch is split).
    x_in, tt, ctx = (sample.astype(xin.dtype), split(t)[1], split(context)[1]) if guess else (xin, t, context)
    down, mid = None, None
    for k, (net, p, emb) in enumerate(zip(control.nets, params, embeds)):
        scale = control.scales[k] * control.keep[i, k]
        d, m = net.apply({"params": p}, x_in, tt, ctx, None, scale, guess_mode=control.guess_mode,
                         cond_embedding=emb)
        down = d if down is None else tuple(a + b for a, b in zip(down, d))
        mid = m if mid is None else mid + m
    if guess:
        down = tuple(interleave(jnp.zeros_like(a), a) for a in down)
        mid = interleave(jnp.zeros_like(mid), mid)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
