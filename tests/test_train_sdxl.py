"""SDXL fine-tuning in the ldm trainer (t2i_jax.train.sdxl_cond): per-image time ids from the
loader, the loss against diffusers + transformers, the cache, and (slow) end-to-end runs with
resume, export to StableDiffusionXLPipeline and a LoRA round trip through load_lora_weights.

The tiny SDXL base is tests/test_sdxl.py's (`build_tiny_sdxl`: two text encoders, 64-wide
context, `transformer_layers_per_block` (1, 2)); its VAE halves the side, so 16 px images give
8x8 latents.
"""

import json
import shutil
import sys
from pathlib import Path

import diffusers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util
from PIL import Image
from test_sdxl import build_tiny_sdxl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import sdxl_finetune  # noqa: E402
from t2i_jax import data as data_lib  # noqa: E402
from t2i_jax import parallel  # noqa: E402
from t2i_jax.models import unet as unet_lib  # noqa: E402
from t2i_jax.train import ldm, sdxl_cond  # noqa: E402
from t2i_jax.train import lora as lora_lib  # noqa: E402

RES = 16
# (height, width) of the dataset's images: landscape, portrait, larger, already square.
SIZES = [(20, 30), (24, 16), (40, 32), (16, 16)]
CAPTIONS = ["a red circle", "a small blue square", "a green triangle on white", "two yellow dots"]
STEPS = 4

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SDXL base folder (and its diffusers pipeline), a JSONL set of 4 images of different
    sizes, and the trainer's parts loaded from the folder."""
    root = tmp_path_factory.mktemp("train_sdxl")
    ref = build_tiny_sdxl(root / "model")
    rng = np.random.RandomState(0)
    with open(root / "captions.jsonl", "w") as f:
        for i, ((h, w), cap) in enumerate(zip(SIZES, CAPTIONS)):
            # Smooth images (a gradient plus a little noise): a bicubic resize keeps them in range.
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([yy * 255 // h, xx * 255 // w, np.full((h, w), 40 * i)], -1) + rng.randint(0, 20, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": cap}) + "\n")
    c = config(root)
    return {"root": root, "ref": ref, "config": c, "parts": ldm.make_parts(c)}


def config(root: Path, **over):
    """4 steps of batch 4 (the whole dataset) on one device, checkpoints at 2 and 4, no eval."""
    c = ldm.default_config()
    c.model.init_from = str(root / "model")
    c.data = ldm.ml_collections.ConfigDict({"name": "jsonl", "path": str(root / "captions.jsonl"),
                                            "resolution": RES, "seed": 0, "worker_count": 0})
    c.batch_size = 4
    c.progress = False
    c.eval.prompts = []
    c.mesh.num_devices = 1
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 1
    c.ema_decay = 0.0
    c.train.steps = STEPS
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    for k, v in over.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def frozen_of(parts):
    return {k: parts["params"][k] for k in ("vae", "text_encoder", "text_encoder_2")}


# --------------------------------------------------------------------------
# Time ids from the loader
# --------------------------------------------------------------------------


def test_time_ids_from_original_sizes_and_crops(tiny):
    """The loader records each image's size before the resize and its crop in the resized image
    (in the flipped image for a flipped one): the crop there gives the batch's pixels exactly."""
    root = tiny["root"]
    source = data_lib.source_from_config({"name": "jsonl", "path": str(root / "captions.jsonl")})
    keys = [Path(source[i]["image"]).name for i in range(len(SIZES))]
    by_name = dict(zip(keys, SIZES))
    # Center crops, no flip: known values. 20x30 -> 16x24, crop left (24 - 16) // 2 = 4, ...
    center = next(iter(data_lib.make_loader(source, global_batch_size=4, seed=0, resolution=RES, shuffle=False,
                                            size_conditioning=True)))
    np.testing.assert_array_equal(center["original_size"], np.asarray(SIZES, np.int32))
    np.testing.assert_array_equal(center["crop_top_left"], [[0, 4], [4, 0], [2, 0], [0, 0]])
    ids = sdxl_cond.batch_time_ids(center["original_size"], center["crop_top_left"], RES)
    np.testing.assert_array_equal(ids, [[20, 30, 0, 4, 16, 16], [24, 16, 4, 0, 16, 16], [40, 32, 2, 0, 16, 16],
                                        [16, 16, 0, 0, 16, 16]])
    assert ids.dtype == np.float32
    # Random crops and flips over two epochs: every recorded crop reproduces the pixels.
    loader = data_lib.make_loader(source, global_batch_size=4, seed=3, resolution=RES, random_crop=True,
                                  random_flip=True, size_conditioning=True)
    seen_flip, crops = False, set()
    for _, batch in zip(range(4), loader):
        for b in range(4):
            name = Path(batch["key"][b]).name if "key" in batch else None
            orig = tuple(int(v) for v in batch["original_size"][b])
            assert name is None or by_name[name] == orig
            img = data_lib.decode_image(str(root / keys[SIZES.index(orig)]), RES).astype(np.float32) / 127.5 - 1
            top, left = (int(v) for v in batch["crop_top_left"][b])
            crops.add((orig, top, left))
            plain = img[top:top + RES, left:left + RES]
            flipped = img[:, ::-1][top:top + RES, left:left + RES]
            got = batch["image"][b]
            assert np.array_equal(got, plain) or np.array_equal(got, flipped), (orig, top, left)
            seen_flip |= not np.array_equal(got, plain)
    assert seen_flip and len(crops) > 4  # both branches exercised, crops vary
    # SD 1.x batches are unchanged: no size fields, no second token ids.
    sd1 = next(iter(data_lib.make_loader(source, global_batch_size=4, seed=0, resolution=RES)))
    assert not {"original_size", "crop_top_left", "input_ids_2"} & set(sd1)


def test_original_size_follows_exif_orientation(tmp_path):
    """A JPEG stored 40 wide x 24 high with EXIF orientation 6 (turned 90 degrees) is 40 x 24 (h, w)
    as shown; its original size is read before the JPEG draft decode shrinks it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.full((24, 40, 3), 128, np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    arr, original = data_lib.decode_image(str(tmp_path / "r.jpg"), 8, with_size=True)
    assert original == (40, 24) and arr.shape == (13, 8, 3)
    assert data_lib.decode_image(np.zeros((5, 7, 3), np.uint8), 4, with_size=True)[1] == (5, 7)


def test_time_ids_match_the_sampler_formula():
    """`example_time_ids` is `t2i_jax.sdxl.time_ids` (the sampler's): original + crop + target."""
    np.testing.assert_array_equal(sdxl_cond.example_time_ids((768, 1360), (0, 172), 1024),
                                  [768, 1360, 0, 172, 1024, 1024])
    with pytest.raises(ValueError, match="5 time ids"):
        sdxl_cond.example_time_ids((10, 20), (0, 0), 16, num_ids=5)


# --------------------------------------------------------------------------
# The loss against diffusers + transformers
# --------------------------------------------------------------------------


def _torch_loss(ref, images, captions, time_ids, t, noise, eps_z):
    """diffusers' SDXL training loss: VAE posterior sample, both encoders' penultimate states,
    pooled text_embeds, DDPM add_noise, epsilon MSE."""
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        post = ref.vae.encode(nchw(images)).latent_dist
        z = (post.mean + post.std * nchw(eps_z)) * ref.vae.config.scaling_factor
        states, pooled = [], None
        for tok, te in ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2)):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = te(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0] if te is ref.text_encoder_2 else pooled
        sched = diffusers.DDPMScheduler.from_config(ref.scheduler.config)
        tt = torch.from_numpy(np.asarray(t)).long()
        noisy = sched.add_noise(z, nchw(noise), tt)
        pred = ref.unet(noisy, tt, torch.cat(states, -1),
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.from_numpy(time_ids)}).sample
        return float(torch.mean((pred - nchw(noise)) ** 2))


