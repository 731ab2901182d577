"""Stage 1 of the bundled model (t2i_jax/assets/shapes_model): shapes_vae, shortened to fit a CPU budget.

    python -m t2i_jax.train --config configs/bundled_vae.py --workdir runs/bundled/vae

Same model, data and loss as configs/shapes_vae.py (tiny AutoencoderKL, 32 px -> 16x16x4
latents, L1 + 1e-6 KL), 1200 steps instead of 1000 (~10 min on 2 CPU cores). Shorter runs
blur the small shapes (6 px at 32 px): after 400 steps, the shape of 44 of 67 small ones in
200 held-out reconstructions could no longer be told from its pixels (t2i_jax.eval.adherence).
The whole recipe is scripts/train_bundled_model.sh.
"""

import importlib.util
from pathlib import Path


def _base():
    spec = importlib.util.spec_from_file_location("shapes_vae", Path(__file__).with_name("shapes_vae.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    c = _base().get_config(arg)
    c.train.steps = 1200
    c.train.checkpoint_every = 400
    return c
