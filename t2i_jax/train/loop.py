"""The one train loop: what the CLIP, latent-diffusion and VAE objectives share.

An objective (`Objective`) brings only what is its own: a loss over a
(micro-)batch, the per-example randomness it draws once per step, an optional
fix-up of the params after each update, and which host arrays form its batch.
This module owns the rest:

    step      gradients (accumulated over micro-batches), global-norm, the
              optimizer, the non-finite guard (a bad update is skipped and
              remembered), EMA with warm-up, and the metrics, summed on device;
    loop      device prefetch of batches (a background thread keeps two ahead),
              the ahead-of-time compile of the step (its time logged), log /
              checkpoint / eval at their steps, stop signals;
    helpers   init-or-resume of the sharded state, padded eval batching.

The host never waits for the device between log steps: the step's metrics stay
in an on-device accumulator that the host reads only at log, checkpoint, eval
and stop steps, and the non-finite guard is a flag in that accumulator. A step
whose loss, gradient norm or update (its global norm) is not finite leaves the state as
it was (and so does every step after it), so the state the host sees at the
next read is the last good one, and no checkpoint is ever written from it: the
run stops there naming the first bad step and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import parallel
from t2i_jax.train import state as state_lib
from t2i_jax.train.checkpoint import Checkpointer, StopSignal

__all__ = ["Objective", "make_train_step", "new_accumulator", "new_train_accumulator", "read_accumulator",
           "Prefetcher", "Loop",
           "init_or_resume", "eval_in_batches", "ema_decay_at", "poison", "fit"]

log = logging.getLogger(__name__)

NO_BAD_STEP = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class Objective:
    """What one training objective plugs into the loop.

    `loss_fn(params, frozen, batch, step) -> (loss, aux)`: a scalar to minimise
    over a (micro-)batch and a dict of scalar metrics (means over the batch);
    `aux["loss"]`, if present, is the loss that is reported (e.g. the VAE
    minimises generator + discriminator losses but reports the first).
    `frozen` is a pytree of non-trained params (VAE / text encoder), `step` the
    int32 optimizer step.

    `augment(frozen, batch, key) -> batch` draws the per-example randomness of
    a step (noise, timesteps, caption dropout...) for the whole batch, before
    it is cut into micro-batches: accumulating k micro-batches of B / k then
    computes exactly what one batch of B does.

    `post_update(params) -> params` runs after every optimizer update (CLIP
    clamps its temperature).
    """

    name: str
    loss_fn: Callable
    batch_keys: tuple[str, ...]
    augment: Callable | None = None
    post_update: Callable | None = None
    postfix: tuple[str, ...] = ("loss", "lr")  # progress-bar fields, refreshed at log steps


# ===========================================================================
# Step
# ===========================================================================

def ema_decay_at(step, decay: float, warmup: bool):
    """The EMA decay of optimizer update number `step` (1-based).

    With `warmup`, diffusers' `EMAModel` rule: 0 at the first update (the EMA
    starts as the trained params, not the random init), then
    min(decay, (1 + s) / (10 + s)) with s = step - 1; without, `decay`.
    """
    if not warmup:
        return jnp.float32(decay)
    s = jnp.asarray(step, jnp.float32) - 1.0
    return jnp.where(s <= 0, 0.0, jnp.minimum(decay, (1.0 + s) / (10.0 + s)))


def new_accumulator(names: Sequence[str], mesh) -> dict:
    """A zeroed on-device metrics accumulator: per-metric sums, the step count, the first
    non-finite step (NO_BAD_STEP: none) and that step's metrics, all replicated on `mesh`."""
    zeros = {k: np.zeros((), np.float32) for k in names}
    acc = {"sum": zeros, "last": dict(zeros), "bad": dict(zeros), "count": np.zeros((), np.int32),
           "first_bad": np.full((), NO_BAD_STEP, np.int32)}
    return jax.device_put(acc, parallel.replicated(mesh))


