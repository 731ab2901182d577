"""Batch image generation: `python -m t2i_jax.sample [--model M] --prompt "..." --out DIR`.

Without --model, the bundled shapes model (t2i_jax/assets/shapes_model) is used.

Writes one PNG per image (prompt and settings in PNG text chunks), a
`manifest.jsonl` with one line per image, and `grid.png`. A rerun with the
same settings skips the images already in the manifest. Files are written
atomically, so a killed run leaves no half-written PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from t2i_jax.files import atomic_write

# The default model: a small text-to-image model trained from scratch on synthetic shapes
# (scripts/train_bundled_model.sh), shipped inside the package so the CLI runs offline.
BUNDLED_MODEL_NAME = "t2i_jax/assets/shapes_model"
BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes_model"

STYLES = {
    # name: (prompt template, negative prompt)
    "photographic": ("cinematic photo of {prompt}, 35mm photograph, film, professional, 4k, highly detailed",
                     "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly"),
    "cinematic": ("cinematic film still of {prompt}, shallow depth of field, vignette, highly detailed, "
                  "high budget, bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy",
                  "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, "
                  "mutated, ugly, disfigured"),
    "anime": ("anime artwork of {prompt}, anime style, key visual, vibrant, studio anime, highly detailed",
              "photo, deformed, black and white, realism, disfigured, low contrast"),
    "line-art": ("line art drawing of {prompt}, professional, sleek, modern, minimalist, graphic, line art, "
                 "vector graphics",
                 "anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center, deformed, "
                 "cross-eyed, closed eyes, bad anatomy, ugly, disfigured, mutated, realism, realistic, "
                 "impressionism, expressionism, oil, acrylic"),
    "van-gogh": ("{prompt}, oil painting in the style of Vincent van Gogh, thick impasto brush strokes, "
                 "swirling sky, vivid colours",
                 "photo, photorealistic, 3d render, flat colours, smooth, blurry, deformed"),
    "watercolor": ("watercolor painting of {prompt}, soft washes, paper texture, delicate, artistic",
                   "photo, photorealistic, 3d render, harsh lines, deformed, ugly"),
    "pixel-art": ("pixel art of {prompt}, low-res, blocky, 16-bit game art, crisp pixels",
                  "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic"),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make: everything it depends on."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float

    def key(self, common: dict) -> str:
        """A stable identity for the manifest (this job under these run settings)."""
        return json.dumps({**dataclasses.asdict(self), **common}, sort_keys=True)


# --------------------------------------------------------------------------
# Building the job list
# --------------------------------------------------------------------------


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """Prompts, one per line (plain text) or JSONL objects with `prompt` and
    optional `negative_prompt`, `seed`, `steps`, `guidance`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {p}")
    entries = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e.msg}); write one JSON object per line") from e
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise ValueError(f"{p}:{n}: a JSONL line needs a non-empty \"prompt\" string")
            unknown = set(obj) - {"prompt", "negative_prompt", "seed", "steps", "guidance"}
            if unknown:
                raise ValueError(f"{p}:{n}: unknown field(s) {sorted(unknown)}; allowed: prompt, "
                                 "negative_prompt, seed, steps, guidance")
            entries.append(obj)
        else:
            entries.append({"prompt": line})
    if not entries:
        raise ValueError(f"prompts file {p} holds no prompts; write one prompt per line")
    return entries


def build_jobs(entries: Sequence[dict], *, negative_prompt: str, style: str | None, seed: int,
               steps: int, guidance_scale: float, num_images_per_prompt: int) -> list[Job]:
    """Expands prompt entries into jobs. Image k of a prompt gets seed
    `entry seed + k` if the entry names a seed, else `seed + running index`."""
    if num_images_per_prompt < 1:
        raise ValueError(f"--num-images-per-prompt {num_images_per_prompt} must be >= 1")
    template, style_negative = ("{prompt}", "")
    if style is not None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
        template, style_negative = STYLES[style]
    jobs = []
    for e in entries:
        neg = e.get("negative_prompt", negative_prompt)
        neg = ", ".join(x for x in (neg, style_negative) if x)
        for k in range(num_images_per_prompt):
            s = e["seed"] + k if "seed" in e else seed + len(jobs)
            jobs.append(Job(template.format(prompt=e["prompt"]), neg, int(s), int(e.get("steps", steps)),
                            float(e.get("guidance", guidance_scale))))
    return jobs


