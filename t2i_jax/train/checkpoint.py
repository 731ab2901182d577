"""One orbax CheckpointManager per run, and saving on SIGTERM.

Layout of `workdir/checkpoints/<step>/`:

    state/    the TrainState (params, opt_state, ema_params, step, rng), sharded
              arrays written by every process (orbax StandardCheckpointHandler)
    data/     the grain iterator position, process_<i>-of-<n>.json per host
    config/   the run's config as JSON (to see what a checkpoint was trained with)

A step folder appears only once complete (orbax writes to a temporary name and
renames), so a run killed mid-save leaves the previous checkpoint as the latest.
A save that fails (a full disk) raises `CheckpointSaveError` naming the step and
the last complete checkpoint, at once for a synchronous save and at the loop's
next log or checkpoint step for an asynchronous one.

On resume, `check_resume` compares the run's config with the one saved in the
checkpoint: keys in `RESUMABLE` (length of the run, logging, checkpoint and eval
cadence, device layout, loader performance knobs) may change; any other change
(model, data, batch size, optimizer, seed) is refused with every differing key
and both values, unless `train.allow_changes` names it.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import re
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

__all__ = ["RESUMABLE", "CheckpointSaveError", "Checkpointer", "ConfigMismatchError", "StopSignal",
           "config_changes", "check_resume"]

log = logging.getLogger(__name__)


# Config keys (glob patterns over dotted paths) that may differ between a run and its resume:
# they change how long the run goes, what it logs, saves and evaluates, and how the work is laid
# out on devices and loader threads, not what is trained on what. train.steps/epochs change the
# learning-rate schedule's length, which resuming to train longer means to do.
RESUMABLE = (
    "train.steps", "train.epochs", "train.log_every", "train.checkpoint_every", "train.max_to_keep",
    "train.async_checkpoint", "train.preempt_at_step", "train.debug_nan_step", "train.prefetch",
    "train.stop_check_every", "train.allow_changes", "eval.*", "progress", "export", "mesh.*",
    "model.remat", "model.attention_impl", "data.worker_count", "data.worker_buffer_size", "data.read_threads",
    "data.read_buffer", "data.delay_ms", "cache.batch_size",
)

_ABSENT = "<absent>"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full)."""


class ConfigMismatchError(ValueError):
    """A resume whose config differs from the checkpoint's in keys that change the run."""


def _as_dict(config) -> dict:
    """A ConfigDict (or a dict) as plain JSON values."""
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config