def _fixed_batch(seed=0, n=4):
    r = np.random.RandomState(seed)
    lat = (n, RES // 2, RES // 2, 4)
    images = np.clip(r.randn(n, RES, RES, 3) * 0.5, -1, 1).astype(np.float32)
    orig = np.asarray(SIZES[:n], np.int32)
    crop = np.asarray([[0, 4], [4, 0], [3, 7], [0, 0]][:n], np.int32)
    return {"image": images, "time_ids": sdxl_cond.batch_time_ids(orig, crop, RES),
            "t": np.asarray([5, 300, 650, 999][:n], np.int32), "noise": r.randn(*lat).astype(np.float32),
            "eps_z": r.randn(*lat).astype(np.float32), "drop": np.asarray([False, True, False, False][:n])}


def test_loss_matches_diffusers(tiny):
    """The trainer's loss on one fixed batch (images, posterior noise, noise, timesteps, time ids
    from different original sizes and crops, the second caption dropped to "") equals diffusers'
    UNet2DConditionModel + transformers' encoders, fp32."""
    parts, ref = tiny["parts"], tiny["ref"]
    objective = ldm.make_objective(parts, tiny["config"], False, sdxl_cond.empty_ids(parts), None)
    assert objective.batch_keys == ("image", "input_ids", "input_ids_2", "time_ids")
    mb = _fixed_batch()
    mb["input_ids"], mb["input_ids_2"] = parts["tokenizer"](CAPTIONS), parts["tokenizer_2"](CAPTIONS)
    loss, aux = jax.jit(objective.loss_fn)(parts["params"]["unet"], frozen_of(parts), mb, 0)
    captions = [("" if d else c) for c, d in zip(CAPTIONS, mb["drop"])]
    want = _torch_loss(ref, mb["image"], captions, mb["time_ids"], mb["t"], mb["noise"], mb["eps_z"])
    assert rel(float(loss), want) < 1e-5, (float(loss), want)
    # The time ids matter: other original sizes give another loss.
    mb2 = dict(mb, time_ids=mb["time_ids"] * np.asarray([2, 2, 1, 1, 1, 1], np.float32))
    assert rel(float(jax.jit(objective.loss_fn)(parts["params"]["unet"], frozen_of(parts), mb2, 0)[0]), want) > 1e-4


def test_cache_holds_both_encoders_pooled_and_time_ids(tiny):
    """`cache.enabled` for SDXL: both encoders' states, the pooled embedding of every caption and of
    "", and each record's time ids from its size and center crop, as diffusers computes them."""
    parts, ref, c = tiny["parts"], tiny["ref"], tiny["config"]
    source, _ = ldm.make_source(c)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    frozen = ldm.put_global(frozen_of(parts), jax.tree_util.tree_map(lambda _: parallel.replicated(mesh),
                                                                      frozen_of(parts)))
    cache = ldm.build_cache(c, source, RES, parts, parts["tokenizer"], frozen, mesh)
    np.testing.assert_array_equal(cache["time_ids"], [[20, 30, 0, 4, 16, 16], [24, 16, 4, 0, 16, 16],
                                                      [40, 32, 2, 0, 16, 16], [16, 16, 0, 0, 16, 16]])
    with torch.no_grad():
        for i, cap in enumerate(CAPTIONS + [""]):
            states = []
            for tok, te in ((ref.tokenizer, ref.text_encoder), (ref.tokenizer_2, ref.text_encoder_2)):
                ids = tok([cap], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                out = te(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2][0].numpy())
            ctx = cache["empty"] if cap == "" else cache["context"][i]
            pooled = cache["empty_pooled"] if cap == "" else cache["pooled"][i]
            assert rel(ctx, np.concatenate(states, -1)) < 1e-5, cap
            assert rel(pooled, out[0][0].numpy()) < 1e-5, cap
    it = ldm.CacheIterator(cache, 4, 0)
    batch = next(it)
    assert set(batch) == set(sdxl_cond.batch_keys(True))
    idx, cap = it.indices(0)
    np.testing.assert_array_equal(batch["time_ids"], cache["time_ids"][idx])
    np.testing.assert_array_equal(batch["pooled"], cache["pooled"][cap])


def test_unsupported_settings_are_named(tiny):
    parts, c = tiny["parts"], tiny["config"]
    c2 = config(tiny["root"], **{"lora.rank": 4, "lora.text_encoder_targets": "q_proj"})
    with pytest.raises(ValueError, match="text_encoder_targets 'q_proj' with an SDXL model"):
        sdxl_cond.check(c2, parts)
    with pytest.raises(ValueError, match="SDXL refiner"):
        sdxl_cond.check(c, {**parts, "text_encoder": None})
    sdxl_cond.check(c, parts)  # the base with defaults passes


# --------------------------------------------------------------------------
# Config and memory plan
# --------------------------------------------------------------------------


def test_config_and_memory_plan():
    """configs/sdxl_finetune.py: the SDXL base at 1024 px, bf16, remat; the state bytes its
    docstring states are the arrays' (eval_shape of the real SDXL U-Net, AdamW, EMA)."""
    c = sdxl_finetune.get_config("/data/captions.jsonl")
    assert c.model.init_from == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (c.data.resolution, c.model.dtype, c.model.remat) == (1024, "bfloat16", True)
    assert c.data.path == "/data/captions.jsonl"
    fix = sdxl_finetune.get_config("/d.jsonl,fp16_fix_vae")
    assert fix.model.vae_from == "madebyollin/sdxl-vae-fp16-fix" and c.model.vae_from == ""
    plan = sdxl_finetune.memory_plan()
    assert plan["params"] == 2_567_463_684  # SDXL base U-Net
    gib = 2 ** 30
    assert round(plan["params_bytes"] / gib, 2) == 9.56
    # params + 2 AdamW moments + EMA (+ a few scalars: step, rng, Adam's count); fp32 gradients as params
    assert 0 <= plan["state_bytes_ema"] - 4 * plan["params_bytes"] < 1024
    assert 0 <= plan["state_bytes_no_ema"] - 3 * plan["params_bytes"] < 1024
    assert plan["gradient_bytes"] == plan["params_bytes"]
    doc = sdxl_finetune.__doc__
    for key in ("params_bytes", "state_bytes_ema", "state_bytes_no_ema"):
        assert f"{plan[key] / gib:.2f} GiB" in doc, key


# --------------------------------------------------------------------------
# End to end (slow): train, resume, export; cached; LoRA round trip
# --------------------------------------------------------------------------


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _fixed_loss(parts, c, unet_params, adapters=None):
    """Mean loss over 4 fixed noise draws of the dataset's (center-cropped) images."""
    objective = ldm.make_objective(parts, c, False, sdxl_cond.empty_ids(parts), None)
    frozen = frozen_of(parts)
    if adapters is not None:
        frozen = {**frozen, "unet": parts["params"]["unet"]}
    source, _ = ldm.make_source(c)
    batch = next(iter(data_lib.make_loader(source, global_batch_size=4, seed=0, resolution=RES, shuffle=False,
                                           size_conditioning=True, tokenizer=parts["tokenizer"],
                                           tokenizer_2=parts["tokenizer_2"])))
    host = sdxl_cond.stream_prepare(RES, 6)(batch)
    losses = []
    for seed in range(4):
        mb = {**_fixed_batch(seed), **host, "drop": np.zeros(4, bool)}
        losses.append(float(jax.jit(objective.loss_fn)(adapters if adapters is not None else unet_params,
                                                       frozen, mb, 0)[0]))
    return float(np.mean(losses))


@pytest.mark.slow
def test_train_resume_export(tiny, tmp_path):
    """4 steps: loss finite, the loss on fixed batches falls; eval samples; resumed from step 2 the
    params are those of the uninterrupted run; the export loads in StableDiffusionXLPipeline with
    the trained U-Net."""
    root, parts = tiny["root"], tiny["parts"]
    full_cfg = config(root, **{"eval.prompts": ["a red circle"], "eval.steps": 2})
    full = ldm.train_and_evaluate(full_cfg, tmp_path / "full")
    assert full["step"] == STEPS and full["samples"].shape == (1, RES, RES, 3)
    assert (tmp_path / "full" / "samples" / f"step_{STEPS}.png").exists()
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    trained = jax.device_get(full["state"].params)
    before, after = _fixed_loss(parts, full_cfg, parts["params"]["unet"]), _fixed_loss(parts, full_cfg, trained)
    assert after < 0.95 * before, (before, after)

    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    resumed = ldm.train_and_evaluate(config(root), tmp_path / "resumed")
    assert resumed["step"] == STEPS
    a, b = _flat(full["state"].params), _flat(resumed["state"].params)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6

    export = tmp_path / "full" / "export"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(export)
    w = pipe.unet.state_dict()["conv_in.weight"].numpy()
    np.testing.assert_allclose(w, a["conv_in/kernel"].transpose(3, 2, 0, 1), rtol=0, atol=1e-6)
    assert not np.allclose(a["conv_in/kernel"], np.asarray(parts["params"]["unet"]["conv_in"]["kernel"]))
    assert pipe.unet.config.sample_size == RES // 2


@pytest.mark.slow
def test_cached_run(tiny, tmp_path):
    """cache.enabled: two steps on the cached states, pooled embeddings and time ids."""
    out = ldm.train_and_evaluate(config(tiny["root"], **{"cache.enabled": True, "train.steps": 2,
                                                          "export": False}), tmp_path / "cached")
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "cached" / "metrics.jsonl")]
    assert out["step"] == 2 and np.all(np.isfinite(losses)) and 0.01 < losses[0] < 100