def batches(jobs: Sequence[Job], batch_size: int):
    """Groups jobs that can share a compiled call (same steps and guidance)
    into batches of at most `batch_size`, in first-seen order."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.steps, j.guidance_scale), []).append(j)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i: i + batch_size]


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


def file_name(job: Job, index: int, common: dict) -> str:
    """`INDEX-PROMPT-sSEED-HASH.png`: readable, and unique per job and settings
    (the hash), so reruns with other settings never overwrite an image."""
    import hashlib

    digest = hashlib.sha1(job.key(common).encode()).hexdigest()[:8]
    return f"{index:05d}-{_slug(job.prompt)}-s{job.seed}-{digest}.png"


def save_png(path: Path, image: np.ndarray, text: dict) -> None:
    """Writes a uint8 HWC image as PNG with `text` in tEXt chunks, atomically."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=info))


def read_manifest(path: Path) -> dict[str, dict]:
    """Manifest entries by job key, keeping only those whose PNG exists."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if (path.parent / entry["file"]).is_file():
                done[entry["key"]] = entry
    return done


def contact_sheet(images: Sequence[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Tiles same-size uint8 images into one grid image."""
    n = len(images)
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    h, w, c = images[0].shape
    sheet = np.full((rows * h, cols * w, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        sheet[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return sheet


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m t2i_jax.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="diffusers folder, hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) "
                        "or single-file checkpoint (.safetensors/.ckpt); default: the bundled shapes model "
                        "(t2i_jax/assets/shapes_model, 32 px, trained from scratch on synthetic shapes)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with prompt/negative_prompt/seed/"
                                          "steps/guidance")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--style", help=f"prompt template preset: {', '.join(sorted(STYLES))}")
    p.add_argument("--num-images-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (padded up to a multiple of the device count; default: the device count)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="pndm")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--init-image", help="img2img: start from this image (resized to height x width)")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change (0, 1]")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="compute dtype (default: bf16 on GPU/TPU, fp32 on CPU); params stay as loaded")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto",
                   help="attention: auto (cuDNN flash attention on NVIDIA GPUs where the head size and dtype "
                        "allow, XLA elsewhere), xla, or cudnn (needs bf16/fp16)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (~/.cache/t2i_jax/jax)")
    return p.parse_args(argv)


def _load_init_image(path: str, height: int, width: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((width, height), Image.LANCZOS)
            return np.asarray(im, np.float32) / 255.0
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init image not found: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read init image {path}: {e}; pass a PNG or JPEG file") from e


def run(args: argparse.Namespace) -> dict:
    """Generates the images of `args`; returns a summary dict (counts, timings)."""
    import jax
    import jax.numpy as jnp

    from t2i_jax import pipeline, schedulers
    from t2i_jax.convert.load import load_components

    # Cheap checks first, before anything is loaded or compiled.
    if args.scheduler not in schedulers.SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; choose one of {sorted(schedulers.SCHEDULERS)}")
    pipeline.check_settings(args.steps, args.guidance_scale, args.strength if args.init_image else None)
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            pipeline.check_size(name, getattr(args, name), 8)
    entries = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        entries += read_prompts_file(args.prompts_file)
    if not entries:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not e["prompt"].strip() for e in entries):
        raise ValueError("a prompt is empty; give every --prompt some text")
    jobs = build_jobs(entries, negative_prompt=args.negative_prompt, style=args.style, seed=args.seed,
                      steps=args.steps, guidance_scale=args.guidance_scale,
                      num_images_per_prompt=args.num_images_per_prompt)
    for j in jobs:
        pipeline.check_settings(j.steps, j.guidance_scale)

    if not args.no_compilation_cache:
        cache = Path(os.environ.get("T2I_JAX_CACHE", Path.home() / ".cache" / "t2i_jax" / "jax"))
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    platform = jax.devices()[0].platform
    dtype_name = args.dtype or ("fp32" if platform == "cpu" else "bf16")
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[dtype_name]
    if args.attention == "cudnn" and dtype == jnp.float32:
        raise ValueError("--attention cudnn needs bf16 or fp16 compute; pass --dtype bf16, "
                         "or --attention auto (cuDNN where it applies)")
    if args.model is None:
        pipe = load_components(BUNDLED_MODEL)
        print(f"model: bundled shapes model ({BUNDLED_MODEL_NAME}); for Stable Diffusion pass "
              "--model stable-diffusion-v1-5/stable-diffusion-v1-5", file=sys.stderr)
    else:
        pipe = load_components(args.model)
        print(f"model: {pipe.source}", file=sys.stderr)
    native = pipe.unet.config.sample_size * pipe.vae_scale
    height, width = args.height or native, args.width or native
    pipeline.check_size("height", height, pipe.vae_scale)
    pipeline.check_size("width", width, pipe.vae_scale)
    init = _load_init_image(args.init_image, height, width) if args.init_image else None

    sampler = pipeline.Sampler(pipe, dtype=dtype, attention_impl=args.attention)
    ndev = sampler.num_devices
    bs = args.batch_size or ndev
    if bs < 1:
        raise ValueError(f"--batch-size {bs} must be >= 1")
    bs = -(-bs // ndev) * ndev

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.jsonl"
    common = {"model": pipe.source, "scheduler": args.scheduler, "height": height, "width": width,
              "dtype": dtype_name, "init_image": args.init_image,
              "strength": args.strength if args.init_image else None}
    done = read_manifest(manifest_path)
    position: dict[str, int] = {}  # job key -> index of its first occurrence
    for i, j in enumerate(jobs):
        position.setdefault(j.key(common), i)
    todo = [j for i, j in enumerate(jobs) if position[j.key(common)] == i and j.key(common) not in done]
    skipped = len(position) - len(todo)
    if skipped:
        print(f"skipping {skipped} image(s) already in {manifest_path}", file=sys.stderr)

    from tqdm import tqdm

    made, gen_time = 0, 0.0
    all_batches = list(batches(todo, bs))
    with open(manifest_path, "a", encoding="utf-8") as manifest:
        for batch in tqdm(all_batches, desc="batches", unit="batch", disable=not all_batches):
            real = len(batch)
            padded = list(batch) + [batch[-1]] * (bs - real)  # padding rows are computed and dropped
            t0 = time.perf_counter()
            images = sampler(
                [j.prompt for j in padded], seeds=[j.seed for j in padded],
                negative_prompts=[j.negative_prompt for j in padded], steps=batch[0].steps,
                guidance_scale=batch[0].guidance_scale, scheduler=args.scheduler, height=height,
                width=width, strength=args.strength,
                init_images=None if init is None else np.repeat(init[None], bs, axis=0))
            gen_time += time.perf_counter() - t0
            images = pipeline.to_uint8(images[:real])
            for j, im in zip(batch, images):
                name = file_name(j, position[j.key(common)], common)
                meta = {**dataclasses.asdict(j), **common}
                save_png(out / name, im, {"parameters": meta, "prompt": j.prompt, "software": "t2i_jax"})
                manifest.write(json.dumps({"file": name, "key": j.key(common), **meta}) + "\n")
                manifest.flush()
                made += 1

    entries_done = read_manifest(manifest_path)
    files = [e["file"] for e in entries_done.values()]
    if files:
        from PIL import Image

        thumbs = [np.asarray(Image.open(out / f).convert("RGB")) for f in files[:64]]
        shape = thumbs[0].shape
        thumbs = [t for t in thumbs if t.shape == shape]
        grid = contact_sheet(thumbs)
        atomic_write(out / "grid.png", lambda f: Image.fromarray(grid).save(f, format="PNG"))
    summary = {"made": made, "skipped": skipped, "seconds": gen_time, "devices": ndev,
               "device_kind": jax.devices()[0].device_kind, "batch_size": bs, "out": str(out)}
    if made:
        summary["images_per_s"] = made / gen_time
        summary["images_per_s_per_device"] = made / gen_time / ndev
        print(f"{made} image(s) in {gen_time:.1f}s: {made / gen_time:.3f} images/s, "
              f"{made / gen_time / ndev:.3f} images/s per device ({ndev} x {summary['device_kind']}; "
              "includes compilation on the first batch)", file=sys.stderr)
    print(f"images in {out.resolve()} (manifest.jsonl, grid.png)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
