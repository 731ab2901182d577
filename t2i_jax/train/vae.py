"""VAE (AutoencoderKL) training from scratch: reconstruction + KL, optional PatchGAN.

    python -m t2i_jax.train --config configs/shapes_vae.py --workdir runs/shapes_vae

Generator loss: L1 or L2 reconstruction (mean per pixel) of a posterior
sample, plus `kl_weight` x KL(posterior || N(0, I)) (summed over latent
elements, mean over the batch), plus, from step `disc.start` on,
`disc.weight` x the hinge generator loss -mean D(recon) of a small PatchGAN
discriminator, which is trained with the hinge loss
mean relu(1 - D(real)) + mean relu(1 + D(fake)). Both param sets sit in one
TrainState (`params = {"vae", ["disc"]}`), each updated from its own loss
by one AdamW.

Eval (before and after): reconstruction PSNR of the posterior mean on a
held-out split (`eval_before.json`, `eval_after.json`, and in metrics.jsonl
as `eval/psnr`). Export: `workdir/export/vae/` (a diffusers AutoencoderKL
folder) whose `scaling_factor` is 1 / std of the held-out latents, as SD
chose its 0.18215, so the U-Net sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from t2i_jax import data as data_lib
from t2i_jax import parallel
from t2i_jax.convert import diffusers as diffusers_convert
from t2i_jax.models import vae as vae_lib
from t2i_jax.train import common
from t2i_jax.train import state as state_lib
from t2i_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)

PARTITION_RULES = ((r".*", "fsdp"),)


# ===========================================================================
# Config
# ===========================================================================

def default_config() -> ml_collections.ConfigDict:
    """Every key this trainer reads, with defaults; a config file changes what it needs."""
    c = common.base_config()  # seed, data, batch_size, train, optim, ema_decay, mesh, export, progress
    c.objective = "vae"
    c.model = ml_collections.ConfigDict()
    c.model.name = "tiny"  # a VAEConfig.named variant ...
    c.model.overrides = ml_collections.ConfigDict()  # ... with these VAEConfig fields changed
    c.model.dtype = "float32"
    c.loss = ml_collections.ConfigDict()
    c.loss.reconstruction = "l1"  # "l1" or "l2"
    c.loss.kl_weight = 1e-6
    c.disc = ml_collections.ConfigDict()
    c.disc.enabled = False  # PatchGAN discriminator with hinge loss
    c.disc.start = 1000  # generator and discriminator GAN losses count from this step on
    c.disc.weight = 0.1  # generator's GAN-loss weight
    c.disc.channels = 32  # first conv width (doubles per layer)
    c.disc.layers = 2  # stride-2 convs
    c.optim.lr = 1e-3
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 50
    c.optim.end_lr_factor = 0.1
    c.ema_decay = 0.0
    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True  # PSNR before and after training
    c.eval.data = ml_collections.ConfigDict()  # the held-out source (a data config)
    c.eval.num_images = 256
    c.eval.batch_size = 64
    c.eval.use_ema = False
    return c


# ===========================================================================
# Data
# ===========================================================================

def make_data(config):
    """(per-host train loader, held-out images [N, R, R, 3] in [-1, 1] or None)."""
    dcfg = {k: v for k, v in config.data.to_dict().items() if v != ""}
    dcfg["global_batch_size"] = config.batch_size
    source = data_lib.source_from_config(dcfg)
    loader = data_lib.make_loader(source, global_batch_size=config.batch_size, resolution=dcfg["resolution"],
                                  **common.loader_kwargs(dcfg))
    held_out = None
    if config.eval.enabled and config.eval.data:
        esrc = data_lib.source_from_config({"resolution": dcfg["resolution"], **config.eval.data.to_dict()})
        held_out = common.make_eval_set(esrc, config.eval.num_images, dcfg["resolution"], None)["image"]
    return loader, held_out


# ===========================================================================
# Model
# ===========================================================================

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): stride-2 4x4 convs with LeakyReLU(0.2), then a 1-channel
    4x4 conv: one real/fake logit per overlapping patch, [B, h, w]."""

    channels: int = 32
    layers: int = 2

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train
        x = x.astype(jnp.float32)
        for i in range(self.layers):
            x = nn.Conv(self.channels * 2 ** i, (4, 4), strides=(2, 2), padding=1, name=f"conv_{i}")(x)
            if i:  # no norm on the first layer, as pix2pix; GroupNorm (batch-independent) after
                x = nn.GroupNorm(num_groups=min(32, self.channels * 2 ** i // 4), name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return nn.Conv(1, (3, 3), padding=1, name="conv_out")(x)[..., 0]


def make_vae(config) -> vae_lib.AutoencoderKL:
    cfg = vae_lib.VAEConfig.named(config.model.name)
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.overrides.to_dict().items()}
    cfg = dataclasses.replace(cfg, sample_size=int(config.data.resolution), **over)
    return vae_lib.AutoencoderKL(cfg, dtype=jnp.dtype(config.model.dtype))


def init_params(vae, disc, config, key):
    side = int(config.data.resolution)
    x = jnp.zeros((1, side, side, vae.config.in_channels))
    k1, k2 = jax.random.split(key)
    params = {"vae": vae.init(k1, x)["params"]}
    if disc is not None:
        params["disc"] = disc.init(k2, x)["params"]
    return params


def psnr(recon, images):
    """Per-image PSNR in dB of [-1, 1] images, measured on [0, 1] (peak 1)."""
    a = jnp.clip(recon, -1.0, 1.0) / 2 + 0.5
    b = images / 2 + 0.5
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


# ===========================================================================
# Step
# ===========================================================================

def make_train_step(vae, disc, tx, schedule, config, mesh, state_shardings):
    """The jitted `(state, batch) -> (state, metrics)`; the state is donated."""
    l1 = config.loss.reconstruction == "l1"
    if config.loss.reconstruction not in ("l1", "l2"):
        raise ValueError(f"loss.reconstruction {config.loss.reconstruction!r}: use 'l1' or 'l2'")

    def train_step(state, batch):
        rng, k_z = jax.random.split(state.rng)
        x = batch["image"]
        gan_on = (state.step >= config.disc.start).astype(jnp.float32) if disc is not None else 0.0

        def gen_loss(vae_params):
            post = vae.apply({"params": vae_params}, x, method=vae.encode)
            recon = vae.apply({"params": vae_params}, post.sample(k_z), method=vae.decode)
            err = jnp.abs(recon - x) if l1 else jnp.square(recon - x)
            rec, kl = jnp.mean(err), jnp.mean(post.kl())
            loss = rec + config.loss.kl_weight * kl
            aux = {"rec_loss": rec, "kl": kl}
            if disc is not None:
                g = -jnp.mean(disc.apply({"params": state.params["disc"]}, recon))
                loss = loss + gan_on * config.disc.weight * g
                aux["g_loss"] = g
            return loss, (aux, recon)

        (loss, (aux, recon)), g_vae = jax.value_and_grad(gen_loss, has_aux=True)(state.params["vae"])
        grads = {"vae": g_vae}
        if disc is not None:
            fake = jax.lax.stop_gradient(recon)

            def disc_loss(dp):
                real_logits = disc.apply({"params": dp}, x)
                fake_logits = disc.apply({"params": dp}, fake)
                return gan_on * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))

            d_loss, grads["disc"] = jax.value_and_grad(disc_loss)(state.params["disc"])
            aux["d_loss"] = d_loss
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = state_lib.ema_update(ema, params, config.ema_decay)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, rng=rng)
        return new, {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **aux}

    batch_sh = parallel.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, {"image": batch_sh}),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))


