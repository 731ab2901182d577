"""The train state pytree, the optimizer, EMA and gradient accumulation.

Shared by every objective. The state holds only arrays (no functions), so
orbax saves it as is and `jax.jit(..., donate_argnums=0)` can reuse its
buffers; the optimizer (`optax.GradientTransformation`) lives beside it.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import parallel

__all__ = ["TrainState", "make_schedule", "make_optimizer", "create_state", "ema_update", "accumulate_gradients"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict  # the trained parameters (fp32)
    opt_state: optax.OptState
    ema_params: dict | None  # exponential moving average of params; None when EMA is off
    rng: jax.Array  # uint32[2] raw PRNG key, split per step (dropout, noise)


def make_schedule(cfg) -> optax.Schedule:
    """Linear warm-up from 0 to `cfg.lr` over `warmup_steps`, then cosine decay to `lr * end_lr_factor`.

    `cfg`: the `optim` config (lr, warmup_steps, end_lr_factor) plus `total_steps`.
    """
    total = max(int(cfg.total_steps), 1)
    warmup = min(int(cfg.warmup_steps), total)
    if warmup >= total:
        return optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup_steps=warmup, decay_steps=total,
                                              end_value=cfg.lr * cfg.end_lr_factor)


def _decay_mask(params):
    # Weight decay on matrices (kernels, embedding tables) only; not on biases,
    # layer-norm gains or the temperature, as in CLIP and most transformer recipes.
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and `make_schedule`'s learning rate.

    `cfg` fields: lr, warmup_steps, end_lr_factor, total_steps, b1, b2, eps,
    weight_decay, grad_clip (0 disables clipping).
    """
    schedule = make_schedule(cfg)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule


def create_state(params, tx: optax.GradientTransformation, *, ema: bool, seed: int) -> TrainState:
    """A fresh state at step 0 (call under jit with out_shardings to build it sharded)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        # A copy, not an alias: the state is donated and each leaf must own its buffer.
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
        rng=jax.random.PRNGKey(seed),
    )


def state_shardings(abstract_state: TrainState, rules, mesh, fsdp_min_size: int):
    """Shardings for every leaf of a state: params, EMA and Adam moments by `rules`; the rest replicated.

    The optimizer moments sit under paths like `opt_state/1/0/mu/<param path>`;
    rules match with `re.search`, so they shard like their parameter.
    """
    shardings = parallel.tree_shardings(abstract_state, rules, mesh, fsdp_min_size=fsdp_min_size)
    return shardings.replace(step=NamedSharding(mesh, P()), rng=NamedSharding(mesh, P()))


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params (leafwise, in the params' dtype)."""
    return jax.tree_util.tree_map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def accumulate_gradients(grad_fn: Callable, params, batch: dict, steps: int, micro_sharding=None):
    """Mean loss, aux and gradients over `steps` micro-batches, with a `lax.scan`.

    `grad_fn(params, batch) -> ((loss, aux), grads)`. The batch [B, ...] is cut
    into `steps` micro-batches of B / steps; micro-batch j takes rows
    j, j + steps, j + 2 * steps, ... so that, with the batch sharded over
    devices in contiguous blocks, every device holds an equal share of every
    micro-batch and no data moves between devices (a plain reshape to
    [steps, B / steps] would put each micro-batch on a few devices only).
    `micro_sharding` (a sharding for the [steps, B / steps, ...] arrays)
    pins that layout.
    """
    if steps == 1:
        return grad_fn(params, batch)

    def split(x):
        if x.shape[0] % steps:
            raise ValueError(f"batch of {x.shape[0]} does not split into {steps} micro-batches")
        x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
        if micro_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, micro_sharding)
        return x

    micro = jax.tree_util.tree_map(split, batch)

    def body(carry, mb):
        (loss, aux), grads = grad_fn(params, mb)
        acc_loss, acc_aux, acc_grads = carry
        return (acc_loss + loss, jax.tree_util.tree_map(jnp.add, acc_aux, aux),
                jax.tree_util.tree_map(jnp.add, acc_grads, grads)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    (_, aux_shape), _ = jax.eval_shape(grad_fn, params, first)
    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
             jax.tree_util.tree_map(jnp.zeros_like, params))
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
    mean = lambda t: jax.tree_util.tree_map(lambda x: x / steps, t)  # noqa: E731
    return (loss / steps, mean(aux)), mean(grads)
