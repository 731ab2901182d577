"""Stage 3 of the bundled model (t2i_jax/assets/shapes_model): the text-conditional U-Net.

    python -m t2i_jax.train --config configs/bundled_ldm.py:vae=runs/bundled/vae/export,text=runs/bundled/clip/export --workdir runs/bundled/ldm

configs/shapes_ldm.py (tiny U-Net from scratch on the frozen bundled_vae VAE and
bundled_clip text tower, 32 px, eps-prediction, min-SNR 5, EMA) with a larger cached
training set (4096 records instead of 512, so every one of the 420 training
attribute combinations is seen in several positions), 3200 steps (constant lr 1e-3 after
warm-up; ~21 min on 2 CPU cores) and no intermediate sample grids.
The whole recipe is scripts/train_bundled_model.sh.
"""

import importlib.util
from pathlib import Path


def _base():
    spec = importlib.util.spec_from_file_location("shapes_ldm", Path(__file__).with_name("shapes_ldm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    c = _base().get_config(arg)
    c.data.length = 4096
    c.train.steps = 3200
    c.train.checkpoint_every = 1000
    c.eval.every = 0
    return c
