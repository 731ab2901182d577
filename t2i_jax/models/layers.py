"""Blocks shared by the VAE and the U-Net, named as in diffusers.

Every module and parameter carries the diffusers name (`norm1`, `conv1`,
`time_emb_proj`, `to_q`, `to_out_0`, `ff/net_0/proj`...), so that
`t2i_jax.convert.core.flax_path_to_torch_key` maps each Flax leaf to its
diffusers key with no table. Layout is NHWC for images and [B, L, C] for
token sequences.

Precision: params are created in fp32; `dtype` is the compute dtype (bf16 on
accelerators). Group/layer norms always compute their statistics in fp32 and
attention scores and softmax run in fp32 (see `dot_product_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# --------------------------------------------------------------------------
# Config parsing (diffusers `config.json` -> our dataclasses)
# --------------------------------------------------------------------------

# Bookkeeping keys diffusers writes into every config.json.
_DIFFUSERS_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def config_from_diffusers(cls, config: Mapping[str, Any], *, class_name: str, source: str,
                          fixed: Mapping[str, Any] = (), ignored: Sequence[str] = ()):
    """Builds the config dataclass `cls` from a diffusers `config.json` dict.

    Fields of `cls` are read (lists become tuples). A diffusers field in
    `fixed` is accepted only with the one value we implement (diffusers'
    default); `ignored` fields are accepted with any value. Anything else is
    an error naming the field, its value and `source` (the file). A config
    whose `_class_name` is not `class_name` is rejected: it describes another
    architecture.
    """
    found = config.get("_class_name")
    if found is not None and found != class_name:
        raise ValueError(
            f"{source} describes a {found}, not a {class_name}; point the loader at the folder "
            f"that holds the {class_name} (in a pipeline folder, its subfolder)"
        )
    if found is None and ("architectures" in config or "model_type" in config):
        what = config.get("architectures") or config.get("model_type")
        raise ValueError(f"{source} is a transformers config ({what}), not a diffusers {class_name}")
    names = {f.name for f in dataclasses.fields(cls)}
    fixed = dict(fixed)
    kwargs = {}
    for key, value in config.items():
        if key in _DIFFUSERS_META or key in ignored:
            continue
        if key in names:
            kwargs[key] = _tuplify(value)
        elif key in fixed:
            if _tuplify(value) != fixed[key]:
                raise ValueError(
                    f"{source}: field {key!r} = {value!r} is not supported by t2i_jax's {class_name} "
                    f"(only {fixed[key]!r}, the Stable Diffusion 1.x/2.x setting). This checkpoint uses an "
                    f"architecture variant we do not implement; set {key!r} to {fixed[key]!r} only if the "
                    f"weights were trained that way"
                )
        else:
            raise ValueError(
                f"{source}: unknown field {key!r} (= {value!r}) for a {class_name}. "
                f"If the file was edited by hand, remove or fix {key!r}; if it comes from a newer "
                f"diffusers, the feature is not implemented in t2i_jax"
            )
    return cls(**kwargs)


def _tuplify(v):
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


def config_to_diffusers(config, class_name: str) -> dict[str, Any]:
    """The diffusers `config.json` dict for one of our config dataclasses."""

    def listify(v):
        return [listify(x) for x in v] if isinstance(v, tuple) else v

    out = {"_class_name": class_name, "_diffusers_version": "0.36.0"}
    for f in dataclasses.fields(config):
        out[f.name] = listify(getattr(config, f.name))
    return out


# --------------------------------------------------------------------------
# Norms, conv, resize
# --------------------------------------------------------------------------


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the channel (last) axis, statistics in fp32.

    Works for [B, H, W, C] and [B, L, C]; returns the input dtype. Params
    `scale`, `bias` (torch `weight`, `bias`).
    """

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm {self.name}: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        h = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)
        mean = h.mean(axes, keepdims=True)
        var = jnp.square(h - mean).mean(axes, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (h * scale + bias).astype(x.dtype)


def layer_norm(name: str, epsilon: float = 1e-5) -> nn.Module:
    """nn.LayerNorm computing in fp32 (cast back by the caller), torch's eps default."""
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, *, name: str, dtype: Dtype, stride: int = 1, padding=None) -> nn.Conv:
    """A torch-style Conv2d (`padding` default: kernel // 2 on every side)."""
    if padding is None:
        padding = kernel // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, *, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A torch-style Linear."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def nearest_resize(x, size: tuple[int, int]):
    """torch `F.interpolate(mode="nearest")` of NHWC `x` to spatial `size`."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    # torch picks source index floor(dst * in / out), computed in fp32.
    iy = np.minimum(np.floor(np.arange(size[0], dtype=np.float32) * np.float32(h / size[0])), h - 1)
    ix = np.minimum(np.floor(np.arange(size[1], dtype=np.float32) * np.float32(w / size[1])), w - 1)
    return x[:, iy.astype(np.int32)][:, :, ix.astype(np.int32)]


# --------------------------------------------------------------------------
# Resnet, down/upsampling
# --------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D ("default" time-embedding norm, SiLU, pre-norm).

    norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> silu ->
    conv2, plus the input (through a 1x1 `conv_shortcut` when the channel
    count changes), divided by `output_scale_factor`. With `temb=None` (the
    VAE) there is no `time_emb_proj`.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1")(x))
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = dense(self.out_channels, name="time_emb_proj", dtype=self.dtype)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2")(h))
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Halves H and W: 3x3 stride-2 `conv`, or 2x2 average pooling.

    `padding=0` is diffusers' VAE form: pad one pixel at the bottom and right
    only (asymmetric), then convolve unpadded.
    """

    out_channels: int
    use_conv: bool = True
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.use_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(self.out_channels, 3, stride=2, padding=pad, name="conv", dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`), then a 3x3 `conv`."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: tuple[int, int] | None = None):
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
        x = nearest_resize(x, size)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype)(x)


# --------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------


ATTENTION_IMPLS = (None, "xla", "cudnn", "auto")


def cudnn_attention_unsupported(head_dim: int, dtype, *, platform: str, compute_capability: str | None,
                                masked: bool = False) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None if it can.

    The rules are those `jax.nn.dot_product_attention(implementation="cudnn")`
    checks for bf16/fp16 inputs: an NVIDIA GPU, a head size that is a multiple
    of 8 and at most 256 on Hopper or later (compute capability 9.0+), 128
    before. An explicit mask is left to XLA (SD's models pass none: CLIP's
    text mask is `is_causal`).
    """
    if platform not in ("gpu", "cuda"):
        return f"platform {platform!r} is not an NVIDIA GPU"
    if compute_capability is None:
        return "the GPU reports no CUDA compute capability (not an NVIDIA GPU?)"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"compute dtype {jnp.dtype(dtype).name} is not bf16/fp16"
    try:
        hopper = compute_capability is not None and float(compute_capability) >= 9.0
    except ValueError:
        hopper = False
    limit = 256 if hopper else 128
    if head_dim % 8 or head_dim > limit:
        return f"head size {head_dim} is not a multiple of 8 up to {limit} (compute capability {compute_capability})"
    if masked:
        return "an explicit attention mask"
    return None


def resolve_attention_impl(impl: str | None, head_dim: int, dtype, masked: bool = False) -> str | None:
    """`impl` for one attention call: None (XLA) or "cudnn".

    "auto" picks cuDNN flash attention where `cudnn_attention_unsupported`
    finds nothing against it on the default device, else XLA; so one setting
    serves an H100 (SD1.5's head sizes 40/80/160 all go to cuDNN), an A100
    (160 goes to XLA) and a CPU or TPU (XLA everywhere).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of None, 'xla', 'cudnn', 'auto'")
    if impl in (None, "xla"):
        return None
    if impl == "cudnn":
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"attention_impl='cudnn' needs bf16 or fp16 compute, got {jnp.dtype(dtype).name}; "
                "set dtype=jnp.bfloat16, or use attention_impl='auto' (cuDNN where it applies) or None"
            )
        return "cudnn"
    return None if why_not_cudnn_here(head_dim, dtype, masked) else "cudnn"


def why_not_cudnn_here(head_dim: int, dtype, masked: bool = False) -> str | None:
    """`cudnn_attention_unsupported` for the default device."""
    dev = jax.devices()[0]
    return cudnn_attention_unsupported(head_dim, dtype, platform=dev.platform,
                                       compute_capability=getattr(dev, "compute_capability", None), masked=masked)


CHUNKED = "chunked"
DEFAULT_QUERY_CHUNK = 1024


def query_chunk_size(impl: str | None) -> int | None:
    """The query chunk of a chunked `impl` ("chunked": 1024 queries, "chunked:N": N), else None.

    Chunked attention is exact (every chunk's softmax sees all the keys); it
    bounds the fp32 score memory to chunk x keys per head, forward and
    backward (each chunk is recomputed in the backward), on any platform.
    """
    if not isinstance(impl, str) or not (impl == CHUNKED or impl.startswith(CHUNKED + ":")):
        return None
    if impl == CHUNKED:
        return DEFAULT_QUERY_CHUNK
    size = impl[len(CHUNKED) + 1:]
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"attention_impl {impl!r}: the query chunk after 'chunked:' must be a positive integer "
                         f"(e.g. 'chunked:512'), or use 'chunked' for {DEFAULT_QUERY_CHUNK}")
    return int(size)


def dot_product_attention(q, k, v, num_heads: int, *, impl: str | None = None, upcast: bool = False,
                          mask=None, is_causal: bool = False, scale: float | None = None):
    """Multi-head attention on [B, L, heads * head_dim] projections (the U-Net's, the VAE's and CLIP's).

    Runs `jax.nn.dot_product_attention`, whose XLA path computes scores and
    softmax in fp32 for bf16 inputs. `impl`: None/"xla"; "cudnn" (flash
    attention on NVIDIA GPUs; needs bf16/fp16 inputs and a supported head
    size, else jax raises); "auto" (cuDNN where it applies, XLA elsewhere;
    see `resolve_attention_impl`); or "chunked" / "chunked:N" (the XLA path
    over query chunks of N, default 1024, each rematerialised in the
    backward: exact, and the scores held at once are N x keys per head; see
    `query_chunk_size`). `upcast` (diffusers' `upcast_attention`,
    SD 2.1) also runs the q.k product of the XLA path from fp32 inputs; cuDNN
    accumulates in fp32 by itself. `mask` (bool, broadcastable to
    [B, heads, T, S]; False: not attended), `is_causal` and `scale` (None:
    1 / sqrt(head_dim)) are `jax.nn.dot_product_attention`'s.
    """
    dtype = q.dtype
    b, t, d = q.shape
    s = k.shape[1]
    chunk = query_chunk_size(impl)
    impl = None if chunk else resolve_attention_impl(impl, d // num_heads, dtype, masked=mask is not None)
    q = q.reshape(b, t, num_heads, d // num_heads)
    k = k.reshape(b, s, num_heads, d // num_heads)
    v = v.reshape(b, s, num_heads, d // num_heads)
    if upcast and impl is None:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if chunk and t > chunk:
        out = _chunked_attention(q, k, v, chunk, mask=mask, is_causal=is_causal, scale=scale)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                           implementation=impl)
    return out.reshape(b, t, d).astype(dtype)


def _chunked_attention(q, k, v, chunk: int, *, mask, is_causal: bool, scale):
    """XLA attention of [B, T, H, D] queries in T / chunk sequential chunks (the last zero-padded).

    A `lax.map` keeps the chunks sequential (XLA cannot fuse them back into
    one T x S score tensor), and `jax.checkpoint` on the chunk makes the
    backward save only its inputs and recompute its scores.
    """
    b, t, h, dh = q.shape
    s = k.shape[1]
    n = -(-t // chunk)
    pad = n * chunk - t
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, dh).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    per_query_mask = mask is not None and mask.shape[2] != 1
    if per_query_mask:  # the mask's query axis is chunked with the queries
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (t, s))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        masks = mask.reshape(mask.shape[:2] + (n, chunk, s)).transpose(2, 0, 1, 3, 4)
    else:
        masks = jnp.zeros((n,), jnp.bool_)  # a placeholder the body ignores

    @jax.checkpoint
    def one(args):
        i, qc, mc = args
        m = mc if per_query_mask else mask
        if is_causal:  # query i * chunk + r attends keys 0 .. i * chunk + r
            rows = i * chunk + jnp.arange(chunk)[:, None]
            causal = (rows >= jnp.arange(s)[None, :])[None, None]
            m = causal if m is None else m & causal
        return jax.nn.dot_product_attention(qc, k, v, mask=m, scale=scale)

    out = jax.lax.map(one, (jnp.arange(n), qs, masks))
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, dh)[:, :t]


class Attention(nn.Module):
    """diffusers `Attention` as used by BasicTransformerBlock.

    Self-attention when `context` is None, else cross-attention to it. `to_q`,
    `to_k`, `to_v` (no bias unless `qkv_bias`), `to_out_0` (with bias).
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.head_dim
        proj = functools.partial(dense, inner, dtype=self.dtype, use_bias=self.qkv_bias)
        q = proj(name="to_q")(x)
        k = proj(name="to_k")(context)
        v = proj(name="to_v")(context)
        out = dot_product_attention(q, k, v, self.heads, impl=self.attention_impl,
                                    upcast=self.upcast_attention)
        return dense(x.shape[-1], name="to_out_0", dtype=self.dtype)(out)


class GEGLU(nn.Module):
    """`proj` to 2 x inner, then hidden * gelu(gate) (exact gelu, as torch)."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(dense(2 * self.inner_dim, name="proj", dtype=self.dtype)(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward: `net_0` (GEGLU), dropout slot `net_1`, `net_2` (Linear)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return dense(dim, name="net_2", dtype=self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text, GEGLU MLP."""

    heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        attn = functools.partial(Attention, self.heads, self.head_dim, upcast_attention=self.upcast_attention,
                                 attention_impl=self.attention_impl, dtype=self.dtype)
        dt = x.dtype
        x = x + attn(name="attn1")(layer_norm("norm1")(x).astype(dt))
        x = x + attn(name="attn2")(layer_norm("norm2")(x).astype(dt), context)
        x = x + FeedForward(dtype=self.dtype, name="ff")(layer_norm("norm3")(x).astype(dt))
        return x


class Transformer2DModel(nn.Module):
    """diffusers Transformer2DModel for continuous (image) input.

    GroupNorm (eps 1e-6) -> `proj_in` (1x1 conv, or Linear when
    `use_linear_projection`, the SD 2.x form) -> `num_layers`
    BasicTransformerBlocks over the H*W tokens -> `proj_out` -> + input.
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    norm_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.norm_groups, 1e-6, name="norm")(x)
        if self.use_linear_projection:
            h = dense(inner, name="proj_in", dtype=self.dtype)(h.reshape(b, hgt * wid, c))
        else:
            h = conv(inner, 1, name="proj_in", dtype=self.dtype)(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast_attention, self.attention_impl,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = dense(c, name="proj_out", dtype=self.dtype)(h).reshape(b, hgt, wid, c)
        else:
            h = conv(c, 1, name="proj_out", dtype=self.dtype)(h.reshape(b, hgt, wid, inner))
        return h + x
