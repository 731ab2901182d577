"""Which colours the bundled model's frozen VAE can give back: encode a square of each colour on
each palette background, decode the posterior mean, and print the colour of the square's core.

    python scripts/vae_colour_check.py [--model t2i_jax/assets/shapes_model] [--json out.json]

A latent-diffusion model draws only what its VAE decodes: the U-Net is trained to produce the
VAE's latents of the training images, so a colour the VAE does not reproduce cannot be taught to
the U-Net or the text encoder (LoRA, DreamBooth) at all. The last column names the nearest
colour in Lab among the palette (`shapes.COLORS`) and the probed colour itself.
`scripts/lora_teal_base.py` scores the round trip of real teal shapes and teaches the encoder teal.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from t2i_jax.convert.load import load_components
from t2i_jax.data import shapes
from t2i_jax.eval import adherence

PROBES: dict[str, tuple[int, int, int]] = {
    **shapes.EXTRA_COLORS, "pink": (255, 120, 190), "cyan": (0, 220, 230), "gray": (128, 128, 128),
    "brown": (120, 70, 20), "lime": (160, 240, 0), "navy": (10, 10, 110), "sky": (120, 190, 250)}
BACKGROUNDS = ("white", "black", "red", "blue", "yellow")


def _nearest(rgb, candidates: dict) -> str:
    lab = adherence.srgb_to_lab(np.asarray(rgb, np.float64))
    return min(candidates, key=lambda n: float(np.linalg.norm(adherence.srgb_to_lab(np.asarray(candidates[n])) - lab)))


def check(model: str) -> dict:
    """{probe: [(background, decoded core RGB, nearest name), ...]} for the VAE of `model`."""
    pipe = load_components(model)
    vae, params = pipe.vae, {"params": pipe.params["vae"]}
    res = 32
    lo, hi = res // 4, 3 * res // 4
    out = {}
    for name, rgb in PROBES.items():
        images = np.zeros((len(BACKGROUNDS), res, res, 3), np.float32)
        for i, bg in enumerate(BACKGROUNDS):
            images[i] = shapes.COLORS[bg]
            images[i, lo:hi, lo:hi] = rgb
        z = vae.apply(params, images / 127.5 - 1, method=vae.encode).mean
        rec = np.asarray((jnp.clip(vae.apply(params, z, method=vae.decode), -1, 1) + 1) * 127.5)
        core = rec[:, lo + 4:hi - 4, lo + 4:hi - 4].reshape(len(BACKGROUNDS), -1, 3).mean(1)
        out[name] = [(bg, [round(float(v)) for v in c], _nearest(c, {**shapes.COLORS, name: rgb}))
                     for bg, c in zip(BACKGROUNDS, core)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="t2i_jax/assets/shapes_model", help="the model whose VAE is probed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    result = check(args.model)
    print(f"| colour (RGB) | decoded core on {', '.join(BACKGROUNDS)} (nearest in Lab) |")
    print("|---|---|")
    for name, rows in result.items():
        cells = "; ".join(f"{tuple(c)} {near}" for _, c, near in rows)
        print(f"| {name} {PROBES[name]} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
