"""What the CLIP, latent-diffusion and VAE trainers share: base config, data keys, mesh, host
copies, the held-out image set and the per-step bookkeeping of the train loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from t2i_jax import data as data_lib
from t2i_jax import parallel
from t2i_jax.train.checkpoint import Checkpointer, StopSignal, stop_if_not_finite

log = logging.getLogger(__name__)

# Keys of a data config that go to `data.make_loader` as they are.
LOADER_KEYS = ("seed", "shuffle", "num_epochs", "random_crop", "random_flip", "worker_count",
               "worker_buffer_size", "read_threads", "read_buffer")


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
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.num_devices = 0  # 0: all; n: the first n (tests, scaling measurements)
    c.mesh.fsdp_min_size = 2**14  # tensors with fewer elements stay replicated
    c.export = True  # the trained model in its library's folder format, in workdir/export
    c.progress = True  # tqdm bar
    return c


def open_run(config, workdir) -> tuple[Path, bool, Checkpointer, int | None]:
    """Starts or resumes a run in `workdir`: writes config.json (process 0), opens the checkpoint
    manager. Returns (workdir, is_main, checkpointer, latest saved step or None)."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_to_keep,
                        async_save=config.train.async_checkpoint)
    return workdir, is_main, ckpt, ckpt.latest_step()


def resume(ckpt: Checkpointer, step: int, abstract_state, shardings, data_iter):
    """The train state saved at `step`, laid out as `shardings`; `data_iter` is restored in place."""
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, shardings)
    state = ckpt.restore(target, data_iter, step)
    log.info("resumed from step %d in %s", step, ckpt.directory)
    return state


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


class LoopControl:
    """The bookkeeping after each train step, the same in every trainer.

    A context manager around the step loop (it installs the SIGTERM handler and
    the progress bar); after each step `after_step` runs, in this order, the
    NaN/inf guard, the metrics line with throughput every `train.log_every`
    steps, the progress bar, the periodic checkpoint, and the stop check: on
    SIGTERM, or at `train.preempt_at_step`, it saves and returns why it stopped
    (the caller breaks out of its loop); otherwise it returns None.
    """

    def __init__(self, config, ckpt, writer, data_iter, *, start: int, total_steps: int, n_devices: int,
                 desc: str, is_main: bool, postfix: tuple[str, ...] = ("loss", "lr")):
        self.config, self.ckpt, self.writer, self.data_iter = config, ckpt, writer, data_iter
        self.total_steps, self.n_devices, self.postfix = total_steps, n_devices, postfix
        self._show = is_main and config.progress
        self._desc, self._start = desc, start
        self._signal = StopSignal()
        self.pbar = None
        self._t_last, self._s_last = time.perf_counter(), start

    def __enter__(self) -> LoopControl:
        self._signal.__enter__()
        if self._show:
            from tqdm import tqdm
            self.pbar = tqdm(total=self.total_steps, initial=self._start, desc=self._desc, dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        if self.pbar is not None:
            self.pbar.close()
        return self._signal.__exit__(*exc)

    def after_step(self, done: int, state, metrics: dict) -> str | None:
        """Bookkeeping for step `done` (1-based) with its host `metrics`; the stop reason, or None."""
        train = self.config.train
        stop_if_not_finite(done, metrics, self.ckpt, self.writer)
        if done % train.log_every == 0 or done == self.total_steps:
            now = time.perf_counter()
            rate = (done - self._s_last) / max(now - self._t_last, 1e-9)
            self._t_last, self._s_last = now, done
            self.writer.write(done, {**metrics, "steps_per_sec": rate,
                                     "samples_per_sec_per_device": rate * self.config.batch_size / self.n_devices})
        if self.pbar is not None:
            self.pbar.update(1)
            fmt = {"loss": "{:.4f}", "lr": "{:.2e}"}
            self.pbar.set_postfix({k: fmt.get(k, "{:.4g}").format(metrics[k]) for k in self.postfix if k in metrics})
        if done % train.checkpoint_every == 0 or done == self.total_steps:
            self.ckpt.save(done, state, self.data_iter, self.config)
        signalled = self._signal.requested()
        if signalled or done == train.preempt_at_step:
            reason = "signal" if signalled else "preempt_at_step"
            self.ckpt.save(done, state, self.data_iter, self.config)
            log.warning("stopped at step %d (%s); checkpoint saved in %s", done, reason, self.ckpt.directory)
            return reason
        return None
