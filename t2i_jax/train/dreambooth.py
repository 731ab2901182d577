"""DreamBooth (Ruiz et al. 2022) as an option of the latent-diffusion trainer (`config.dreambooth`).

    python -m t2i_jax.train --config configs/dreambooth_sd15.py:/data/my_dog --workdir runs/sks_dog

A few images of one subject are taught under an instance prompt with a rare
identifier ("a photo of sks dog"). With prior preservation, class images of
the class prompt ("a photo of a dog") are generated once, before training, by
the model being fine-tuned (`pipeline.Sampler`) into `<workdir>/class_images/`
and every batch holds as many class examples as instance examples; the loss is

    loss = instance_loss + prior_loss_weight * prior_loss

as diffusers' examples/dreambooth/train_dreambooth.py: each term the mean of
its examples' MSE, min-SNR weighting (`diffusion.snr_gamma`) on the instance
term only. diffusers concatenates [instances, classes] and splits the loss in
halves; here every example carries an `is_class` flag and the two means are
taken over the flags, so the same numbers come out whatever the batch's
layout over devices, hosts and accumulated micro-batches.

DreamBooth changes only the data and the loss weighting, never which params
train: with a LoRA config section set too, the adapters are trained instead of
the U-Net (DreamBooth as LoRA).

Batches are drawn by (seed, step) alone from in-memory arrays (the few images
decoded once, or their latents and text states with `cache.enabled`); the
iterator's state is its step, checkpointed with the train state, so a resumed
run continues with exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2i_jax import data as data_lib
from t2i_jax import parallel
from t2i_jax.files import atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST = "manifest.json"
# The class-image settings an image depends on (with its seed); a folder made with others is not reused.
SETTINGS = ("prompt", "negative_prompt", "steps", "guidance_scale", "scheduler", "resolution", "seed")


# ===========================================================================
# Config
# ===========================================================================

def default_config() -> ml_collections.ConfigDict:
    """The `config.dreambooth` section (off by default)."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.instance_images = ""  # a folder of the subject's images (jpg/png/webp/bmp), e.g. 3-10 of them
    c.instance_prompt = ""  # e.g. "a photo of sks dog": a rare token ("sks") and the class noun
    c.class_prompt = ""  # e.g. "a photo of a dog" (needed with prior_preservation)
    c.prior_preservation = False  # mix class images of the class prompt into every batch
    c.prior_loss_weight = 1.0  # loss = instance loss + prior_loss_weight * class loss (diffusers' default)
    c.num_class_images = 100  # generated once into <workdir>/class_images (only missing ones on a re-run)
    # How the class images are sampled from the model before training (image i has seed class_seed + i).
    c.class_steps = 50
    c.class_guidance_scale = 7.5
    c.class_scheduler = "pndm"
    c.class_negative_prompt = ""
    c.class_seed = 0
    c.class_batch_size = 4  # images per Sampler call (rounded up to a multiple of the devices used)
    return c


def batch_keys(config) -> tuple[str, ...]:
    """The host arrays DreamBooth adds to a train batch: the per-example `is_class` flag (int32)."""
    return ("is_class",) if config.dreambooth.enabled else ()


