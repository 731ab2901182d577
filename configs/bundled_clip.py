"""Stage 2 of the bundled model (t2i_jax/assets/shapes_model): the CLIP whose text tower conditions the U-Net.

    python -m t2i_jax.train --config configs/bundled_clip.py --workdir runs/bundled/clip

configs/clip_shapes.py as it is (tiny CLIP, 64 wide, 16 tokens, 300 steps, contrastive on
synthetic shapes at 32 px); only its text tower is kept. The whole recipe is
scripts/train_bundled_model.sh.
"""

import importlib.util
from pathlib import Path


def _base():
    spec = importlib.util.spec_from_file_location("clip_shapes", Path(__file__).with_name("clip_shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    return _base().get_config(arg)