def read_accumulator(acc: dict) -> dict:
    """Host copy of an accumulator: {"means", "last", "count", "first_bad" (None: none), "bad"}."""
    host = jax.device_get(acc)
    n = int(host["count"])
    first_bad = int(host["first_bad"])
    return {"means": {k: float(v) / max(n, 1) for k, v in host["sum"].items()},
            "last": {k: float(v) for k, v in host["last"].items()}, "count": n,
            "first_bad": None if first_bad == NO_BAD_STEP else first_bad,
            "bad": {k: float(v) for k, v in host["bad"].items()}}


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule: optax.Schedule, config,
                    mesh, state_shardings, frozen_shardings):
    """The jitted `(state, acc, frozen, batch) -> (state, acc)`; state and accumulator are donated.

    One step: draw the step's randomness (`objective.augment`), mean loss and
    gradients over `train.grad_accum` micro-batches, the optimizer update,
    `objective.post_update`, then the guard: the update is applied only if
    the loss, the gradient norm and the update's global norm are finite (the
    params it leads to are then finite too: they start finite and are never
    given a non-finite update; checking the norm instead of every param leaf
    keeps the guard from tripling the step's compile time) and no
    earlier step of this accumulator was bad; otherwise the state stays as it
    was and the accumulator remembers the step. EMA (`ema_decay`, with
    `ema_warmup`) follows the applied updates.
    """
    accum = int(config.train.grad_accum)
    ema_decay = float(config.ema_decay)
    ema_warmup = bool(config.get("ema_warmup", True))
    micro_sharding = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
    batch_sh, acc_sh = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def train_step(state, acc, frozen, batch):
        rng, key = jax.random.split(state.rng)
        if objective.augment is not None:
            batch = objective.augment(frozen, batch, key)

        grad_fn = jax.value_and_grad(lambda p, mb: objective.loss_fn(p, frozen, mb, state.step), has_aux=True)
        (loss, aux), grads = state_lib.accumulate_gradients(grad_fn, state.params, batch, accum, micro_sharding)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if objective.post_update is not None:
            params = objective.post_update(params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
        clean = acc["first_bad"] == NO_BAD_STEP  # no earlier step of this accumulator was bad
        ok = finite & clean
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        step = state.step + ok.astype(state.step.dtype)
        ema = state.ema_params
        if ema is not None:
            d = ema_decay_at(step, ema_decay, ema_warmup)
            ema = keep(state_lib.ema_update(ema, params, d), ema)
        new = state.replace(step=step, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                            ema_params=ema, rng=rng)

        reported = aux.pop("loss", loss)
        metrics = {"loss": reported, "grad_norm": grad_norm, "lr": schedule(state.step), **aux}
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        this_step = state.step.astype(jnp.int32) + 1  # 1-based number of this step
        newly_bad = ~finite & clean
        # .get: an empty probe accumulator (`metric_names`) traces too.
        acc = {"sum": {k: acc["sum"].get(k, 0.0) + v for k, v in metrics.items()}, "last": metrics,
               "bad": {k: jnp.where(newly_bad, v, acc["bad"].get(k, 0.0)) for k, v in metrics.items()},
               "count": acc["count"] + 1,
               "first_bad": jnp.where(newly_bad, this_step, acc["first_bad"])}
        return new, acc

    return jax.jit(train_step, in_shardings=(state_shardings, acc_sh, frozen_shardings,
                                             {k: batch_sh for k in objective.batch_keys}),
                   out_shardings=(state_shardings, acc_sh), donate_argnums=(0, 1))


def metric_names(step_fn, state, frozen, batch) -> tuple[str, ...]:
    """The metric keys `make_train_step`'s step produces (traced abstractly; nothing runs)."""
    probe = {"sum": {}, "last": {}, "bad": {}, "count": jnp.zeros((), jnp.int32),
             "first_bad": jnp.zeros((), jnp.int32)}
    out = jax.eval_shape(step_fn.__wrapped__, state, probe, frozen, batch)
    return tuple(out[1]["last"])


def new_train_accumulator(step_fn, state, frozen, batch, mesh) -> dict:
    """A zeroed accumulator for `step_fn` (see `new_accumulator`)."""
    return new_accumulator(metric_names(step_fn, state, frozen, batch), mesh)


# ===========================================================================
# Data: host batches -> device, ahead of the step
# ===========================================================================

class Prefetcher:
    """Iterates device batches prepared `size` ahead by a background thread.

    The thread pulls a host batch from `iterator`, applies `prepare` (host
    numpy work), and places it on the devices with `put`; device transfers and
    a slow source then overlap the running step. It records the iterator's
    state after each batch it takes, and `get_state` returns the state after
    the last batch *consumed*, so a checkpoint taken at step k resumes at batch
    k + 1 exactly as without prefetching. Checkpointable like a grain
    iterator (`get_state` / `set_state` bytes); `set_state` only before the
    first `next`.
    """

    def __init__(self, iterator, put: Callable, prepare: Callable | None = None, *, size: int = 2, start: int = 0):
        """`prepare(host_batch, step)` gets the 1-based number of the step the batch is for,
        counting from `start` (the step a resumed run continues after)."""
        self.iterator, self.put, self.prepare, self.size = iterator, put, prepare, max(int(size), 1)
        self._queue: queue.Queue = queue.Queue(maxsize=self.size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = None
        self.index = int(start)  # steps whose batch was consumed

    def get_state(self) -> bytes:
        return self._state if self._state is not None else self.iterator.get_state()

    def set_state(self, state) -> None:
        if self._thread is not None:
            raise RuntimeError("Prefetcher.set_state after prefetching started; restore before the first batch")
        self.iterator.set_state(state)

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after a restore
        pass

    def _run(self, first_index: int) -> None:
        i = first_index
        try:
            while not self._stop.is_set():
                host = next(self.iterator)
                st = self.iterator.get_state()
                if self.prepare is not None:
                    host = self.prepare(host, i + 1)
                item = (self.put(host), st, None)
                i += 1
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001  handed to the consumer, raised there
            self._queue.put((None, None, e))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(self.index,), daemon=True,
                                            name="t2i_jax-prefetch")
            self._thread.start()
        batch, st, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        self._state = st
        self.index += 1
        return batch

    def close(self) -> None:
        """Stops the thread (it may finish the batch it is reading)."""
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a put
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=30)


