"""The config keys every trainer reads (`base_config`) and the merge of nested config dicts."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The keys every trainer reads (seed, data, batch, train loop, optimizer, EMA, mesh, export,
    progress); each trainer's `default_config` adds its own and changes these defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init (from scratch) and the state's rng
    c.data = ml_collections.ConfigDict()  # a t2i_jax.data config (name, resolution, path, ...)
    c.batch_size = 64  # global, over all devices and hosts

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # optimizer steps; 0: from epochs
    c.train.epochs = 1.0  # used when steps == 0: epochs * len(train records) / batch_size
    c.train.grad_accum = 1  # micro-batches per step (each must still split over the devices)
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.max_to_keep = 3
    c.train.async_checkpoint = True
    c.train.preempt_at_step = 0  # tests/debugging: stop and save at this step as on SIGTERM (0: off)
    c.train.debug_nan_step = 0  # tests: feed a NaN batch at this step to exercise the NaN guard (0: off)
    c.train.prefetch = 2  # device batches prepared ahead of the running step (a background thread)
    c.train.stop_check_every = 10  # multi-process: combine stop signals every N steps (a collective)
    c.train.allow_changes = ""  # resume: comma-separated config keys (globs) allowed to differ from the checkpoint's

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.optim.end_lr_factor = 0.0  # cosine decays to lr * end_lr_factor
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0  # global norm; 0 disables

    c.ema_decay = 0.0  # 0: no EMA copy of the params
    c.ema_warmup = True  # EMA decay min(ema_decay, (1 + s) / (10 + s)) at update s + 1, as diffusers' EMAModel
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.num_devices = 0  # 0: all; n: the first n (tests, scaling measurements)
    c.mesh.fsdp_min_size = 2**14  # tensors with fewer elements stay replicated
    c.export = True  # the trained model in its library's folder format, in workdir/export
    c.progress = True  # tqdm bar
    return c


def merge_dicts(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
