"""GPT-2 (transformers' GPT2LMHeadModel) in Flax Linen, with an explicit KV cache.

Learned position embeddings, pre-LN blocks, `gelu_new`, the LM head tied to
the token embedding. Module names follow transformers (`transformer.wte`,
`transformer.h_N.attn.c_attn`, `transformer.ln_f`); `t2i_jax.convert.gpt2`
maps a checkpoint onto them.

The cache is passed in and returned, not kept in a Flax collection, so the
generator (`t2i_jax.enhance`) can carry it through a `lax.while_loop`: a
pair of arrays [layers, batch, max_len, n_embd] written at
`cache_index` with `dynamic_update_slice`. The caller builds the attention
mask (which cache slots each query may read), so one module serves the
prefill, the decode step and the plain forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i_jax.models import layers

ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """transformers' GPT2Config fields that change the forward pass (dropout is not used: inference only)."""

    vocab_size: int = 50257
    n_positions: int = 1024  # learned positions: prompt + generated tokens must fit
    n_embd: int = 768  # width of the residual stream
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # also / (layer + 1) (a few Megatron-style checkpoints)
    tie_word_embeddings: bool = True  # LM head = wte; else a separate `lm_head` matrix
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; "
                             f"choose one of {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> GPT2Config:
        """From a transformers `config.json` dict; fields we do not model are ignored, except those
        that would change the numbers (cross-attention, reordered attention), which are refused."""
        if d.get("add_cross_attention"):
            raise ValueError("add_cross_attention=True (a GPT-2 decoder with cross-attention) is not supported; "
                             "use a plain GPT-2 language model")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("eos_token_id"), list):  # transformers allows several; we stop on the first
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A transformers GPT2Config dict."""
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **dataclasses.asdict(self)}


TINY = GPT2Config(vocab_size=300, n_positions=64, n_embd=36, n_layer=2, n_head=3)
SMALL = GPT2Config()  # GPT-2 small, 124M: MagicPrompt's size


def causal_mask(key_valid: jax.Array, query_pos: jax.Array) -> jax.Array:
    """[B, 1, T, S] boolean: query t (at cache slot `query_pos[t]`) reads slot s when s <= query_pos[t]
    and `key_valid[b, s]` (not padding)."""
    slots = jnp.arange(key_valid.shape[1])
    allowed = slots[None, :] <= query_pos[:, None]  # [T, S]
    return (allowed[None] & key_valid[:, None, :].astype(bool))[:, None]


class Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cache=None, cache_index=0):
        cfg = self.config
        b, t, _ = x.shape
        q, k, v = jnp.split(nn.Dense(3 * cfg.n_embd, dtype=self.dtype, name="c_attn")(x), 3, -1)  # [B, T, D] each
        if cache is not None:
            # Written into the stacked cache of all layers, so XLA updates it in place inside the decode loop
            # (a per-layer cache re-stacked after each step would copy all of it every token).
            at = (self.layer_idx, 0, cache_index, 0)
            cache = tuple(jax.lax.dynamic_update_slice(c, a.astype(c.dtype)[None], at) for c, a in zip(cache, (k, v)))
            k, v = cache[0][self.layer_idx], cache[1][self.layer_idx]
        scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        # The XLA path scores and softmaxes in fp32 whatever the compute dtype.
        out = layers.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), cfg.n_head, mask=mask,
                                           scale=scale)
        return nn.Dense(cfg.n_embd, dtype=self.dtype, name="c_proj")(out), cache


class MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.Dense(cfg.n_inner or 4 * cfg.n_embd, dtype=self.dtype, name="c_fc")(x)
        return nn.Dense(cfg.n_embd, dtype=self.dtype, name="c_proj")(ACTIVATIONS[cfg.activation_function](h))


class Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cache=None, cache_index=0):
        eps = self.config.layer_norm_epsilon
        # LayerNorm in fp32 (dtype=None keeps the input's; params are fp32).
        h, cache = Attention(self.config, self.layer_idx, self.dtype, name="attn")(
            nn.LayerNorm(eps, name="ln_1")(x.astype(jnp.float32)).astype(self.dtype), mask, cache, cache_index)
        x = x + h
        x = x + MLP(self.config, self.dtype, name="mlp")(
            nn.LayerNorm(eps, name="ln_2")(x.astype(jnp.float32)).astype(self.dtype))
        return x, cache


class GPT2Model(nn.Module):
    """The transformer: embeddings, blocks, final LayerNorm; returns hidden states [B, T, n_embd]."""

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd)
        self.h = [Block(cfg, i, self.dtype, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = nn.LayerNorm(cfg.layer_norm_epsilon)

    def __call__(self, input_ids, position_ids, mask, cache=None, cache_index=0):
        x = (self.wte(input_ids) + self.wpe(position_ids)).astype(self.dtype)
        for block in self.h:
            x, cache = block(x, mask, cache, cache_index)
        return self.ln_f(x.astype(jnp.float32)), cache

    def attend(self, x):
        return self.wte.attend(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its LM head. `__call__(input_ids, position_ids, mask, cache=None, cache_index=0)` returns
    (logits [B, T, vocab] in fp32, the updated cache or None).

    `mask` is [B, 1, T, S] boolean (see `causal_mask`), S = T without a cache, else the cache length.
    `cache` is (keys, values), each [n_layer, B, S, n_embd] (`init_cache`); this call's keys and
    values are written at slot `cache_index` before attending.
    """

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        self.transformer = GPT2Model(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False)

    def __call__(self, input_ids, position_ids, mask, cache=None, cache_index=0):
        h, cache = self.transformer(input_ids, position_ids, mask, cache, cache_index)
        logits = self.transformer.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32), cache


def init_cache(config: GPT2Config, batch: int, length: int, dtype=jnp.float32):
    """Zeroed (keys, values) of `length` slots, each [n_layer, batch, length, n_embd] (heads side by side,
    the layout `layers.dot_product_attention` takes)."""
    shape = (config.n_layer, batch, length, config.n_embd)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def dummy_inputs(batch: int = 1, length: int = 4):
    """Arguments for `GPT2LMHeadModel.init` (shapes only matter)."""
    ids = jnp.zeros((batch, length), jnp.int32)
    mask = causal_mask(jnp.ones((batch, length), bool), jnp.arange(length))
    return ids, ids, mask
