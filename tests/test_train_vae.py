"""VAE training on synthetic shapes: reconstruction learning with a PatchGAN after warm-up, PSNR eval,
diffusers export with a measured scaling factor, resume."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import shapes_vae  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train import vae as vae_train  # noqa: E402

STEPS, DISC_START = 60, 30


def tiny_config(stop_at=STEPS):
    """shapes_vae at 16 px, batch 16, 32 held-out images, discriminator from step 30."""
    c = shapes_vae.get_config()
    c.data.resolution = 16
    c.batch_size = 16
    c.train.steps = STEPS
    c.train.preempt_at_step = stop_at if stop_at < STEPS else 0
    c.train.log_every = 1
    c.progress = False
    c.mesh.num_devices = 1
    c.eval.data.length = 32
    c.eval.num_images = 32
    c.disc.enabled = True
    c.disc.start = DISC_START
    return c


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


def test_psnr_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
    r = (x + rng.normal(scale=0.1, size=x.shape)).astype(np.float32)
    mse = ((np.clip(r, -1, 1) / 2 - x / 2) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(vae_train.psnr(r, x)), 10 * np.log10(1 / mse), rtol=1e-5)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shapes_vae")
    return workdir, vae_train.train_and_evaluate(tiny_config(), workdir)


# slow (the run takes ~48 s): the VAE trainer still runs fast in
# test_train_loop.py::test_no_host_reads_between_log_steps[vae], and VAE export in
# test_vae.py::test_save_vae_round_trip_through_diffusers.
@pytest.mark.slow
def test_loss_falls_and_psnr_rises(vae_run):
    workdir, result = vae_run
    rows = [r for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    rec = np.array([r["rec_loss"] for r in rows])
    assert rec[-5:].mean() / rec[:3].mean() < 0.6, rec
    before, after = result["eval_before"], result["eval_after"]
    assert json.loads((workdir / "eval_before.json").read_text()) == before
    assert json.loads((workdir / "eval_after.json").read_text()) == after
    assert after["num_images"] == 32
    assert after["psnr"] > before["psnr"] + 4.0, (before, after)
    psnr_rows = [r for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if "eval/psnr" in r]
    assert [r["step"] for r in psnr_rows] == [0, STEPS]
    assert psnr_rows[1]["eval/psnr"] == pytest.approx(after["psnr"])
    # The discriminator's hinge loss counts only from its start step on.
    d = np.array([r["d_loss"] for r in rows])
    assert np.all(d[:DISC_START] == 0) and np.all(d[DISC_START:] > 0)


@pytest.mark.slow  # with the run above
def test_export_loads_in_diffusers(vae_run):
    import diffusers
    import torch

    workdir, result = vae_run
    folder = workdir / "export" / "vae"
    ref = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    # Latents for the U-Net have unit std on the held-out images.
    assert ref.config.scaling_factor == pytest.approx(1 / result["eval_after"]["latent_std"], rel=1e-6)
    params = jax.device_get(result["state"].params["vae"])
    vae = vae_train.make_vae(tiny_config())
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    ours, _ = vae.apply({"params": params}, x)
    with torch.no_grad():
        theirs = ref(torch.tensor(x.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    assert np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs) < 1e-5


# Behind --slow (~32 s): the one train loop's exact resume is checked fast for the LDM objective
# (test_lora_train.py) and for CLIP (test_train_clip.py).
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    """Across the discriminator's start step."""
    full = vae_train.train_and_evaluate(tiny_config(DISC_START + 2), tmp_path / "full")
    vae_train.train_and_evaluate(tiny_config(DISC_START - 1), tmp_path / "split")
    second = vae_train.train_and_evaluate(tiny_config(DISC_START + 2), tmp_path / "split")
    assert second["step"] == full["step"] == DISC_START + 2
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(full["state"].params)),
                    jax.tree_util.tree_leaves(jax.device_get(second["state"].params))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    loss = lambda d: [r["loss"] for r in metrics_lib.read_jsonl(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    np.testing.assert_allclose(loss(tmp_path / "split"), loss(tmp_path / "full"), rtol=1e-6)
