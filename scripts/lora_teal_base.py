"""The bundled model with its VAE encoder taught a colour it never saw: the base a LoRA for that colour trains on.

    python scripts/lora_teal_base.py runs/lora_teal/base
    python -m t2i_jax.train --config configs/lora_shapes.py:base=runs/lora_teal/base --workdir runs/lora_teal

Why: the bundled VAE was trained on the eight palette colours only. Its encoder
maps a teal shape to the latents of a green one (encode + decode of teal
shapes: 41% still teal by `t2i_jax.eval.adherence`, the rest green), while
its decoder can draw teal (latents optimised through the frozen decoder:
100% teal). A U-Net trained on the encoder's latents of teal images learns to
draw green-teal shapes, whatever its adapters.

What: the encoder (and `quant_conv`) alone are fine-tuned on the LoRA run's own
records (`configs/lora_shapes.py`: the same few dozen teal images and the
palette ones), the decoder frozen: teal images must come back through the
frozen decoder, palette images must keep the posterior (mean and std) the
bundled encoder gives them, so the U-Net sees the latents it was trained on for
the colours it knows. The folder written is the bundled model with that VAE
(the U-Net, text encoder, tokenizer and scheduler unchanged). Training reads
latents through the encoder; sampling uses the decoder alone, which is the
bundled one, so the LoRA trained on this base runs on the bundled model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t2i_jax import sample
from t2i_jax.convert.load import load_components
from t2i_jax.data.shapes import EXTRA_COLORS, ShapesSource
from t2i_jax.eval import adherence
from t2i_jax.train.export import export_pipeline

log = logging.getLogger(__name__)

TRAINED = ("encoder", "quant_conv")  # VAE param groups the fine-tune changes; the decoder stays frozen


def _images(records) -> np.ndarray:
    return np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0


def round_trip_accuracy(vae, params, color: str = "teal", n: int = 32, seed: int = 1234) -> float:
    """Shape-colour adherence of encode (posterior mean) + decode on `n` eval-split `color` shapes."""
    src = ShapesSource(32, split="eval", seed=seed, colors=[color])
    recs = [src[i] for i in range(n)]
    z = vae.apply({"params": params}, jnp.asarray(_images(recs)), method=vae.encode).mean
    y = np.clip((np.asarray(vae.apply({"params": params}, z, method=vae.decode)) + 1) / 2, 0, 1)
    rep = adherence.evaluate(y, [r["captions"][0] for r in recs], extra_colors=[color])
    return float(rep.accuracy["color"])


def teach_encoder(vae, params: dict, records, color: str = "teal", steps: int = 150, lr: float = 1e-4,
                  batch_size: int = 16, seed: int = 0, anchor: float = 0.0) -> dict:
    """VAE `params` with the encoder fine-tuned as the module docstring says, on `records` (shapes
    records: those in `color` are reconstructed, the others keep their posterior)."""
    if color not in EXTRA_COLORS:
        raise ValueError(f"color {color!r}: the encoder is taught one of shapes.EXTRA_COLORS {list(EXTRA_COLORS)}")
    new = _images([r for r in records if r["color"] == color])
    old = _images([r for r in records if r["color"] != color])
    if not len(new) or not len(old):
        raise ValueError(f"{len(new)} {color} and {len(old)} palette records: the fine-tune needs both "
                         "(data.colors names the new colour and the palette)")

    def moments(p, x):
        post = vae.apply({"params": p}, x, method=vae.encode)
        return post.mean, post.std

    frozen = {k: v for k, v in params.items() if k not in TRAINED}
    trained = {k: v for k, v in params.items() if k in TRAINED}
    old_mean, old_std = jax.jit(moments)(params, jnp.asarray(old))
    new_mean0 = jax.jit(moments)(params, jnp.asarray(new))[0]

    def loss_fn(tr, x_new, m_new0, x_old, m_old, s_old):
        p = {**frozen, **tr}
        m_new = moments(p, x_new)[0]
        rec = vae.apply({"params": p}, m_new, method=vae.decode)
        m, s = moments(p, x_old)
        # anchor: how strongly the new colour's latents stay near where the bundled encoder put them
        # (latents the frozen U-Net can reach), against drawing it exactly.
        return (jnp.mean(jnp.square(rec - x_new)) + anchor * jnp.mean(jnp.square(m_new - m_new0))
                + jnp.mean(jnp.square(m - m_old)) + jnp.mean(jnp.square(s - s_old)))

    tx = optax.adam(lr)

    @jax.jit
    def step(tr, opt, x_new, m_new0, x_old, m_old, s_old):
        loss, g = jax.value_and_grad(loss_fn)(tr, x_new, m_new0, x_old, m_old, s_old)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss

    opt = tx.init(trained)
    rng = np.random.RandomState(seed)
    t0 = time.time()
    for i in range(steps):
        a = rng.randint(0, len(new), batch_size)
        b = rng.randint(0, len(old), batch_size)
        trained, opt, loss = step(trained, opt, new[a], new_mean0[a], old[b], old_mean[b], old_std[b])
        if i % 50 == 0 or i == steps - 1:
            log.info("encoder step %d: loss %.5f (%.0f s)", i, float(loss), time.time() - t0)
    return {**frozen, **jax.device_get(trained)}


def build_base(out: str | Path, config=None, steps: int = 150, lr: float = 1e-4, anchor: float = 0.0) -> dict:
    """Writes the bundled model with the taught encoder to `out` (a diffusers folder, fp16 as the
    bundled one) from `config`'s records (default `configs/lora_shapes.py`); returns the round-trip
    figures {"before", "after"} (teal shape colour of encode + decode)."""
    if config is None:
        config = _lora_shapes_config()
    pipe = load_components(sample.BUNDLED_MODEL)
    d = config.data
    src = ShapesSource(d.resolution, split=d.split, seed=d.seed, length=d.length, colors=tuple(d.colors))
    records = [src[i] for i in range(len(src))]
    color = next(c for c in d.colors if c in EXTRA_COLORS)
    before = round_trip_accuracy(pipe.vae, pipe.params["vae"], color)
    vae_params = teach_encoder(pipe.vae, pipe.params["vae"], records, color, steps=steps, lr=lr, seed=d.seed,
                               anchor=anchor)
    after = round_trip_accuracy(pipe.vae, vae_params, color)
    export_pipeline(dataclasses.replace(pipe, params={**pipe.params, "vae": vae_params}), out, dtype=np.float16)
    log.info("%s: %s round trip %.0f%% -> %.0f%% shape colour", out, color, 100 * before, 100 * after)
    return {"before": before, "after": after}


def _lora_shapes_config():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "configs" / "lora_shapes.py"
    spec = importlib.util.spec_from_file_location("lora_shapes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder to write (a diffusers pipeline)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--anchor", type=float, default=0.0, help="weight keeping the new colour's latents near the "
                   "bundled encoder's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = build_base(args.out, steps=args.steps, lr=args.lr, anchor=args.anchor)
    print(f"teal round trip (encode + decode) shape colour: {100 * res['before']:.0f}% -> {100 * res['after']:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
