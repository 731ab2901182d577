"""Stage 2 of the bundled model (t2i_jax/assets/shapes_model): the CLIP whose text tower conditions the U-Net.

    python -m t2i_jax.train --config configs/bundled_clip.py --workdir runs/bundled/clip

configs/clip_shapes.py (tiny CLIP, 64 wide, 16 tokens, contrastive on synthetic
shapes at 32 px) with 4x4 instead of 8x8 image patches and 4000 steps instead of
300; only its text tower is kept. The whole recipe is scripts/train_bundled_model.sh.

Why: with 8x8 patches and 300 steps the image tower barely tells a circle from a
square, so neither does the text tower: its final states for "a small red circle
on a blue background" and "... square ..." differed by 3-8% (relative L2 per
token), against 70-150% for a change of either colour, and the U-Net trained on it
could not follow shape words. With 4x4 patches and 4000 steps (~6 min on 2 CPU
cores) the shape token's state moves 50-76%, and held-out text->image recall@1
rises from 64% to 98%.
"""

import importlib.util
from pathlib import Path


def _base():
    spec = importlib.util.spec_from_file_location("clip_shapes", Path(__file__).with_name("clip_shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg=None):
    c = _base().get_config(arg)
    c.model.overrides.vision_config.patch_size = 4
    c.train.steps = 4000
    c.train.checkpoint_every = 4000
    return c