def config_changes(saved: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every leaf that differs, sorted by key; a key one
    side lacks has the value "<absent>". Both sides are compared as JSON (tuples equal lists)."""
    # Leaves by dotted path; an empty dict has none, so it equals an absent one.
    a = traverse_util.flatten_dict(json.loads(json.dumps(saved, default=str)), sep=".")
    b = traverse_util.flatten_dict(json.loads(json.dumps(new, default=str)), sep=".")
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or key.startswith(p.rstrip("*").rstrip(".") + ".")
               for p in patterns if p)


def check_resume(saved: Mapping, new: Mapping, *, step: int, directory, allow: str | tuple = (),
                 defaults: Mapping | None = None) -> list:
    """Checks that a run may resume with config `new` from a checkpoint saved with `saved`.

    Returns the changes it allows (keys in `RESUMABLE` or in `allow`: comma-separated keys or
    globs, `train.allow_changes`); raises ConfigMismatchError listing every other change with
    both values and the two ways out. `defaults` (the trainer's `default_config()`): a key the
    checkpoint's config lacks (it was written before the key existed) whose new value is its
    default is no change, since the default keeps what that version did.
    """
    if isinstance(allow, str):
        allow = tuple(a.strip() for a in allow.split(",") if a.strip())
    changes = config_changes(saved, new)
    if defaults is not None:
        known = traverse_util.flatten_dict(json.loads(json.dumps(_as_dict(defaults), default=str)), sep=".")
        changes = [c for c in changes if not (c[1] == _ABSENT and c[0] in known and known[c[0]] == c[2])]
    refused = [c for c in changes if not _matches(c[0], RESUMABLE + tuple(allow))]
    if refused:
        lines = "\n".join(f"  {k}: {json.dumps(a, default=str)} in the checkpoint, now {json.dumps(b, default=str)}"
                          for k, a, b in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigMismatchError(
            f"cannot resume from step {step} in {directory}: the config differs from the checkpoint's in "
            f"{len(refused)} key(s) that change what is trained:\n{lines}\n"
            f"Resume with the checkpoint's values (its config is in {directory}/{step}/config), use a new "
            f"--workdir for a new run, or accept the change with --config.train.allow_changes={keys}")
    return [c for c in changes if c not in refused]


def _trainer_defaults(objective) -> dict | None:
    """`t2i_jax.train.<objective>.default_config()` as a dict, or None for an unknown objective."""
    if not isinstance(objective, str) or not objective.isidentifier():
        return None
    try:
        module = importlib.import_module(f"t2i_jax.train.{objective}")
    except ImportError:
        return None
    make = getattr(module, "default_config", None)
    return _as_dict(make()) if callable(make) else None


def _short(e: BaseException, head: int = 120, tail: int = 280) -> str:
    # The start and the end of a long message: tensorstore puts the cause (the OS error) last.
    text = " ".join(str(e).split())
    if len(text) > head + tail:
        text = f"{text[:head]} ... {text[-tail:]}"
    return f"{type(e).__name__}: {text}"


class Checkpointer:
    """Saves and restores (state, data iterator, config) at integer steps."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})
        self._last_saved = None  # an async save may not be listed in all_steps() yet
        self._pending = None  # the step of an asynchronous save not yet known to be complete

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config) -> bool:
        """Saves (asynchronously, when enabled) unless `step` is already saved; True if it saved.

        The device->host copy of `state` happens before this returns, so the
        caller may donate `state` to the next step right away.
        """
        if step == self._last_saved or step in self.manager.all_steps():
            return False
        self.check()
        self._last_saved = step
        cfg = _as_dict(config)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(cfg)), force=True)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._pending = step
        log.info("checkpoint %d %s in %s", step, "saving" if saved else "skipped", self.directory)
        return saved

    def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
        done = [s for s in self.manager.all_steps() if s != step]
        last = f"step {max(done)}" if done else "none"
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} in {self.directory} failed ({_short(e)}). The last complete "
            f"checkpoint is {last}; it is kept. Free disk space (or lower train.max_to_keep) and rerun the same "
            f"command to resume from it.")

    def check(self) -> None:
        """Raises CheckpointSaveError if an earlier asynchronous save failed (non-blocking)."""
        if self._pending is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._save_error(step, e) from e

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores the state (onto the shardings of `abstract_state`'s ShapeDtypeStructs) and,
        if given, moves `data_iterator` to the saved position. Returns the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"the checkpoint of step {step} in {self.directory} does not fit this run's state ({_short(e)}). "
                f"A config change accepted with train.allow_changes changed the model's structure or shapes; "
                f"resume with the checkpoint's config, or start a new run in another --workdir") from e
        return restored["state"]

    def restore_config(self, step: int | None = None) -> dict:
        """The config saved with a checkpoint (a dict)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def processes_of(self, step: int) -> int | None:
        """How many processes wrote the data-iterator state of checkpoint `step` (None if unknown)."""
        found = [re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name)
                 for p in (self.directory / str(step) / "data").glob("process_*-of-*.json")]
        counts = {int(m.group(1)) for m in found if m}
        return counts.pop() if len(counts) == 1 else None

    def check_resume(self, config, step: int) -> list:
        """Before restoring checkpoint `step` with `config`: the process count must be the one that
        wrote it, and the config may differ from the saved one only as `check_resume` allows.
        Returns the allowed changes (logged)."""
        n, m = self.processes_of(step), jax.process_count()
        if n is not None and n != m:
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} was written by {n} process(es); this run has {m}. "
                f"The data loader's position is saved per process: resume with {n} process(es), or start a new "
                f"run in another --workdir")
        new = _as_dict(config)
        allow = new.get("train", {}).get("allow_changes", "")
        changes = check_resume(self.restore_config(step), new, step=step, directory=self.directory, allow=allow,
                               defaults=_trainer_defaults(new.get("objective")))
        for k, a, b in changes:
            log.info("resume: %s changed from %s to %s", k, json.dumps(a, default=str), json.dumps(b, default=str))
        return changes

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; raises CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._save_error(self._last_saved if step is None else step, e) from e
        self.check()
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class StopSignal:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the train loop polls.

    Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM some seconds
    before killing a job; the loop saves a checkpoint at its current step and
    returns. A first Ctrl-C does the same; a second one interrupts at once
    (Python's KeyboardInterrupt, no save). A context manager: the previous
    handlers come back on exit.
    Across hosts, the flag is combined with a cross-process max so that all
    processes stop (and save) at the same step.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self._flag = threading.Event()
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
            log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to abort "
                        "without saving)")
        else:
            log.warning("received %s: saving a checkpoint after this step, then stopping",
                        signal.Signals(signum).name)
        self._flag.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    def set(self) -> None:
        """Requests a stop (as the signal would)."""
        self._flag.set()

    def requested(self, collective: bool = True) -> bool:
        """Whether a stop was requested. With one process: this process's flag (free, every
        step). With several: whether any process received one, combined across processes only
        when `collective` (a blocking all-gather, so the loop asks every few steps, at the same
        steps on every process); otherwise False, so that all processes stop together."""
        mine = self._flag.is_set()
        if jax.process_count() == 1:
            return mine
        if not collective:
            return False
        import numpy as np
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.int32(mine)).max())