def example_counts(config) -> tuple[int, int]:
    """(instance, class) examples in each global batch: half and half with prior preservation
    (diffusers' `train_batch_size` of each), else all instance."""
    b = int(config.batch_size)
    return (b // 2, b - b // 2) if config.dreambooth.prior_preservation else (b, 0)


def instance_files(folder) -> list[Path]:
    """The image files directly in `folder`, sorted by name; errors name the folder and the fix."""
    p = Path(folder)
    if not str(folder):
        raise ValueError("dreambooth.instance_images is not set; set it to a folder of your subject's images, "
                         "e.g. --config.dreambooth.instance_images=/data/my_dog")
    if not p.is_dir():
        raise ValueError(f"dreambooth.instance_images {str(folder)!r} is not a folder"
                         f"{'' if p.exists() else ' (it does not exist)'}; set it to a folder holding your "
                         f"subject's images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                   and not f.name.startswith("."))
    if not files:
        raise ValueError(f"dreambooth.instance_images {str(folder)!r} holds no images (files ending in "
                         f"{', '.join(IMAGE_SUFFIXES)}); put 3-10 photos of your subject there")
    return files


def check_config(config) -> list[Path]:
    """Checks `config.dreambooth` before any model is loaded; returns the instance image files."""
    db = config.dreambooth
    files = instance_files(db.instance_images)
    if not db.instance_prompt.strip():
        raise ValueError("dreambooth.instance_prompt is empty; set it to a prompt naming your subject with a rare "
                         "identifier, e.g. --config.dreambooth.instance_prompt='a photo of sks dog'")
    if db.prior_preservation:
        if not db.class_prompt.strip():
            raise ValueError("dreambooth.prior_preservation is on but dreambooth.class_prompt is empty; set it to "
                             "the subject's class without the identifier, e.g. "
                             "--config.dreambooth.class_prompt='a photo of a dog', or turn prior preservation off")
        if int(db.num_class_images) < 1:
            raise ValueError(f"dreambooth.num_class_images is {db.num_class_images}; prior preservation needs at "
                             "least 1 class image (diffusers uses 100-200)")
        if int(config.batch_size) % 2:
            raise ValueError(f"batch_size {config.batch_size} is odd; with prior preservation half the batch is "
                             f"instance and half class examples: use {int(config.batch_size) + 1}")
    if not config.model.init_from:
        raise ValueError("DreamBooth fine-tunes a trained model, but model.init_from is empty; set it to a "
                         "Stable Diffusion folder, hub id or single file (e.g. t2i_jax/assets/shapes_model)")
    if config.cache.enabled and int(config.cache.size):
        raise ValueError(f"cache.size is {config.cache.size}; with DreamBooth the cache holds every instance and "
                         "class image: set cache.size=0")
    return files


# ===========================================================================
# Class images: generated once by the model before training
# ===========================================================================

def class_settings(config) -> dict:
    """What a class image depends on besides its index (its seed is `seed` + index)."""
    db = config.dreambooth
    return {"prompt": db.class_prompt, "negative_prompt": db.class_negative_prompt, "steps": int(db.class_steps),
            "guidance_scale": float(db.class_guidance_scale), "scheduler": db.class_scheduler,
            "resolution": int(config.data.resolution), "seed": int(db.class_seed)}


def class_image_name(i: int) -> str:
    return f"{i:05d}.png"


def _read_manifest(folder: Path, settings: dict) -> set[str]:
    """The image names a folder's manifest lists as done, after checking it was made with `settings`."""
    path = folder / MANIFEST
    if not path.exists():
        return set()
    saved = json.loads(path.read_text())
    diff = [k for k in SETTINGS if saved.get("settings", {}).get(k) != settings[k]]
    if diff:
        what = ", ".join(f"{k} {saved.get('settings', {}).get(k)!r} (now {settings[k]!r})" for k in diff)
        raise ValueError(f"the class images in {folder} were generated with {what}; set the dreambooth.class_* "
                         f"settings back, or delete {folder} to generate new ones")
    return set(saved.get("images", []))


def _write_manifest(folder: Path, settings: dict, done: set[str]) -> None:
    text = json.dumps({"settings": settings, "images": sorted(done)}, indent=1).encode()
    atomic_write(folder / MANIFEST, lambda f: f.write(text))


def generate_class_images(make_sampler, folder, settings: dict, num: int, *, batch_size: int = 4,
                          progress: bool = True) -> list[Path]:
    """Makes sure `folder` holds class images 0 .. num-1 of `settings` (`class_settings`) and
    returns their paths.

    `make_sampler()` returns the `pipeline.Sampler` of the model, called only if an image is
    missing. Image i is `sampler([prompt], seeds=[seed + i], ...)`, written as `{i:05d}.png` (to a temporary
    name, then renamed) and listed in `folder/manifest.json` with the settings. Images the manifest
    already lists are reused; only missing ones are generated, `batch_size` per Sampler call
    (rounded up to the Sampler's device count; the last call is padded with further seeds).
    Raises ValueError if the folder's images were made with other settings.
    """
    from PIL import Image

    from t2i_jax import pipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = _read_manifest(folder, settings)
    done = {n for n in done if (folder / n).exists()}
    todo = [i for i in range(num) if class_image_name(i) not in done]
    if todo:
        _write_manifest(folder, settings, done)  # the settings first: a killed run's images are reused
        sampler = make_sampler()
        n_dev = sampler.num_devices
        bs = max(n_dev, -(-int(batch_size) // n_dev) * n_dev)
        chunks = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        log.info("generating %d class images of %r in %s (%d already there)", len(todo), settings["prompt"],
                 folder, num - len(todo))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="class images", dynamic_ncols=True)
        side = settings["resolution"]
        for chunk in chunks:
            seeds = [settings["seed"] + i for i in chunk]
            seeds += [seeds[-1] + 1 + k for k in range(bs - len(chunk))]  # padding, discarded
            images = sampler([settings["prompt"]] * bs, seeds=seeds,
                             negative_prompts=[settings["negative_prompt"]] * bs, steps=settings["steps"],
                             guidance_scale=settings["guidance_scale"], scheduler=settings["scheduler"],
                             height=side, width=side)
            for i, img in zip(chunk, pipeline.to_uint8(images)):
                atomic_write(folder / class_image_name(i), lambda f, img=img: Image.fromarray(img).save(f, "PNG"))
                done.add(class_image_name(i))
            _write_manifest(folder, settings, done)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    return [folder / class_image_name(i) for i in range(num)]


# ===========================================================================
# Data: the records and the mixed stream
# ===========================================================================

class MixedIterator:
    """Global batches of `n_instance_rows` instance then `n_class_rows` class examples, drawn by
    (seed, step) only: the instance set is walked in epochs, each a permutation of it from
    `default_rng([seed, 0, epoch])`, the class set likewise with stream 1. Each host returns its
    rows of the global batch: `take(indices, is_class)` turns record indices into host arrays,
    and `is_class` (int32) is added.

    Checkpointable like a grain iterator (`get_state` / `set_state` bytes).
    """

    def __init__(self, take, num_instance: int, num_class: int, counts: tuple[int, int], seed: int):
        self.take, self.num_instance, self.num_class, self.seed, self.step = take, num_instance, num_class, seed, 0
        self.counts = counts
        b = sum(counts)
        per = b // jax.process_count()
        self.rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)

    def _walk(self, stream: int, n: int, rows: int, step: int) -> np.ndarray:
        pos = step * rows + np.arange(rows)
        epochs, out = pos // n, np.empty(rows, np.int64)
        for e in np.unique(epochs):
            out[epochs == e] = np.random.default_rng([self.seed, stream, int(e)]).permutation(n)[pos[epochs == e] % n]
        return out

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(record indices, is_class) of the global batch of `step`; class records follow the
        instance ones in the record list."""
        ni, nc = self.counts
        idx = self._walk(0, self.num_instance, ni, step)
        if nc:
            idx = np.concatenate([idx, self.num_instance + self._walk(1, self.num_class, nc, step)])
        return idx, np.repeat(np.array([0, 1], np.int32), [ni, nc])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx, is_class = (a[self.rows] for a in self.indices(self.step))
        self.step += 1
        return {**self.take(idx, is_class), "is_class": is_class}

    def get_state(self) -> bytes:
        return json.dumps({"step": self.step, "seed": self.seed, "instance": self.num_instance,
                           "class": self.num_class, "counts": list(self.counts)}).encode()

    def set_state(self, state) -> None:
        s = json.loads(state.decode() if isinstance(state, bytes) else state)
        mine = {"seed": self.seed, "instance": self.num_instance, "class": self.num_class, "counts": list(self.counts)}
        theirs = {k: s.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"the checkpoint's DreamBooth data was {theirs}; this run's is {mine}: resume with the "
                             "instance and class images it was saved with")
        self.step = s["step"]

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after a restore
        pass


def _center_crop(img: np.ndarray, res: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - res) // 2, (w - res) // 2
    return img[top:top + res, left:left + res]


class DreamBooth:
    """The run's DreamBooth data: checks the config (`check_config`), then `prepare` makes the
    class images and the record list, and `cached_iterator` / `stream_iterator` the mixed stream."""

    def __init__(self, config):
        self.config = config
        self.instance = check_config(config)
        self.classes: list[Path] = []
        self.source = None
        self.counts = example_counts(config)

    @property
    def epoch_size(self) -> int:
        """Examples per epoch, as diffusers' DreamBoothDataset: max(instances, classes) of each kind."""
        n = max(len(self.instance), len(self.classes)) if self.counts[1] else len(self.instance)
        return n * (2 if self.counts[1] else 1)

    def prepare(self, workdir, pipe, *, is_main: bool = True) -> tuple[data_lib.CaptionSource, dict]:
        """Generates the missing class images with `pipe` (the model before training, a
        `StableDiffusion`; process 0 on its local devices, the others wait) and decodes every image
        once (an undecodable instance image is an error naming it). Returns (source, data config):
        the records, instances (instance prompt) then class images (class prompt)."""
        from t2i_jax import pipeline

        config, db = self.config, self.config.dreambooth
        res = int(config.data.resolution)
        if self.counts[1]:
            folder = Path(workdir) / "class_images"
            if is_main:
                n = min(int(config.mesh.num_devices) or jax.local_device_count(), jax.local_device_count())
                self.classes = generate_class_images(
                    lambda: pipeline.Sampler(pipe, mesh=parallel.make_mesh(devices=jax.local_devices()[:n])), folder,
                    class_settings(config), int(db.num_class_images), batch_size=int(db.class_batch_size),
                    progress=bool(config.progress))
            else:
                self.classes = [folder / class_image_name(i) for i in range(int(db.num_class_images))]
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("dreambooth class images")
        pixels = []
        for f in self.instance + self.classes:
            try:
                pixels.append(_center_crop(data_lib.decode_image(str(f), res), res))
            except Exception as e:  # noqa: BLE001  named, with the fix
                raise ValueError(f"DreamBooth image {f} does not decode ({e}); remove or replace it") from e
        self.pixels = np.stack(pixels)
        files = self.instance + self.classes
        captions = [[db.instance_prompt]] * len(self.instance) + [[db.class_prompt]] * len(self.classes)
        self.source = data_lib.CaptionSource("dreambooth", str(db.instance_images), [str(f) for f in files],
                                             captions, [f.name for f in files])
        log.info("DreamBooth: %d instance images (%r), %d class images (%r); per batch %d + %d", len(self.instance),
                 db.instance_prompt, len(self.classes), db.class_prompt, *self.counts)
        return self.source, {"resolution": res, "seed": int(config.data.get("seed", 0))}

    def _iterator(self, take) -> MixedIterator:
        return MixedIterator(take, len(self.instance), len(self.classes), self.counts,
                             int(self.config.data.get("seed", 0)))

    def cached_iterator(self, cache: dict) -> MixedIterator:
        """The mixed stream over `ldm.build_cache`'s encoding of `self.source` (one caption each)."""
        if cache["skipped"] or len(cache["mean"]) != len(self.source):
            raise ValueError(f"the cache left out DreamBooth images {cache['skipped']}; remove or replace them")
        return self._iterator(lambda idx, _: {"mean": cache["mean"][idx], "std": cache["std"][idx],
                                              "context": cache["context"][cache["cap_start"][idx]]})

    def stream_iterator(self, tokenizer) -> MixedIterator:
        """The mixed stream of images in [-1, 1] and the token ids of their prompts."""
        db = self.config.dreambooth
        ids = tokenizer([db.instance_prompt, db.class_prompt or ""])
        return self._iterator(lambda idx, is_class: {
            "image": self.pixels[idx].astype(np.float32) / 127.5 - 1.0, "input_ids": ids[is_class]})


# ===========================================================================
# Loss
# ===========================================================================

def prior_preservation_loss(instance_errors, class_errors, is_class, config):
    """(loss, aux) of a (micro-)batch: instance_loss + prior_loss_weight * prior_loss.

    `instance_errors` / `class_errors` [b]: per-example MSE (min-SNR-weighted / plain, as diffusers
    weights only the instance term); `is_class` [b] the flags. Each term is the mean over its kind
    in the whole step's batch (`example_counts`): a micro-batch contributes its sums divided by
    those counts times `train.grad_accum`, so the loop's mean over micro-batches is exactly the
    full batch's loss whatever the micro-batches hold.
    """
    ni, nc = example_counts(config)
    scale = float(config.train.grad_accum)
    c = is_class.astype(jnp.float32)
    instance = scale * jnp.sum((1.0 - c) * instance_errors) / ni
    if not nc:
        return instance, {"instance_loss": instance}
    prior = scale * jnp.sum(c * class_errors) / nc
    return instance + float(config.dreambooth.prior_loss_weight) * prior, {"instance_loss": instance,
                                                                           "prior_loss": prior}
