"""What the CLIP, latent-diffusion and VAE trainers share before and after their loop (which is
`t2i_jax.train.loop`): base config, run folder, data keys, mesh, host copies, the held-out image set."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from t2i_jax import data as data_lib
from t2i_jax import parallel
from t2i_jax.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)

# Keys of a data config that go to `data.make_loader` as they are.
LOADER_KEYS = ("seed", "shuffle", "num_epochs", "random_crop", "random_flip", "worker_count",
               "worker_buffer_size", "read_threads", "read_buffer", "delay_ms", "first_good_within",
               "max_bad_fraction", "bad_window")


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


def open_run(config, workdir) -> tuple[Path, bool, Checkpointer, int | None]:
    """Starts or resumes a run in `workdir`: opens the checkpoint manager, checks a resume's config
    against the checkpoint's (`Checkpointer.check_resume`), then writes config.json (process 0).
    Returns (workdir, is_main, checkpointer, latest saved step or None)."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_to_keep,
                        async_save=config.train.async_checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            ckpt.check_resume(config, latest)  # before config.json changes: a refused resume keeps the record
        except Exception:
            ckpt.close()
            raise
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2) + "\n")
        os.replace(tmp, workdir / "config.json")
    return workdir, is_main, ckpt, latest


def loader_kwargs(dcfg: dict) -> dict:
    """The `data.make_loader` keyword arguments a data config sets."""
    return {k: dcfg[k] for k in LOADER_KEYS if k in dcfg}


def merge_dicts(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_run_mesh(config):
    """The ("data", "fsdp") mesh over all devices, or the first `mesh.num_devices`."""
    devices = jax.devices()
    if config.mesh.num_devices:
        devices = devices[:config.mesh.num_devices]
    return parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)


def to_host(tree):
    """Host numpy copy of a (possibly sharded over hosts) pytree; a collective with several processes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def make_eval_set(source, num_images: int, resolution: int, tokenizer) -> dict:
    """The first `num_images` records: center-cropped images, every caption tokenized (if `tokenizer`).

    Returns {"image" [N, R, R, 3] in [-1, 1], "input_ids" [M, T], "text_to_image" [M], "captions" [M],
    "skipped"}; a record whose image does not decode is skipped and counted.
    """
    images, captions, owner, skipped = [], [], [], 0
    for i in range(min(num_images, len(source))):
        rec = source[i]
        try:
            img = data_lib.decode_image(rec["image"], resolution)
        except Exception as e:  # noqa: BLE001  a bad image costs that image, not the eval
            log.warning("eval: skipping %s: %s", rec.get("key"), e)
            skipped += 1
            continue
        h, w = img.shape[:2]
        top, left = (h - resolution) // 2, (w - resolution) // 2
        images.append(img[top:top + resolution, left:left + resolution].astype(np.float32) / 127.5 - 1.0)
        captions += rec["captions"]
        owner += [len(images) - 1] * len(rec["captions"])
    if not images:
        raise ValueError(f"the eval source {source!r} gave no images")
    ids = tokenizer(captions) if tokenizer is not None else None
    return {"image": np.stack(images), "input_ids": ids, "text_to_image": np.asarray(owner), "captions": captions,
            "skipped": skipped}
