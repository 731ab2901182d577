"""The Stable Diffusion VAE (diffusers AutoencoderKL), NHWC.

Images in [-1, 1] -> `encode` -> a diagonal Gaussian over latents (8x
smaller per side for SD) -> `decode` back to images. Latents fed to the
U-Net are `sample * scaling_factor` (minus `shift_factor` first, if set).

    vae = AutoencoderKL(VAEConfig.named("sd"))
    posterior = vae.apply({"params": params}, images, method="encode")
    z = posterior.sample(rng) * vae.config.scaling_factor
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from t2i_jax.models.layers import (
    Downsample2D,
    Dtype,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    config_from_diffusers,
    config_to_diffusers,
    conv,
    dense,
    dot_product_attention,
)

CLASS_NAME = "AutoencoderKL"

# AutoencoderKL fields we accept only at diffusers' default (SD VAE value).
_FIXED = {
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL; field names and defaults are diffusers'."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    # One per resolution; only the plain encoder/decoder blocks exist for this VAE.
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)  # SD: (128, 256, 512, 512)
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks get one more); SD: 2
    latent_channels: int = 4
    norm_num_groups: int = 32  # GroupNorm groups (eps is 1e-6 throughout)
    sample_size: int = 32  # image side it was trained at; informational
    scaling_factor: float = 0.18215  # latents for the U-Net are z * scaling_factor
    shift_factor: float | None = None  # if set, latents are (z - shift) * scaling_factor
    force_upcast: bool = True  # diffusers' hint to run this VAE in fp32 (fp16 overflows)
    use_quant_conv: bool = True  # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # self-attention in the encoder/decoder middle blocks

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"down_block_types {self.down_block_types}: expected {n} x 'DownEncoderBlock2D'")
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"up_block_types {self.up_block_types}: expected {n} x 'UpDecoderBlock2D'")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"{ch} channels do not split into norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config.json") -> VAEConfig:
        """Reads a diffusers AutoencoderKL `config.json` dict (errors name unknown fields)."""
        return config_from_diffusers(cls, config, class_name=CLASS_NAME, source=source, fixed=_FIXED)

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict diffusers' `AutoencoderKL.from_pretrained` reads."""
        return config_to_diffusers(self, CLASS_NAME)

    @classmethod
    def named(cls, name: str) -> VAEConfig:
        """A named variant: "tiny" (tests, toy training) or "sd" (SD 1.x/2.x)."""
        if name not in _NAMED:
            raise ValueError(f"unknown VAE variant {name!r}; choose one of {sorted(_NAMED)}")
        return cls(**_NAMED[name])


_NAMED: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                 sample_size=32),
    "sd": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
               sample_size=512),
}


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (NHWC)."""

    mean: jax.Array
    logvar: jax.Array  # clipped to [-30, 20] like diffusers

    @classmethod
    def from_moments(cls, moments) -> DiagonalGaussian:
        """Splits the encoder output [..., 2 * latent] into mean and (clipped) logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        """Standard deviation exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        """Variance exp(logvar)."""
        return jnp.exp(self.logvar)

    def sample(self, rng):
        """mean + std * N(0, 1) noise from `rng`."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self):
        """The most likely latent: the mean."""
        return self.mean

    def kl(self):
        """KL to N(0, I), summed over H, W, C: [B]."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class VAEAttention(nn.Module):
    """The single-head spatial self-attention of the VAE mid block.

    diffusers keeps `group_norm` inside this Attention; the projections carry
    biases; the output is added to the input.
    """

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        t = GroupNorm(self.groups, 1e-6, name="group_norm")(x).reshape(b, h * w, c)
        q, k, v = (dense(c, name=n, dtype=self.dtype)(t) for n in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v, 1)
        out = dense(c, name="to_out_0", dtype=self.dtype)(out)
        return x + out.reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet, no time embedding."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """Resnets, then the VAE's asymmetric-padding stride-2 downsampler."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, True, 0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets, then a nearest x2 + conv upsampler."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (mean, logvar)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        g, chans = cfg.norm_num_groups, cfg.block_out_channels
        x = conv(chans[0], 3, name="conv_in", dtype=self.dtype)(x)
        for i, ch in enumerate(chans):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, g, i < len(chans) - 1, dtype=self.dtype,
                                   name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(chans[-1], g, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        x = nn.silu(GroupNorm(g, 1e-6, name="conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, name="conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
    """Latents [B, h, w, latent] -> image [B, h*f, w*f, out]."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        g, chans = cfg.norm_num_groups, tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, name="conv_in", dtype=self.dtype)(z)
        x = UNetMidBlock2D(chans[0], g, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, g, i < len(chans) - 1, dtype=self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(g, 1e-6, name="conv_norm_out")(x))
        return conv(cfg.out_channels, 3, name="conv_out", dtype=self.dtype)(x)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of Stable Diffusion.

    `dtype` is the compute dtype; params stay fp32, GroupNorm and softmax run
    in fp32. SD's VAE overflows in fp16 (`force_upcast`); bf16 is fine.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, name="quant_conv", dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, name="post_quant_conv", dtype=self.dtype)

    def encode(self, x) -> DiagonalGaussian:
        """Images [B, H, W, C] in [-1, 1] -> posterior over latents (fp32)."""
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z):
        """Latents [B, h, w, latent] (unscaled: divide by scaling_factor first) -> images, fp32."""
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x, *, sample_posterior: bool = False, rng=None, train: bool = False):
        """Reconstructs `x`; with `sample_posterior`, decodes a sample of the posterior
        drawn with `rng` (default: the module's "sample" rng stream) instead of its
        mean. Returns (reconstruction, posterior)."""
        del train
        posterior = self.encode(x)
        if sample_posterior:
            z = posterior.sample(self.make_rng("sample") if rng is None else rng)
        else:
            z = posterior.mode()
        return self.decode(z), posterior
