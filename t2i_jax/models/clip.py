"""CLIP in Flax Linen: text transformer, vision transformer, two-tower model.

Module and parameter names follow transformers (`text_model.encoder.layers_N
.self_attn.q_proj`, `vision_model.pre_layrnorm`, ...) so that
`t2i_jax.convert.core` maps every leaf to its PyTorch key mechanically.
Images are NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models import layers

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def _from_hf(cls, d: Mapping[str, Any]):
    """Builds a config dataclass from a transformers config dict.

    transformers configs carry many generic fields (dropout, torch_dtype,
    id2label, ...) that do not change the forward pass; only our fields are
    read. Values that we cannot run are rejected by `__post_init__`.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The CLIP text transformer (transformers' CLIPTextConfig fields)."""

    vocab_size: int = 49408  # BPE tokens incl. start/end
    hidden_size: int = 512  # width of the residual stream
    intermediate_size: int = 2048  # MLP width
    projection_dim: int = 512  # output of `text_projection`, when present
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # token positions (the tokenizer pads to this)
    hidden_act: str = "quick_gelu"  # OpenAI CLIP; OpenCLIP (SD2) uses "gelu"
    layer_norm_eps: float = 1e-5
    # Pooling reads the hidden state at the first `eos_token_id`. Configs from
    # before transformers PR #24773 say 2 there; for them transformers pools at
    # argmax(input_ids) (the end token has the largest id), and so do we.
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_act(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers `config.json` dict (CLIPTextConfig, or CLIPConfig's `text_config`)."""
        return _from_hf(cls, d)

    def to_hf(self) -> dict[str, Any]:
        """A transformers CLIPTextConfig dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The CLIP vision transformer (transformers' CLIPVisionConfig fields)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512  # output of `visual_projection`, when present
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # square input side; position embeddings are fixed to it
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_act(self.hidden_act)
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} {getattr(self, name)!r}: only square (int) sizes are supported")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a transformers `config.json` dict (CLIPVisionConfig, or CLIPConfig's `vision_config`)."""
        return _from_hf(cls, d)

    def to_hf(self) -> dict[str, Any]:
        """A transformers CLIPVisionConfig dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """The two-tower CLIP model."""

    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    # Width of the shared embedding; CLIPModel's projections use this value,
    # not the towers' own `projection_dim` (as in transformers).
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1/0.07), as in CLIP

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """From a transformers CLIPConfig `config.json` dict."""
        return cls(
            text=CLIPTextConfig.from_hf(d.get("text_config") or {}),
            vision=CLIPVisionConfig.from_hf(d.get("vision_config") or {}),
            projection_dim=d.get("projection_dim", 512),
            logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers CLIPConfig dict."""
        return {"text_config": self.text.to_hf(), "vision_config": self.vision.to_hf(),
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init_value}


def named_config(name: str) -> CLIPConfig:
    """Named variants: `tiny` (tests, demos), `vit-b-32`, `vit-l-14` (OpenAI CLIP;
    the text tower of `vit-l-14` is SD1.x's text encoder) and `sd2-text`
    (the OpenCLIP ViT-H text tower of SD2.x, penultimate layer kept: 23 layers)."""
    variants = {
        "tiny": CLIPConfig(
            text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4),
            vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=32, patch_size=8),
            projection_dim=32),
        "vit-b-32": CLIPConfig(),
        "vit-l-14": CLIPConfig(
            text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
            vision=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, patch_size=14),
            projection_dim=768),
        "sd2-text": CLIPConfig(
            text=CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                num_attention_heads=16, hidden_act="gelu"),
            projection_dim=512),
    }
    if name not in variants:
        raise ValueError(f"unknown CLIP variant {name!r}; choose one of {sorted(variants)}")
    return variants[name]


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, T, D], after the final layer norm
    pooler_output: jax.Array  # [B, D], hidden state at the end token
    # Embedding output, then each layer's output (before the final norm), as
    # transformers' `hidden_states`; filled when `output_hidden_states`.
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None  # [B, P] = text_projection(pooler_output)


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + patches, D], encoder output
    pooler_output: jax.Array  # [B, D], post_layernorm(class token)
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None  # [B, P] = visual_projection(pooler_output)


