"""A run's folder: config.json and the checkpoint manager, new or resumed (`open_run`, which checks a
resume's config against the checkpoint's)."""

from __future__ import annotations

from pathlib import Path

import jax

from t2i_jax.files import atomic_write
from t2i_jax.train.checkpoint import Checkpointer


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
        text = (config.to_json_best_effort(indent=2) + "\n").encode()
        atomic_write(workdir / "config.json", lambda f: f.write(text))
    return workdir, is_main, ckpt, latest