@pytest.mark.slow
def test_lora_round_trip_through_diffusers(tiny, tmp_path):
    """A LoRA trained on the SDXL U-Net's attention (to_q/k/v/out), exported, loaded by
    StableDiffusionXLPipeline.load_lora_weights: the U-Net output equals t2i_jax's with it."""
    root, parts = tiny["root"], tiny["parts"]
    c = config(root, **{"lora.rank": 4, "lora.alpha": 8.0, "optim.lr": 3e-2, "train.steps": 2})
    out = ldm.train_and_evaluate(c, tmp_path / "lora")
    adapters = jax.device_get(out["state"].params)
    targets = lora_lib.find_targets(parts["params"], c)
    assert {t.module.rsplit(".", 1)[-1] for t in targets} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert len(_flat(adapters)) == 2 * len(targets)
    r = np.random.RandomState(1)
    x = r.randn(2, RES // 2, RES // 2, 4).astype(np.float32)
    t = np.asarray([10, 700], np.int32)
    ctx = r.randn(2, 77, 64).astype(np.float32)
    added = {"text_embeds": r.randn(2, 32).astype(np.float32),
             "time_ids": sdxl_cond.batch_time_ids([[20, 30], [24, 16]], [[0, 4], [4, 0]], RES)}
    unet, base = parts["unet"], parts["params"]["unet"]
    ours = np.asarray(lora_lib.apply(unet, {"params": base}, adapters["unet"], x, t, ctx, added, lora_scale=2.0))
    plain = np.asarray(unet.apply({"params": base}, x, t, ctx, added))
    assert rel(ours, plain) > 1e-3  # the adapters change the output
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(root / "model")
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):  # diffusers/PEFT, kohya
        ref.unload_lora_weights()
        ref.load_lora_weights(str(tmp_path / "lora" / "export"), weight_name=name)
        with torch.no_grad():
            got = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                           added_cond_kwargs={k: torch.from_numpy(np.asarray(v)) for k, v in added.items()}
                           ).sample.permute(0, 2, 3, 1).numpy()
        assert rel(ours, got) < 1e-5, name
    # kohya SDXL files name the U-Net in the original (sgm) layout, as A1111's do.
    kohya = safetensors.numpy.load_file(tmp_path / "lora" / "export" / "lora_kohya.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya), sorted(kohya)[:4]
    assert not any(k.startswith("lora_unet_down_blocks_") for k in kohya)
    # The sampler's path: the adapters merged into the base kernels.
    merged = lora_lib.merged_params(parts["params"], adapters, targets, 2.0)
    assert rel(np.asarray(unet.apply({"params": merged["unet"]}, x, t, ctx, added)), got) < 1e-5
    assert unet_lib.text_time_sizes(unet.config, 32) == 6
