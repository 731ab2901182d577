"""A run's folder: config.json and the checkpoint manager, new or resumed (`open_run`)."""

from __future__ import annotations

from pathlib import Path

import jax

from t2i_jax.train.checkpoint import Checkpointer


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
