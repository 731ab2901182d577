"""VAE (AutoencoderKL) training from scratch: reconstruction + KL, optional PatchGAN.

    python -m t2i_jax.train --config configs/shapes_vae.py --workdir runs/shapes_vae

Generator loss: L1 or L2 reconstruction (mean per pixel) of a posterior
sample, plus `kl_weight` x KL(posterior || N(0, I)) (summed over latent
elements, mean over the batch), plus, from step `disc.start` on,
`disc.weight` x the hinge generator loss -mean D(recon) of a small PatchGAN
discriminator, which is trained with the hinge loss
mean relu(1 - D(real)) + mean relu(1 + D(fake)). Both param sets sit in one
TrainState (`params = {"vae", ["disc"]}`), each updated from its own loss
by its own AdamW (`disc.lr`, `disc.grad_clip`), and `train.grad_accum`
micro-batches add up to exactly one batch.

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
from t2i_jax.train import config as config_lib
from t2i_jax.train import inputs
from t2i_jax.train import loop as loop_lib
from t2i_jax.train import state as state_lib
from t2i_jax.train import workdir as workdir_lib
from t2i_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)

PARTITION_RULES = ((r".*", "fsdp"),)


# ===========================================================================
# Config
# ===========================================================================

def default_config() -> ml_collections.ConfigDict:
    """Every key this trainer reads, with defaults; a config file changes what it needs."""
    c = config_lib.base_config()  # seed, data, batch_size, train, optim, ema_decay, mesh, export, progress
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
    c.disc.lr = 0.0  # the discriminator's own AdamW (optim's betas, schedule shape); 0: optim.lr
    c.disc.grad_clip = 1.0  # global norm of the discriminator's gradients alone; 0 disables
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
                                  **inputs.loader_kwargs(dcfg))
    held_out = None
    if config.eval.enabled and config.eval.data:
        esrc = data_lib.source_from_config({"resolution": dcfg["resolution"], **config.eval.data.to_dict()})
        held_out = inputs.make_eval_set(esrc, config.eval.num_images, dcfg["resolution"], None)["image"]
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
# Step (the shared tail is t2i_jax.train.loop)
# ===========================================================================

def make_optimizer(config, total_steps: int):
    """(tx, schedule): AdamW for the VAE (`optim`), and with the discriminator on, a second AdamW of
    its own (`disc.lr`, `disc.grad_clip`) over its params, via `optax.multi_transform`."""
    ocfg = {**config.optim.to_dict(), "total_steps": total_steps}
    tx, schedule = state_lib.make_optimizer(ml_collections.ConfigDict(ocfg))
    if not config.disc.enabled:
        return tx, schedule
    dcfg = {**ocfg, "lr": config.disc.lr or config.optim.lr, "grad_clip": config.disc.grad_clip}
    tx_disc, _ = state_lib.make_optimizer(ml_collections.ConfigDict(dcfg))
    def labels(p):  # each top-level part's leaves labelled with its name
        return {k: jax.tree_util.tree_map(lambda _, k=k: k, v) for k, v in p.items()}
    return optax.multi_transform({"vae": tx, "disc": tx_disc}, labels), schedule


def make_objective(vae, disc, config) -> loop_lib.Objective:
    """Reconstruction + KL (+ the generator's GAN loss) for the VAE and, with `disc`, the hinge
    loss of the discriminator, in one scalar: each part's gradient reaches only its own params
    (the discriminator's params are constant in the generator loss, the reconstructions constant
    in the discriminator's), so one gradient serves both optimizers."""
    l1 = config.loss.reconstruction == "l1"
    if config.loss.reconstruction not in ("l1", "l2"):
        raise ValueError(f"loss.reconstruction {config.loss.reconstruction!r}: use 'l1' or 'l2'")
    f = vae.config.downsample_factor

    def augment(frozen, batch, key):
        del frozen
        x = batch["image"]
        shape = (x.shape[0], x.shape[1] // f, x.shape[2] // f, vae.config.latent_channels)
        # The posterior's noise for the whole batch, so micro-batches draw what one batch would.
        return {**batch, "eps_z": jax.random.normal(key, shape)}

    def loss_fn(params, frozen, batch, step):
        del frozen
        x = batch["image"]
        post = vae.apply({"params": params["vae"]}, x, method=vae.encode)
        z = post.mean + post.std * batch["eps_z"].astype(post.mean.dtype)
        recon = vae.apply({"params": params["vae"]}, z, method=vae.decode)
        err = jnp.abs(recon - x) if l1 else jnp.square(recon - x)
        rec, kl = jnp.mean(err), jnp.mean(post.kl())
        gen = rec + config.loss.kl_weight * kl
        aux = {"rec_loss": rec, "kl": kl}
        if disc is None:
            return gen, aux
        gan_on = (step >= config.disc.start).astype(jnp.float32)
        frozen_disc = jax.lax.stop_gradient(params["disc"])
        g = -jnp.mean(disc.apply({"params": frozen_disc}, recon))
        gen = gen + gan_on * config.disc.weight * g
        fake = jax.lax.stop_gradient(recon)
        real_logits = disc.apply({"params": params["disc"]}, x)
        fake_logits = disc.apply({"params": params["disc"]}, fake)
        d = gan_on * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))
        return gen + d, {**aux, "g_loss": g, "d_loss": d, "loss": gen}

    return loop_lib.Objective("vae", loss_fn, ("image",), augment=augment, postfix=("loss",))


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
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def f(params, x):
        recon, post = vae.apply({"params": params}, x)
        return psnr(recon, x), post.mean

    fn = jax.jit(f, in_shardings=(vae_shardings, batch_sh), out_shardings=(rep, rep))

    def evaluate(params):
        scores, latents = loop_lib.eval_in_batches(fn, params, [images], batch_size, mesh)
        return {"psnr": float(np.mean(scores)), "latent_std": float(np.std(latents)), "num_images": int(len(images))}

    return evaluate


# ===========================================================================
# Loop
# ===========================================================================

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains a VAE per `config` in `workdir` (resuming from its latest checkpoint), evaluates, exports.

    Returns {"step", "stopped", "eval_before", "eval_after", "state"}. Raises FloatingPointError
    on a non-finite loss or grad norm.
    """
    workdir, is_main, ckpt, start = workdir_lib.open_run(config, workdir)

    # --- model, data -------------------------------------------------------
    vae = make_vae(config)
    disc = PatchDiscriminator(config.disc.channels, config.disc.layers) if config.disc.enabled else None
    loader, held_out = make_data(config)
    total_steps = int(config.train.steps)
    if total_steps <= 0:
        total_steps = math.ceil(config.train.epochs * len(loader.source) / config.batch_size)
    tx, schedule = make_optimizer(config, total_steps)

    # --- sharding ----------------------------------------------------------
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, num_devices=config.mesh.num_devices)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev or (config.batch_size // config.train.grad_accum) % n_dev:
        raise ValueError(f"batch_size {config.batch_size} / grad_accum {config.train.grad_accum} must be a multiple "
                         f"of the {n_dev} devices")
    ema = config.ema_decay > 0
    init = lambda params: state_lib.create_state(params, tx, ema=ema, seed=config.seed)  # noqa: E731
    abstract_state = jax.eval_shape(lambda k: init(init_params(vae, disc, config, k)), jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(abstract_state, PARTITION_RULES, mesh, config.mesh.fsdp_min_size)

    # --- checkpoint: resume or start -------------------------------------------
    it = iter(loader)
    fresh = lambda: jax.jit(lambda k: init(init_params(vae, disc, config, k)), out_shardings=shardings)(  # noqa: E731
        jax.random.PRNGKey(config.seed))
    state, start = loop_lib.init_or_resume(ckpt, start, fresh, abstract_state, shardings, it)

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
    writer = MetricWriter(workdir, enabled=is_main, start=start)
    if "before" in results and start == 0:
        writer.write(0, {"eval/psnr": results["before"]["psnr"]})
    try:
        state, stopped, _ = loop_lib.fit(
            make_objective(vae, disc, config), config, tx=tx, schedule=schedule, mesh=mesh, ckpt=ckpt,
            writer=writer, is_main=is_main, state=state, state_shardings=shardings, frozen={}, frozen_shardings={},
            data_iter=it, start=start, total_steps=total_steps, skipped=loader.skipped_count)
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
                host = parallel.to_host(params)
                if is_main:
                    std = results["after"]["latent_std"] if "after" in results else 1.0 / vae.config.scaling_factor
                    export(vae, host, std, workdir / "export")
    finally:
        writer.close()
    return {"step": final_step, "stopped": stopped, "eval_before": results.get("before"),
            "eval_after": results.get("after"), "state": state}
