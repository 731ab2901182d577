"""DreamBooth in the LDM trainer: class images made once by the Sampler and reused, mixed batches,
the prior-preservation loss against a hand computation, exact resume, config errors.

The fast tests run on a tiny random diffusers pipeline saved locally (its train step compiles in
seconds); the bundled shapes model (configs/dreambooth_shapes.py) runs in the slow ones.
"""

import copy
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import dreambooth_sd15, dreambooth_shapes  # noqa: E402
from t2i_jax import parallel, pipeline  # noqa: E402
from t2i_jax.train import dreambooth, ldm  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train.checkpoint import Checkpointer  # noqa: E402

SIZE = 16  # pixels; the tiny VAE halves each side: 8x8x4 latents
INSTANCE, CLASS = "a photo of sks dog", "a photo of a dog"

pytestmark = pytest.mark.usefixtures("compilation_cache")


def build_tiny_pipeline(path):
    """A diffusers StableDiffusionPipeline with random, very small parts, saved to `path`."""
    import diffusers
    import torch
    import transformers as T

    from t2i_jax.tokenizer import Tokenizer

    torch.manual_seed(0)
    # One level, text cross-attention in the middle block only: the train step compiles in a few seconds.
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16,), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE)
    text = T.CLIPTextModel(T.CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    sched = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=Tokenizer.bundled().hf, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


def write_instances(folder, n=3):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIZE + 4, SIZE, 3), dtype=np.uint8)).save(folder / f"dog_{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    build_tiny_pipeline(root / "model")
    return {"model": root / "model", "instances": write_instances(root / "instances"), "root": root}


def tiny_config(tiny, steps=4, stop_at=0, **db):
    c = ldm.default_config()
    c.model.init_from = str(tiny["model"])
    c.data = {"resolution": SIZE, "seed": 0}
    c.dreambooth.update(dict(enabled=True, instance_images=str(tiny["instances"]), instance_prompt=INSTANCE,
                             class_prompt=CLASS, prior_preservation=True, num_class_images=3, class_steps=2,
                             class_guidance_scale=3.0, class_scheduler="ddim", class_batch_size=2, class_seed=7))
    c.dreambooth.update(db)
    c.cache.enabled = True
    c.batch_size = 4
    c.mesh.num_devices = 1
    c.progress = False
    c.export = False
    c.eval.prompts = []
    c.ema_decay = 0.0
    c.diffusion.caption_dropout = 0.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 1
    c.train.steps = steps
    c.train.log_every = 1
    c.train.preempt_at_step = stop_at
    return c


@pytest.fixture(scope="module")
def sampler(tiny):
    from t2i_jax.convert.load import load_components

    return pipeline.Sampler(load_components(str(tiny["model"])), mesh=parallel.make_mesh(devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def class_run(tiny, sampler):
    """Class images 0..2 generated once into a folder, with the number of Sampler builds."""
    folder = tiny["root"] / "class_images"
    calls = []
    settings = dreambooth.class_settings(tiny_config(tiny))
    paths = dreambooth.generate_class_images(lambda: calls.append(1) or sampler, folder, settings, 3, batch_size=2,
                                             progress=False)
    return {"folder": folder, "paths": paths, "settings": settings, "calls": len(calls)}


def _read(path):
    from PIL import Image

    return np.asarray(Image.open(path))


# ---------------------------------------------------------------------------
# Class images.
# ---------------------------------------------------------------------------

def test_class_images_are_the_samplers(class_run, sampler):
    s = class_run["settings"]
    assert class_run["calls"] == 1
    assert [p.name for p in class_run["paths"]] == ["00000.png", "00001.png", "00002.png"]
    kw = dict(steps=s["steps"], guidance_scale=s["guidance_scale"], scheduler=s["scheduler"], height=SIZE, width=SIZE,
              negative_prompts=[""] * 2)
    # Generated two per call: seeds (7, 8), then (9, padding 10).
    want = np.concatenate([pipeline.to_uint8(sampler([CLASS] * 2, seeds=seeds, **kw)) for seeds in ([7, 8], [9, 10])])
    got = np.stack([_read(p) for p in class_run["paths"]])
    assert got.shape == (3, SIZE, SIZE, 3) and got.std() > 1
    np.testing.assert_array_equal(got, want[:3])
    assert not np.array_equal(got[0], got[1])
    manifest = json.loads((class_run["folder"] / "manifest.json").read_text())
    assert manifest == {"settings": s, "images": ["00000.png", "00001.png", "00002.png"]}
    assert sorted(p.name for p in class_run["folder"].iterdir()) == ["00000.png", "00001.png", "00002.png",
                                                                     "manifest.json"]  # no temporary files left


def test_class_images_reused_and_only_missing_made(class_run, sampler, tmp_path):
    folder, settings = class_run["folder"], class_run["settings"]
    before = {p.name: (p.stat().st_mtime_ns, _read(p)) for p in class_run["paths"]}
    calls = []
    again = dreambooth.generate_class_images(lambda: calls.append(1) or sampler, folder, settings, 3, batch_size=2,
                                             progress=False)
    assert calls == [] and again == class_run["paths"]
    assert {p.name: p.stat().st_mtime_ns for p in again} == {k: v[0] for k, v in before.items()}
    # A copy with one image lost (a killed run) and one more wanted: only those two are made.
    import shutil
    copy = tmp_path / "class_images"
    shutil.copytree(folder, copy)
    (copy / "00001.png").unlink()
    kept = (copy / "00000.png").stat().st_mtime_ns
    more = dreambooth.generate_class_images(lambda: calls.append(1) or sampler, copy, settings, 4, batch_size=2,
                                            progress=False)
    assert calls == [1] and [p.name for p in more] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert (copy / "00000.png").stat().st_mtime_ns == kept
    # Image 1 again from seed 8 (now in the first row of its call, with seed 10 beside it).
    np.testing.assert_array_equal(_read(copy / "00001.png"), before["00001.png"][1])
    assert json.loads((copy / "manifest.json").read_text())["images"][-1] == "00003.png"
    # Other settings: refused, naming the setting and the fix.
    with pytest.raises(ValueError, match=r"prompt 'a photo of a dog' \(now 'a photo of a cat'\).*delete"):
        dreambooth.generate_class_images(lambda: sampler, folder, {**settings, "prompt": "a photo of a cat"}, 3)


# ---------------------------------------------------------------------------
# Mixed batches.
# ---------------------------------------------------------------------------

def test_mixed_batches(tiny, class_run):
    from t2i_jax.tokenizer import Tokenizer

    c = tiny_config(tiny)
    c.batch_size = 8
    db = dreambooth.DreamBooth(c)
    # The class images are there already: prepare makes none (no model needed).
    source, _ = db.prepare(tiny["root"], pipe=None)
    assert len(source) == 6 and db.epoch_size == 6
    assert [source[i]["captions"] for i in (0, 2, 3, 5)] == [[INSTANCE]] * 2 + [[CLASS]] * 2
    tok = Tokenizer.bundled()
    ids = tok([INSTANCE, CLASS])
    it = db.stream_iterator(tok)
    seen = []
    for step in range(3):
        b = next(it)
        assert b["image"].shape == (8, SIZE, SIZE, 3) and b["is_class"].tolist() == [0] * 4 + [1] * 4
        for row in range(8):
            np.testing.assert_array_equal(b["input_ids"][row], ids[b["is_class"][row]])
        idx, _ = it.indices(step)
        assert (idx[:4] < 3).all() and (idx[4:] >= 3).all()
        np.testing.assert_array_equal(b["image"], db.pixels[idx].astype(np.float32) / 127.5 - 1)
        seen.append(idx)
    # Each kind is walked in epochs: 12 instance draws over 3 images (4 per step) see each one 4 times.
    counts = np.bincount(np.concatenate([s[:4] for s in seen]), minlength=6)
    assert counts.tolist() == [4, 4, 4, 0, 0, 0]
    # The iterator's state is its step: a restored one continues with the same batches.
    state = it.get_state()
    nxt = next(it)
    other = db.stream_iterator(tok)
    other.set_state(state)
    np.testing.assert_array_equal(next(other)["image"], nxt["image"])
    with pytest.raises(ValueError, match="resume with the instance and class images"):
        dreambooth.MixedIterator(None, 2, 3, (4, 4), 0).set_state(state)
    # Without prior preservation every row is an instance.
    c.dreambooth.prior_preservation = False
    solo = dreambooth.DreamBooth(c)
    solo.prepare(tiny["root"] / "unused", pipe=None)
    b = next(solo.stream_iterator(tok))
    assert b["is_class"].tolist() == [0] * 8 and solo.epoch_size == 3 and not (tiny["root"] / "unused").exists()


# ---------------------------------------------------------------------------
# The loss against a hand computation.
# ---------------------------------------------------------------------------

def test_loss_is_instance_plus_weighted_prior(tiny):
    c = tiny_config(tiny)
    c.diffusion.snr_gamma = 5.0  # min-SNR on the instance half only, as diffusers
    parts = ldm.make_parts(c)
    unet = parts["unet"]
    frozen = {k: parts["params"][k] for k in ("vae", "text_encoder")}
    params = parts["params"]["unet"]
    abar = np.asarray(ldm.schedulers.from_config("ddpm", parts["scheduler_config"]).alphas_cumprod)
    rng = np.random.default_rng(0)
    b, lat = 4, (4, 8, 8, 4)
    mb = {"mean": rng.normal(size=lat), "std": np.full(lat, 0.1), "eps_z": rng.normal(size=lat),
          "noise": rng.normal(size=lat), "context": rng.normal(size=(b, 77, 16)),
          "t": np.array([3, 500, 20, 900], np.int32), "drop": np.zeros(b, bool),
          "is_class": np.array([0, 1, 0, 1], np.int32)}
    mb = {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype) for k, v in mb.items()}

    # By hand, as train_dreambooth.py (its batch is [instances, classes]; here rows 0, 2 and 1, 3).
    x0 = np.asarray(ldm.to_latents(parts["vae"].config, mb["mean"] + mb["std"] * mb["eps_z"]))
    a = abar[np.asarray(mb["t"])][:, None, None, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * np.asarray(mb["noise"])
    out = np.asarray(jax.jit(unet.apply)({"params": params}, jnp.asarray(xt, jnp.float32), mb["t"], mb["context"]))
    mse = ((out - np.asarray(mb["noise"])) ** 2).mean(axis=(1, 2, 3))
    snr = a[:, 0, 0, 0] / (1 - a[:, 0, 0, 0])
    inst, cls = [0, 2], [1, 3]
    instance = (mse[inst] * np.minimum(snr[inst], 5.0) / snr[inst]).mean()
    prior = mse[cls].mean()

    def objective(w, accum=1):
        cw = copy.deepcopy(c)  # the loss reads its config when traced
        cw.dreambooth.prior_loss_weight, cw.train.grad_accum = w, accum
        return ldm.make_objective(parts, cw, True, parts["tokenizer"]([""])[0], np.zeros((77, 16), np.float32))

    objs = {w: objective(w) for w in (0.0, 1.0)}
    acc = objective(1.0, accum=2)
    assert objs[1.0].batch_keys == ("mean", "std", "context", "is_class")

    @jax.jit  # one program for all of them (the U-Net compiles once per batch shape)
    def run(params, frozen, mb):
        # Two accumulated micro-batches as the loop cuts them (rows 0, 2 and 1, 3): here one holds
        # only instances and the other only class examples, yet their mean is the batch's loss.
        return ({w: o.loss_fn(params, frozen, mb, 0) for w, o in objs.items()},
                [acc.loss_fn(params, frozen, {k: v[j::2] for k, v in mb.items()}, 0)[0] for j in (0, 1)])

    out, halves = jax.device_get(run(params, frozen, mb))
    for w, (loss, aux) in out.items():
        np.testing.assert_allclose(float(loss), instance + w * prior, rtol=2e-5)
        np.testing.assert_allclose([float(aux["instance_loss"]), float(aux["prior_loss"])], [instance, prior],
                                   rtol=2e-5)
    assert float(out[1.0][0]) - float(out[0.0][0]) == pytest.approx(prior, rel=1e-4) and prior > 1e-3
    np.testing.assert_allclose(np.mean(halves), float(out[1.0][0]), rtol=2e-5)


# ---------------------------------------------------------------------------
# Real steps: run, resume exactly.
# ---------------------------------------------------------------------------

def _params(state):
    return jax.tree_util.tree_leaves(jax.device_get(state.params))


def _rows(d):
    return metrics_lib.read_jsonl(d / "metrics.jsonl")


# Behind --slow (~34 s): the LDM objective's exact resume is checked fast in LoRA mode
# (test_lora_train.test_checkpoint_holds_adapters_and_resume_is_exact), through the same loop.
@pytest.mark.slow
def test_train_resume_exact(tiny, tmp_path):
    """4 steps with checkpoints at 2 and 4; then, as after a crash past step 2, the checkpoint of step
    4 is removed and the same command resumes from 2: the same params and metrics, class images reused."""
    import shutil

    c = tiny_config(tiny)
    c.train.checkpoint_every = 2
    full = ldm.train_and_evaluate(c, tmp_path)
    rows = _rows(tmp_path)
    params = _params(full["state"])
    folder = tmp_path / "class_images"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert sorted(stamps) == ["00000.png", "00001.png", "00002.png", "manifest.json"]
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
    again = ldm.train_and_evaluate(c, tmp_path)
    assert again["step"] == 4 and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    for a, b in zip(params, _params(again["state"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    resumed = _rows(tmp_path)
    assert len(rows) == 4 and len(resumed) == 4 and {"instance_loss", "prior_loss"} <= set(rows[0])
    for key in ("loss", "instance_loss", "prior_loss"):
        np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in rows], rtol=1e-6)
    assert rows[0]["loss"] == pytest.approx(rows[0]["instance_loss"] + rows[0]["prior_loss"], rel=1e-5)
    assert rows[0]["instance_loss"] != rows[1]["instance_loss"]


def test_dreambooth_as_lora(tiny, tmp_path):
    """DreamBooth with `lora.rank` set: the train state holds only the adapters of the U-Net's attention
    (the tiny U-Net's middle block), the loss is still instance + prior, and the adapters train."""
    from flax import traverse_util

    c = tiny_config(tiny, steps=2)
    c.lora.rank = 2
    c.optim.lr = 3e-2
    out = ldm.train_and_evaluate(c, tmp_path)
    flat = traverse_util.flatten_dict(jax.device_get(out["state"].params))
    assert flat and {k[-1] for k in flat} == {"lora_down", "lora_up"}
    assert {k[0] for k in flat} == {"unet"} and all(k[-2] in ("to_q", "to_k", "to_v", "to_out_0") for k in flat)
    assert min(float(np.abs(v).max()) for k, v in flat.items() if k[-1] == "lora_up") > 0  # moved off zero
    rows = _rows(tmp_path)
    assert len(rows) == 2 and sorted(p.name for p in (tmp_path / "class_images").iterdir())[-1] == "manifest.json"
    for r in rows:
        assert r["loss"] == pytest.approx(r["instance_loss"] + r["prior_loss"], rel=1e-5)


# ---------------------------------------------------------------------------
# Errors and configs.
# ---------------------------------------------------------------------------

def test_config_errors(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    cases = [
        (dict(instance_images=str(tmp_path / "nope")), r"instance_images '.*nope' is not a folder \(it does not exist"),
        (dict(instance_images=str(empty)), r"instance_images '.*empty' holds no images .*\.png"),
        (dict(instance_images=""), r"instance_images is not set"),
        (dict(class_prompt=""), r"prior_preservation is on but dreambooth.class_prompt is empty.*class_prompt="),
        (dict(instance_prompt=" "), r"instance_prompt is empty"),
    ]
    for over, match in cases:
        with pytest.raises(ValueError, match=match):
            ldm.train_and_evaluate(tiny_config(tiny, **over), tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before the run folder or a model
    odd = tiny_config(tiny)
    odd.batch_size = 5
    with pytest.raises(ValueError, match="batch_size 5 is odd.*use 6"):
        dreambooth.check_config(odd)
    # Without prior preservation no class prompt is needed.
    assert len(dreambooth.check_config(tiny_config(tiny, class_prompt="", prior_preservation=False))) == 3


def test_configs(tmp_path):
    s = dreambooth_shapes.get_config(str(tmp_path))
    assert s.dreambooth.enabled and s.dreambooth.prior_preservation and s.batch_size % 2 == 0
    assert (Path(s.model.init_from) / "model_index.json").is_file() and s.data.resolution == 32
    paths = dreambooth_shapes.write_instance_images(tmp_path, num=2)
    img = _read(paths[0])
    assert img.shape == (32, 32, 3) and (img == dreambooth_shapes.TEAL).all(-1).sum() > 100
    assert len(dreambooth.check_config(s)) == 2
    d = dreambooth_sd15.get_config("/data/dog")
    assert (d.dreambooth.instance_images, d.data.resolution, d.dreambooth.prior_loss_weight) == ("/data/dog", 512, 1.0)
    assert d.model.init_from == "stable-diffusion-v1-5/stable-diffusion-v1-5" and d.dreambooth.num_class_images == 200
    assert not ldm.default_config().dreambooth.enabled


# ---------------------------------------------------------------------------
# The bundled shapes model (slow).
# ---------------------------------------------------------------------------

def shapes_config(instances, steps=4, stop_at=0, cached=True):
    c = dreambooth_shapes.get_config(str(instances))
    c.dreambooth.num_class_images = 4
    c.dreambooth.class_steps = 3
    c.dreambooth.class_batch_size = 4
    c.cache.enabled = cached
    c.mesh.num_devices = 1
    c.progress = False
    c.export = False
    c.eval.prompts = []
    c.train.steps = steps
    c.train.log_every = 1
    c.train.preempt_at_step = stop_at
    return c


@pytest.mark.slow  # the bundled U-Net's train step compiles in ~30-60 s on 2 cores
@pytest.mark.parametrize("cached", [True, False])
def test_bundled_model_resume_exact(tmp_path, cached):
    instances = tmp_path / "instances"
    dreambooth_shapes.write_instance_images(instances, num=3)
    full = ldm.train_and_evaluate(shapes_config(instances, cached=cached), tmp_path / "full")
    ldm.train_and_evaluate(shapes_config(instances, stop_at=2, cached=cached), tmp_path / "split")
    second = ldm.train_and_evaluate(shapes_config(instances, cached=cached), tmp_path / "split")
    assert second["step"] == 4
    for a, b in zip(_params(full["state"]), _params(second["state"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    rows = _rows(tmp_path / "full")
    np.testing.assert_allclose([r["loss"] for r in _rows(tmp_path / "split")], [r["loss"] for r in rows], rtol=1e-6)
    assert all(np.isfinite([r["instance_loss"], r["prior_loss"]]).all() for r in rows)
    # The class images are the bundled model's (a white background, as the class prompt asks).
    imgs = np.stack([_read(p) for p in sorted((tmp_path / "full" / "class_images").glob("*.png"))])
    assert imgs.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(imgs, np.stack([_read(p) for p in
                                                  sorted((tmp_path / "split" / "class_images").glob("*.png"))]))