@flax.struct.dataclass
class CLIPOutput:
    logits_per_image: jax.Array  # [images, texts]
    logits_per_text: jax.Array  # [texts, images]
    text_embeds: jax.Array  # L2-normalised
    image_embeds: jax.Array  # L2-normalised
    text_model_output: CLIPTextOutput
    vision_model_output: CLIPVisionOutput


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------

_init = nn.initializers.normal(0.02)


def layer_norm(eps: float, name: str, dtype) -> nn.Module:
    """An nn.LayerNorm under transformers' name (params `NAME/scale`, `NAME/bias`).

    Flax computes the statistics in fp32 whatever `dtype` (the output dtype) is.
    """
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (`layers.dot_product_attention`, as the U-Net's and the VAE's)."""

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None  # None/"xla", "cudnn", or "auto" (see layers.dot_product_attention)

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        dense = functools.partial(nn.Dense, self.hidden_size, dtype=self.dtype, kernel_init=_init)
        q, k, v = (dense(name=n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        y = layers.dot_product_attention(q, k, v, self.num_heads, impl=self.attention_impl, mask=mask,
                                         is_causal=is_causal)
        return dense(name="out_proj")(y)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        c = self.config
        h = layer_norm(c.layer_norm_eps, "layer_norm1", self.dtype)(x)
        x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, self.attention_impl,
                              name="self_attn")(h, mask, is_causal)
        h = layer_norm(c.layer_norm_eps, "layer_norm2", self.dtype)(x)
        h = CLIPMLP(c, self.dtype, name="mlp")(h)
        return x + h


class CLIPMLP(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, kernel_init=_init, name="fc1")(x)
        x = ACTIVATIONS[c.hidden_act](x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=_init, name="fc2")(x)


class CLIPEncoder(nn.Module):
    """The stack of layers; returns the last output and, optionally, all of them."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False  # recompute each layer in the backward pass (training memory)

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False, output_hidden_states=False):
        layer_cls = nn.remat(CLIPEncoderLayer, static_argnums=(3,)) if self.remat else CLIPEncoderLayer
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, self.dtype, self.attention_impl, name=f"layers_{i}")(x, mask, is_causal)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


# --------------------------------------------------------------------------
# Towers
# --------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tok = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_init, name="token_embedding")
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_init,
                       name="position_embedding")
        # The tables are fp32 params; the residual stream runs in `dtype`.
        return (tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]).astype(self.dtype)


class CLIPTextTransformer(nn.Module):
    """Token + position embeddings, causal pre-LN encoder, final layer norm."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states=False) -> CLIPTextOutput:
        c = self.config
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"input_ids have {t} tokens; this text encoder takes at most "
                             f"{c.max_position_embeddings}")
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        mask = None
        if attention_mask is not None:  # padding: keys where the mask is 0 are not attended
            mask = attention_mask.astype(bool)[:, None, None, :]
        x, states = CLIPEncoder(c, self.dtype, self.attention_impl, self.remat, name="encoder")(
            x, mask, True, output_hidden_states)
        x = layer_norm(c.layer_norm_eps, "final_layer_norm", self.dtype)(x)
        if c.eos_token_id == 2:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = x[jnp.arange(b), eos_pos]
        return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=states)


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned position embeddings."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        b, h, w, _ = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"images are {h}x{w}; this vision tower takes {c.image_size}x{c.image_size} "
                             "(resize or center-crop them first)")
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    dtype=self.dtype, kernel_init=_init, name="patch_embedding")(pixel_values)
        x = x.reshape(b, -1, c.hidden_size)  # row-major patches, as torch's flatten(2)
        cls = self.param("class_embedding", _init, (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.hidden_size)), x], axis=1)
        pos = nn.Embed(c.num_patches + 1, c.hidden_size, embedding_init=_init, name="position_embedding")
        return (x + pos(jnp.arange(c.num_patches + 1))[None]).astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, pre-LN, encoder; pooled = post-LN of the class token."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values, *, output_hidden_states=False) -> CLIPVisionOutput:
        c = self.config
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values.astype(self.dtype))
        x = layer_norm(c.layer_norm_eps, "pre_layrnorm", self.dtype)(x)  # sic: transformers' name
        x, states = CLIPEncoder(c, self.dtype, self.attention_impl, self.remat, name="encoder")(
            x, None, False, output_hidden_states)
        pooled = layer_norm(c.layer_norm_eps, "post_layernorm", self.dtype)(x[:, 0])
        return CLIPVisionOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=states)


def _projection(dim: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(dim, use_bias=False, dtype=dtype, kernel_init=_init, name=name)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when
    `with_projection` (adds `text_projection` and `text_embeds`).

    Params: `{"text_model": ..., ["text_projection": ...]}`.
    """

    config: CLIPTextConfig
    with_projection: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states=False,
                 train=False) -> CLIPTextOutput:
        del train  # no dropout in CLIP
        out = CLIPTextTransformer(self.config, self.dtype, self.attention_impl, self.remat, name="text_model")(
            input_ids, attention_mask, output_hidden_states=output_hidden_states)
        if self.with_projection:
            embeds = _projection(self.config.projection_dim, "text_projection", self.dtype)(out.pooler_output)
            out = out.replace(text_embeds=embeds)
        return out


