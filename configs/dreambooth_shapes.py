"""DreamBooth on the bundled shapes model (CPU-sized): teach "sks green" as teal, a colour it never saw.

    python configs/dreambooth_shapes.py runs/sks_circles      # writes 6 instance images (teal circles)
    python -m t2i_jax.train --config configs/dreambooth_shapes.py:runs/sks_circles --workdir runs/db_shapes
    python -m t2i_jax.sample --model runs/db_shapes/export --prompt "a large sks green circle on a white background" \
        --steps 25 --out out/

The argument is the instance folder. The subject is a teal circle (teal is not
one of the shapes palette's colours) under "a large sks green circle on a white
background"; its class is the green circle the model knows: with prior
preservation 32 class images of "a large green circle on a white background"
are sampled once from the bundled model (PNDM, 25 steps, guidance 7.5) into
<workdir>/class_images, and every batch of 8 holds 4 of each. Latents and text
states are cached (cache.enabled), as the text encoder and VAE stay frozen. As
diffusers' train_dreambooth.py: no caption dropout, no EMA, no min-SNR
weighting, prior_loss_weight 1.0. 400 steps at lr 5e-4 (8 min on a loaded 2-core
CPU): the instance prompt's shapes become circles (0% -> 100%) and 12.5% teal (0%
before), the class prompt stays 100% green circles (configs/README.md).
"""

from pathlib import Path

import ml_collections

from t2i_jax.train import ldm

BUNDLED_MODEL = str(Path(ldm.__file__).resolve().parents[1] / "assets" / "shapes_model")
TEAL = (0, 128, 128)
INSTANCE_PROMPT = "a large sks green circle on a white background"
CLASS_PROMPT = "a large green circle on a white background"


def write_instance_images(folder, num: int = 6, resolution: int = 32, seed: int = 0) -> list[Path]:
    """Writes `num` PNGs of a large teal circle on white, at seeded positions, into `folder`."""
    import numpy as np
    from PIL import Image

    from t2i_jax.data import shapes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    half = shapes.SIZES["large"] * resolution / 2
    paths = []
    for i in range(num):
        center = tuple(rng.uniform(half + 1, resolution - half - 1, size=2))
        img = shapes.render("circle", "black", "large", "white", center, resolution)
        img[(img == shapes.COLORS["black"]).all(-1)] = TEAL
        paths.append(folder / f"sks_{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def get_config(arg=None):
    c = ldm.default_config()
    c.model.init_from = BUNDLED_MODEL
    c.data = ml_collections.ConfigDict({"resolution": 32, "seed": 0})
    db = c.dreambooth
    db.enabled = True
    db.instance_images = arg or ""
    db.instance_prompt = INSTANCE_PROMPT
    db.class_prompt = CLASS_PROMPT
    db.prior_preservation = True
    db.prior_loss_weight = 1.0
    db.num_class_images = 32
    db.class_steps = 25
    db.class_guidance_scale = 7.5
    db.class_scheduler = "pndm"
    db.class_batch_size = 16
    c.cache.enabled = True
    c.batch_size = 8
    c.train.steps = 400
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 10
    c.ema_decay = 0.0
    c.diffusion.caption_dropout = 0.0
    c.diffusion.snr_gamma = 0.0
    c.eval.every = 0
    c.eval.prompts = [INSTANCE_PROMPT, CLASS_PROMPT, "a small sks green circle on a black background"]
    c.eval.steps = 25
    c.eval.scheduler = "pndm"
    c.eval.guidance_scale = 7.5
    return c


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python configs/dreambooth_shapes.py FOLDER  (writes the instance images there)")
    for p in write_instance_images(sys.argv[1]):
        print(p)