# ===========================================================================
# Checkpoint (see train/checkpoint.py); export
# ===========================================================================

def export(vae, params, latent_std: float, out_dir: Path) -> Path:
    """`out_dir/vae/` (diffusers AutoencoderKL) with scaling_factor = 1 / latent_std."""
    cfg = dataclasses.replace(vae.config, scaling_factor=float(1.0 / max(latent_std, 1e-6)))
    return diffusers_convert.save_vae(jax.tree_util.tree_map(np.asarray, params), cfg, out_dir / "vae")


# ===========================================================================
# Eval
# ===========================================================================

def make_evaluator(vae, mesh, vae_shardings, images: np.ndarray, batch_size: int):
    """`vae params -> {"psnr", "latent_std", "num_images"}` on the held-out images (posterior mean)."""
    n_dev = mesh.devices.size
    bs = max(n_dev, -(-batch_size // n_dev) * n_dev)
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def f(params, x):
        recon, post = vae.apply({"params": params}, x)
        return psnr(recon, x), post.mean

    fn = jax.jit(f, in_shardings=(vae_shardings, batch_sh), out_shardings=(rep, rep))

    def evaluate(params):
        scores, latents = [], []
        for i in range(0, len(images), bs):
            chunk = images[i:i + bs]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), 0)]) if len(chunk) < bs else chunk
            arr = jax.make_array_from_callback(pad.shape, batch_sh, lambda idx, pad=pad: pad[idx])
            s, z = jax.device_get(fn(params, arr))
            scores.append(s[:len(chunk)])
            latents.append(z[:len(chunk)])
        return {"psnr": float(np.mean(np.concatenate(scores))),
                "latent_std": float(np.std(np.concatenate(latents))), "num_images": int(len(images))}

    return evaluate