def poison(batch: dict, step: int, at_step: int) -> dict:
    """Tests (`train.debug_nan_step`): batch `step` (1-based) with every float array made NaN."""
    if step != at_step:
        return batch
    return {k: np.full_like(v, np.nan) if np.issubdtype(np.asarray(v).dtype, np.floating) else v
            for k, v in batch.items()}


# ===========================================================================
# State: init or resume; eval batching
# ===========================================================================

def init_or_resume(ckpt: Checkpointer, start: int | None, init: Callable, abstract_state, shardings, data_iter):
    """(state, first step): the checkpoint at `start` restored onto `shardings` (and `data_iter`
    moved to its position), or `init()` (a function returning the fresh state, laid out as
    `shardings`) at step 0."""
    if start is None:
        return init(), 0
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, shardings)
    state = ckpt.restore(target, data_iter, start)
    log.info("resumed from step %d in %s", start, ckpt.directory)
    return state, start


def eval_in_batches(fn: Callable, params, arrays: Sequence[np.ndarray], batch_size: int, mesh) -> list:
    """Runs `fn(params, *chunks)` over the leading axis of host arrays held whole on every host,
    in batches of `batch_size` rounded up to the device count (the last one padded by repeating
    its last row); returns fn's outputs as host numpy arrays cut to the real rows, concatenated."""
    n_dev = mesh.devices.size
    bs = max(n_dev, -(-int(batch_size) // n_dev) * n_dev)
    batch_sh = parallel.batch_sharding(mesh)
    n = len(arrays[0])
    outs = []
    for i in range(0, n, bs):
        parts = []
        for a in arrays:
            chunk = a[i:i + bs]
            if len(chunk) < bs:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), 0)])
            parts.append(jax.make_array_from_callback(chunk.shape, batch_sh, lambda idx, c=chunk: c[idx]))
        out = jax.device_get(fn(params, *parts))
        outs.append(jax.tree_util.tree_map(lambda x, m=min(bs, n - i): np.asarray(x)[:m], out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)


# ===========================================================================
# Loop
# ===========================================================================

class Loop:
    """Runs the compiled step from `start` to `total_steps` with logging, checkpoints, evals and stops.

    Per step the host only dispatches: it takes the next prefetched device
    batch and calls the step. At a log step (`train.log_every`) it reads the
    accumulator (one transfer), writes the window's mean metrics and
    throughput, refreshes the progress bar and starts a new window; at a
    checkpoint step, an eval step or a stop it first reads the guard flag.
    Stop signals (SIGTERM) are a local flag read every step; with several
    processes they are combined every `train.stop_check_every` steps (a small
    collective) so that all processes stop at the same step.
    """

    def __init__(self, objective: Objective, config, *, ckpt: Checkpointer, writer, mesh, is_main: bool,
                 total_steps: int, evals: Sequence[tuple[int, Callable]] = ()):
        self.objective, self.config, self.ckpt, self.writer, self.mesh = objective, config, ckpt, writer, mesh
        self.is_main, self.total_steps, self.evals = is_main, int(total_steps), tuple(evals)
        self.compile_seconds = None
        self.skipped_images = None  # a callable returning the loader's skip count, if it keeps one

    def _check_finite(self, done: int, acc_host: dict) -> None:
        bad = acc_host["first_bad"]
        if bad is None:
            return
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        what = [f"{k} is {acc_host['bad'][k]}" for k in ("loss", "grad_norm") if not math.isfinite(acc_host["bad"][k])]
        self.writer.write(bad, acc_host["bad"])
        raise FloatingPointError(
            f"step {bad}: {' and '.join(what) or 'the update is not finite'}; training stopped (noticed "
            f"at step {done}; the update of step {bad} and later ones were not applied). The last good checkpoint "
            f"({'none' if last is None else f'step {last}'}) in {self.ckpt.directory} is kept; resume from it with "
            "a lower optim.lr / optim.grad_clip, or check the data of that step.")

    def run(self, step_fn, state, frozen, batches: Prefetcher, start: int):
        """Runs the loop; returns (state, stop reason or None). Raises FloatingPointError at the
        first read of the guard after a non-finite step."""
        cfg = self.config.train
        total = self.total_steps
        if start >= total:
            return state, None
        n_dev = self.mesh.devices.size
        log_every = max(int(cfg.log_every), 1)
        ckpt_every = max(int(cfg.checkpoint_every), 1)
        check_every = max(int(self.config.train.get("stop_check_every", 10)), 1)
        pbar = None
        if self.is_main and self.config.progress:
            from tqdm import tqdm
            pbar = tqdm(total=total, initial=start, desc=self.objective.name, dynamic_ncols=True)
        signal = StopSignal()
        stopped = None
        s_last = start
        skipped_logged = 0
        try:
            with signal:
                first = next(batches)
                acc = new_train_accumulator(step_fn, state, frozen, first, self.mesh)
                t0 = time.perf_counter()
                compiled = step_fn.lower(state, acc, frozen, first).compile()
                self.compile_seconds = time.perf_counter() - t0
                log.info("%s train step compiled in %.1f s", self.objective.name, self.compile_seconds)
                t_last = time.perf_counter()
                for step in range(start, total):
                    batch = first if step == start else next(batches)
                    state, acc = compiled(state, acc, frozen, batch)
                    done = step + 1
                    if pbar is not None:
                        pbar.update(1)
                    is_log = done % log_every == 0 or done == total
                    is_ckpt = done % ckpt_every == 0 or done == total
                    due = [fn for every, fn in self.evals if every and done % every == 0 and done != total]
                    signalled = signal.requested(collective=done % check_every == 0 or done == total)
                    stop = signalled or done == cfg.preempt_at_step
                    if is_log or is_ckpt:
                        self.ckpt.check()  # an earlier asynchronous save that failed (disk full) stops here
                    if is_log:
                        host = read_accumulator(acc)
                        self._check_finite(done, host)
                        now = time.perf_counter()
                        rate = (done - s_last) / max(now - t_last, 1e-9)
                        t_last, s_last = now, done
                        row = {**host["means"], "lr": host["last"]["lr"], "steps_per_sec": rate,
                               "samples_per_sec_per_device": rate * self.config.batch_size / n_dev}
                        if self.skipped_images is not None:
                            row["skipped_images"] = float(self.skipped_images())
                            if row["skipped_images"] > skipped_logged:
                                skipped_logged = row["skipped_images"]
                                log.warning("step %d: %d image(s) skipped so far (unreadable)", done,
                                            skipped_logged)
                        self.writer.write(done, row)
                        if pbar is not None:
                            fmt = {"loss": "{:.4f}", "lr": "{:.2e}"}
                            pbar.set_postfix({k: fmt.get(k, "{:.4g}").format(row[k])
                                              for k in self.objective.postfix if k in row})
                        acc = new_accumulator(tuple(host["last"]), self.mesh)  # a new window (guard read: none bad)
                    elif is_ckpt or due or stop:
                        self._check_finite(done, read_accumulator({"sum": {}, "last": {}, "bad": acc["bad"],
                                                                   "count": acc["count"],
                                                                   "first_bad": acc["first_bad"]}))
                    if is_ckpt or stop:
                        self.ckpt.save(done, state, batches, self.config)
                    if stop:
                        stopped = "signal" if signalled else "preempt_at_step"
                        log.warning("stopped at step %d (%s); checkpoint saved in %s", done, stopped,
                                    self.ckpt.directory)
                        break
                    for fn in due:
                        fn(done, state)
        finally:
            batches.close()
            if pbar is not None:
                pbar.close()
        return state, stopped


def fit(objective: Objective, config, *, tx, schedule, mesh, ckpt: Checkpointer, writer, is_main: bool, state,
        state_shardings, frozen, frozen_shardings, data_iter, start: int, total_steps: int,
        prepare: Callable | None = None, evals: Sequence[tuple[int, Callable]] = (),
        skipped: Callable | None = None):
    """Trains `objective` from `start` to `total_steps`: builds the step, the prefetcher over
    `data_iter` (host batches; `prepare(host) -> dict of objective.batch_keys` runs in the
    prefetch thread, default: select those keys) and the `Loop`. `evals`: (every, fn(step,
    state)) pairs; `skipped()`: the loader's count of skipped records, logged at log steps.
    Returns (state, stop reason or None, the Loop (its compile_seconds))."""
    step_fn = make_train_step(objective, tx, schedule, config, mesh, state_shardings, frozen_shardings)
    keys, nan_at = objective.batch_keys, int(config.train.debug_nan_step)

    def host_batch(host, step):
        b = prepare(host) if prepare is not None else {k: host[k] for k in keys}
        return poison(b, step, nan_at)

    batches = Prefetcher(data_iter, lambda b: parallel.host_to_global(b, mesh), host_batch,
                         size=int(config.train.get("prefetch", 2)), start=start)
    loop = Loop(objective, config, ckpt=ckpt, writer=writer, mesh=mesh, is_main=is_main, total_steps=total_steps,
                evals=evals)
    loop.skipped_images = skipped
    state, stopped = loop.run(step_fn, state, frozen, batches, start)
    return state, stopped, loop
