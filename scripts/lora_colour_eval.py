"""Prompt adherence of the bundled shapes model with and without a LoRA taught a new colour word.

    python -m t2i_jax.train --config configs/lora_shapes.py --workdir runs/lora_teal
    python scripts/lora_colour_eval.py runs/lora_teal/export/pytorch_lora_weights.safetensors

Samples N prompts with the new colour (`shapes.EXTRA_COLORS`, shapes drawn on the palette's
backgrounds) and N of the original domain (the "eval" split: combinations the model was
trained on, fresh images), seed i for prompt i, with the base model and with the LoRA, and
scores them with `t2i_jax.eval.adherence` (the new colour joins the palette only for its own
prompts). Prints the table and writes it as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from t2i_jax import pipeline, sample
from t2i_jax.convert.load import load_components
from t2i_jax.convert.lora import apply_adapters
from t2i_jax.data.shapes import ShapesSource
from t2i_jax.eval import adherence


def prompt_sets(n: int, color: str = "teal", seed: int = 1234) -> dict[str, list[str]]:
    """{"new": n captions of `color` shapes, "original": n captions of the eval split}."""
    new = ShapesSource(32, split="eval", seed=seed, colors=[color])
    orig = ShapesSource(32, split="eval", seed=seed)
    return {"new": [new[i]["captions"][0] for i in range(n)], "original": [orig[i]["captions"][0] for i in range(n)]}


def run(lora_file: str, n: int = 50, steps: int = 50, guidance_scale: float = 7.5, color: str = "teal",
        models=("base", "lora"), weight: float = 1.0) -> dict:
    """{"base" | "lora": {"new" | "original": AdherenceReport}} on `prompt_sets(n)`."""
    base = load_components(sample.BUNDLED_MODEL)
    mesh = pipeline.make_mesh(devices=jax.devices()[:1])
    prompts = prompt_sets(n, color)
    out = {}
    for name in models:
        pipe = base if name == "base" else apply_adapters(base, loras=[(lora_file, weight)])
        sampler = pipeline.Sampler(pipe, mesh=mesh)
        out[name] = {}
        for which, ps in prompts.items():
            images = np.asarray(sampler(ps, seeds=list(range(len(ps))), steps=steps, guidance_scale=guidance_scale,
                                        scheduler="pndm", height=32, width=32))
            out[name][which] = adherence.evaluate(images, ps, extra_colors=[color] if which == "new" else ())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lora", help="the LoRA file (diffusers or kohya safetensors)")
    p.add_argument("--n", type=int, default=50, help="prompts per set")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--color", default="teal")
    p.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight (1.0: as trained)")
    p.add_argument("--models", default="base,lora", help="which to sample: base, lora or both")
    p.add_argument("--json", help="write the accuracies here")
    args = p.parse_args(argv)
    res = run(args.lora, args.n, args.steps, args.guidance_scale, args.color, tuple(args.models.split(",")),
              args.weight)
    table = {f"{m} / {w}": r for m, d in res.items() for w, r in d.items()}
    print(adherence.format_adherence_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: r.accuracy for k, r in table.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