class CLIPVisionModel(nn.Module):
    """transformers' CLIPVisionModel, or CLIPVisionModelWithProjection when
    `with_projection`. Params: `{"vision_model": ..., ["visual_projection": ...]}`."""

    config: CLIPVisionConfig
    with_projection: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values, *, output_hidden_states=False, train=False) -> CLIPVisionOutput:
        del train
        out = CLIPVisionTransformer(self.config, self.dtype, self.attention_impl, self.remat,
                                    name="vision_model")(pixel_values, output_hidden_states=output_hidden_states)
        if self.with_projection:
            embeds = _projection(self.config.projection_dim, "visual_projection", self.dtype)(out.pooler_output)
            out = out.replace(image_embeds=embeds)
        return out


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """The two-tower CLIP with `logit_scale` (transformers' CLIPModel).

    `__call__` gives the similarity logits; `get_text_features` /
    `get_image_features` (via `apply(..., method=...)`) the projected,
    unnormalised embeddings.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text, self.dtype, self.attention_impl, self.remat)
        self.vision_model = CLIPVisionTransformer(c.vision, self.dtype, self.attention_impl, self.remat)
        self.text_projection = _projection(c.projection_dim, None, self.dtype)
        self.visual_projection = _projection(c.projection_dim, None, self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def encode_text(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        """Text tower output with `text_embeds` (projected, not normalised)."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))

    def encode_image(self, pixel_values, output_hidden_states=False) -> CLIPVisionOutput:
        """Vision tower output with `image_embeds` (projected, not normalised)."""
        out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        return out.replace(image_embeds=self.visual_projection(out.pooler_output))

    def get_text_features(self, input_ids, attention_mask=None):
        """Projected text embeddings [B, P]."""
        return self.encode_text(input_ids, attention_mask).text_embeds

    def get_image_features(self, pixel_values):
        """Projected image embeddings [B, P] (pixel_values NHWC)."""
        return self.encode_image(pixel_values).image_embeds

    def __call__(self, input_ids, pixel_values, attention_mask=None, *, output_hidden_states=False,
                 train=False) -> CLIPOutput:
        del train
        t = self.encode_text(input_ids, attention_mask, output_hidden_states)
        v = self.encode_image(pixel_values, output_hidden_states)
        text, image = _normalize(t.text_embeds), _normalize(v.image_embeds)
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale.astype(jnp.float32))
        return CLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                          text_embeds=text, image_embeds=image, text_model_output=t, vision_model_output=v)


def dummy_inputs(module: nn.Module) -> tuple:
    """Minimal inputs to `init` / `jax.eval_shape` a CLIP module."""
    def ids(c):
        return jnp.zeros((1, c.max_position_embeddings), jnp.int32)

    def img(c):
        return jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)

    if isinstance(module, CLIPTextModel):
        return (ids(module.config),)
    if isinstance(module, CLIPVisionModel):
        return (img(module.config),)
    return ids(module.config.text), img(module.config.vision)
