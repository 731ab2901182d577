"""One orbax CheckpointManager per run, and saving on SIGTERM.

Layout of `workdir/checkpoints/<step>/`:

    state/    the TrainState (params, opt_state, ema_params, step, rng), sharded
              arrays written by every process (orbax StandardCheckpointHandler)
    data/     the grain iterator position, process_<i>-of-<n>.json per host
    config/   the run's config as JSON (to see what a checkpoint was trained with)

A step folder appears only once complete (orbax writes to a temporary name and
renames), so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "StopSignal"]

log = logging.getLogger(__name__)


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
        self._last_saved = step
        cfg = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(cfg)), force=True)
        log.info("checkpoint %d %s in %s", step, "saving" if saved else "skipped", self.directory)
        return saved

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores the state (onto the shardings of `abstract_state`'s ShapeDtypeStructs) and,
        if given, moves `data_iterator` to the saved position. Returns the state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_config(self, step: int | None = None) -> dict:
        """The config saved with a checkpoint (a dict)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopSignal:
    """Turns SIGTERM (and SIGINT, optionally) into a flag the train loop polls.

    Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM some seconds
    before killing a job; the loop saves a checkpoint at its current step and
    returns. A context manager: the previous handlers come back on exit.
    Across hosts, the flag is combined with a cross-process max so that all
    processes stop (and save) at the same step.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._flag = threading.Event()
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping after this step", signum)
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
        from jax.experimental import multihost_utils
        import numpy as np
        return bool(multihost_utils.process_allgather(np.int32(mine)).max())