# ===========================================================================
# Loop
# ===========================================================================

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains a VAE per `config` in `workdir` (resuming from its latest checkpoint), evaluates, exports.

    Returns {"step", "stopped", "eval_before", "eval_after", "state"}. Raises FloatingPointError
    on a non-finite loss or grad norm.
    """
    workdir, is_main, ckpt, start = common.open_run(config, workdir)

    # --- model, data -------------------------------------------------------
    vae = make_vae(config)
    disc = PatchDiscriminator(config.disc.channels, config.disc.layers) if config.disc.enabled else None
    loader, held_out = make_data(config)
    total_steps = int(config.train.steps)
    if total_steps <= 0:
        total_steps = math.ceil(config.train.epochs * len(loader.source) / config.batch_size)
    tx, schedule = state_lib.make_optimizer(
        ml_collections.ConfigDict({**config.optim.to_dict(), "total_steps": total_steps}))

    # --- sharding ----------------------------------------------------------
    mesh = common.make_run_mesh(config)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {n_dev} devices")
    ema = config.ema_decay > 0
    init = lambda params: state_lib.create_state(params, tx, ema=ema, seed=config.seed)  # noqa: E731
    abstract_state = jax.eval_shape(lambda k: init(init_params(vae, disc, config, k)), jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(abstract_state, PARTITION_RULES, mesh, config.mesh.fsdp_min_size)

    # --- checkpoint: resume or start -------------------------------------------
    it = iter(loader)
    if start is not None:
        state = common.resume(ckpt, start, abstract_state, shardings, it)
    else:
        start = 0
        state = jax.jit(lambda k: init(init_params(vae, disc, config, k)), out_shardings=shardings)(
            jax.random.PRNGKey(config.seed))

    # --- eval before -------------------------------------------------------
    evaluate, results = None, {}
    if held_out is not None:
        evaluate = make_evaluator(vae, mesh, shardings.params["vae"], held_out, config.eval.batch_size)
        before_path = workdir / "eval_before.json"
        if start == 0:
            results["before"] = evaluate(state.params["vae"])
            if is_main:
                before_path.write_text(json.dumps(results["before"], indent=2) + "\n")
        elif before_path.exists():
            results["before"] = json.loads(before_path.read_text())

    # --- loop --------------------------------------------------------------
    train_step = make_train_step(vae, disc, tx, schedule, config, mesh, shardings)
    writer = MetricWriter(workdir, enabled=is_main)
    if "before" in results and start == 0:
        writer.write(0, {"eval/psnr": results["before"]["psnr"]})
    stopped = None
    try:
        with common.LoopControl(config, ckpt, writer, it, start=start, total_steps=total_steps, n_devices=n_dev,
                                desc="vae", is_main=is_main, postfix=("loss",)) as loop:
            for step in range(start, total_steps):
                batch = {"image": next(it)["image"]}
                if step + 1 == config.train.debug_nan_step:
                    batch["image"] = np.full_like(batch["image"], np.nan)
                state, metrics = train_step(state, parallel.host_to_global(batch, mesh))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                stopped = loop.after_step(step + 1, state, metrics)
                if stopped:
                    break
    finally:
        ckpt.close()
    final_step = int(jax.device_get(state.step))

    # --- eval after, export ----------------------------------------------------
    try:
        if stopped is None:
            params = (state.ema_params if (ema and config.eval.use_ema) else state.params)["vae"]
            if evaluate is not None:
                results["after"] = evaluate(params)
                writer.write(final_step, {"eval/psnr": results["after"]["psnr"]})
                if is_main:
                    (workdir / "eval_after.json").write_text(json.dumps(results["after"], indent=2) + "\n")
                    print(f"VAE reconstruction PSNR on {results['after']['num_images']} held-out images: "
                          f"{results.get('before', {}).get('psnr', float('nan')):.2f} dB -> "
                          f"{results['after']['psnr']:.2f} dB")
            if config.export:
                host = common.to_host(params)
                if is_main:
                    std = results["after"]["latent_std"] if "after" in results else 1.0 / vae.config.scaling_factor
                    export(vae, host, std, workdir / "export")
    finally:
        writer.close()
    return {"step": final_step, "stopped": stopped, "eval_before": results.get("before"),
            "eval_after": results.get("after"), "state": state}
