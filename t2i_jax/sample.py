"""Batch image generation: `python -m t2i_jax.sample [--model M] --prompt "..." --out DIR`.

Without --model, the bundled shapes model (t2i_jax/assets/shapes_model) is
used. Its text encoder reads 16 tokens (start and end tokens included, about
12 words); Stable Diffusion's reads 77. The context length is printed at
start-up. A prompt that does not fit is encoded in chunks of the context
(--prompt-syntax a1111, the default, which also reads (emphasis:1.2)); with
--prompt-syntax none it is cut, and named in one warning line.

Seeds: image i (0-based) of prompt entry e (0-based: the --prompt flags in
order, then the lines of --prompts-file) gets seed `--seed + 1000 * e + i`,
or `S + i` when the entry gives its own `"seed": S`. So adding images to a
prompt, or prompts after it, never changes an image already made. Files are
named `EEEE-III-PROMPT-sSEED-HASH.png` after the entry and index.

Writes one PNG per image (prompt and settings in PNG text chunks), a
`manifest.jsonl` with one line per image, and `grid.png` with this run's
images. A rerun with the same settings skips the images already in the
manifest (an init image is recognised by its pixels, not its path). Files are
written atomically, and Ctrl-C stops after the image being saved, so a stopped
run leaves a consistent manifest.

--enhance-prompt continues each job's prompt (styled, if --style applied)
with a GPT-2 prompt model (default Gustavosta/MagicPrompt-Stable-Diffusion)
sampled with the image's seed; the image's key and file name keep the
original prompt, so a rerun knows what is done without the enhancer.

--style templates are applied only where the whole styled prompt fits the
text encoder's context: where it does not (every style with the bundled
model), the prompt is used as written, with one warning line, rather than
letting the template push the prompt's own words out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from t2i_jax.files import atomic_write, read_image

# The default model: a small text-to-image model trained from scratch on synthetic shapes
# (scripts/train_bundled_model.sh), shipped inside the package so the CLI runs offline.
BUNDLED_MODEL_NAME = "t2i_jax/assets/shapes_model"
BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes_model"

# Image i of prompt entry e gets seed `base + SEED_STRIDE * e + i`: entries
# own disjoint seed ranges, so one entry gaining images never moves another's.
SEED_STRIDE = 1000
MAX_SEED = 2**32 - 1  # seeds are uint32 (pipeline.stream_keys)


STYLES = {
    # name: (prompt template, negative prompt)
    "photographic": ("cinematic photo of {prompt}, 35mm photograph, film, professional, 4k, highly detailed",
                     "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly"),
    "cinematic": (("cinematic film still of {prompt}, shallow depth of field, vignette, highly detailed, "
                   "high budget, bokeh, cinemascope, moody, epic, gorgeous, film grain, grainy"),
                  ("anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, "
                   "mutated, ugly, disfigured")),
    "anime": ("anime artwork of {prompt}, anime style, key visual, vibrant, studio anime, highly detailed",
              "photo, deformed, black and white, realism, disfigured, low contrast"),
    "line-art": (("line art drawing of {prompt}, professional, sleek, modern, minimalist, graphic, line art, "
                  "vector graphics"),
                 ("anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center, deformed, "
                  "cross-eyed, closed eyes, bad anatomy, ugly, disfigured, mutated, realism, realistic, "
                  "impressionism, expressionism, oil, acrylic")),
    "van-gogh": (("{prompt}, oil painting in the style of Vincent van Gogh, thick impasto brush strokes, "
                  "swirling sky, vivid colours"),
                 "photo, photorealistic, 3d render, flat colours, smooth, blurry, deformed"),
    "watercolor": ("watercolor painting of {prompt}, soft washes, paper texture, delicate, artistic",
                   "photo, photorealistic, 3d render, harsh lines, deformed, ugly"),
    "pixel-art": ("pixel art of {prompt}, low-res, blocky, 16-bit game art, crisp pixels",
                  "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic"),
}



def bundled_context_length() -> int:
    """The bundled model's text context in tokens (start and end included), from its tokenizer config."""
    config = json.loads((BUNDLED_MODEL / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    return int(config["model_max_length"])


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what was saved and how to resume."""


# --------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------


class _DropBackendNoise(logging.Filter):
    """Drops jax's report of a platform plugin that found no device ('Unable
    to initialize backend tpu'): a CPU or GPU user is told about a TPU they
    never asked for on every run. Other jax warnings (e.g. a GPU left unused
    for want of a CUDA jaxlib) still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable to initialize backend")


def quiet_console() -> None:
    """Silences the start-up messages that say nothing about this run; called
    by `main` before jax or transformers is imported."""
    # transformers logs "PyTorch was not found. Models won't be available..."
    # through its advisory channel on every import without torch, which is
    # the default install of this package (torch is an extra).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _DropBackendNoise) for f in logger.filters):
        logger.addFilter(_DropBackendNoise())


def warn(message: str) -> None:
    """One clean warning line on stderr (no source path, no category)."""
    print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------
# Building the job list
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One image to make: everything it depends on, and where it sits in the
    prompt list (`entry`, `index`), which names its file but is not part of
    its identity."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    entry: int = 0
    index: int = 0

    def key(self, common: dict) -> str:
        """A stable identity for the manifest (this job under these run settings)."""
        d = dataclasses.asdict(self)
        del d["entry"], d["index"]
        return json.dumps({**d, **common}, sort_keys=True)


# JSONL field -> (accepted JSON types, what to write instead, an example).
_FIELDS = {
    "prompt": ((str,), "a string", '"a red circle"'),
    "negative_prompt": ((str,), "a string", '"blurry"'),
    "seed": ((int,), f"an integer in [0, {MAX_SEED}]", "42"),
    "steps": ((int,), "an integer >= 1", "30"),
    "guidance": ((int, float), "a number >= 1", "7.5"),
    "guidance_scale": ((int, float), "a number >= 1", "7.5"),
}


def _check_field(where: str, name: str, value) -> None:
    types, want, example = _FIELDS[name]
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and name == "seed":
        ok = 0 <= value <= MAX_SEED
    elif ok and name in ("steps", "guidance", "guidance_scale"):
        ok = value >= 1
    if not ok:
        raise ValueError(f"{where}: field \"{name}\" is {json.dumps(value)}; write {want}, "
                         f"e.g. \"{name}\": {example}")


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """Prompts, one per line (plain text) or JSONL objects with `prompt` and
    optional `negative_prompt`, `seed`, `steps`, `guidance` (or
    `guidance_scale`). Entries come back with `guidance_scale` as the key.
    A field of the wrong type or range raises a ValueError naming the file,
    the line and the field."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--prompts-file {p} is a folder; pass a text or JSONL file")
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {p}")
    entries = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            entries.append({"prompt": line})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg}); write one JSON object per line") from e
        unknown = set(obj) - set(_FIELDS)
        if unknown:
            raise ValueError(f"{p}:{n}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(_FIELDS)}")
        if "prompt" not in obj:
            raise ValueError(f"{p}:{n}: a JSONL line needs a \"prompt\" string")
        for name, value in obj.items():
            _check_field(f"{p}:{n}", name, value)
        if not obj["prompt"].strip():
            raise ValueError(f"{p}:{n}: field \"prompt\" is empty; give it some text")
        if "guidance" in obj and "guidance_scale" in obj:
            raise ValueError(f"{p}:{n}: both \"guidance\" and \"guidance_scale\" given; keep one")
        if "guidance" in obj:
            obj["guidance_scale"] = obj.pop("guidance")
        entries.append(obj)
    if not entries:
        raise ValueError(f"prompts file {p} holds no prompts; write one prompt per line")
    return entries


def image_seed(base: int, entry: int, index: int, entry_seed: int | None = None) -> int:
    """The seed of image `index` of prompt entry `entry`: `entry_seed + index`
    when the entry names a seed, else `base + SEED_STRIDE * entry + index`."""
    start = entry_seed if entry_seed is not None else base + SEED_STRIDE * entry
    return start + index


def style_prompt(prompt: str, negative: str, style: str | None,
                 fits: Callable[[str], bool] = lambda text: True) -> tuple[str, str, bool]:
    """(prompt, negative prompt, styled) with `style`'s template and negative
    prompt applied, when both fit the text encoder (`fits`); otherwise the
    prompt and negative prompt as given and styled False, so a template never
    pushes the prompt's own words out of a short context."""
    if style is None:
        return prompt, negative, False
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    template, style_negative = STYLES[style]
    styled = template.format(prompt=prompt)
    styled_negative = ", ".join(x for x in (negative, style_negative) if x)
    if fits(styled) and fits(styled_negative):
        return styled, styled_negative, True
    return prompt, negative, False


def build_jobs(entries: Sequence[dict], *, negative_prompt: str, style: str | None, seed: int,
               steps: int, guidance_scale: float, num_images_per_prompt: int,
               fits: Callable[[str], bool] = lambda text: True) -> tuple[list[Job], list[str]]:
    """Expands prompt entries into jobs (seeds by `image_seed`); returns the
    jobs and the prompts the style was left out for (see `style_prompt`)."""
    if num_images_per_prompt < 1 or num_images_per_prompt > SEED_STRIDE:
        raise ValueError(f"--num-images-per-prompt {num_images_per_prompt} must be in [1, {SEED_STRIDE}]; "
                         f"for more images of one prompt, repeat it with its own seed in a --prompts-file")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed {seed} is outside [0, {MAX_SEED}]; pass e.g. --seed 0")
    jobs, unstyled = [], []
    for e, entry in enumerate(entries):
        prompt, neg, styled = style_prompt(entry["prompt"], entry.get("negative_prompt", negative_prompt),
                                           style, fits)
        if style is not None and not styled:
            unstyled.append(entry["prompt"])
        last = image_seed(seed, e, num_images_per_prompt - 1, entry.get("seed"))
        if last > MAX_SEED:
            fix = ("lower its \"seed\"" if "seed" in entry
                   else "lower --seed, or give it its own \"seed\" in a --prompts-file")
            raise ValueError(f"prompt {e} ({_short(entry['prompt'])!r}) would get seed {last}, above {MAX_SEED}; "
                             f"{fix}")
        for i in range(num_images_per_prompt):
            jobs.append(Job(prompt, neg, image_seed(seed, e, i, entry.get("seed")),
                            int(entry.get("steps", steps)), float(entry.get("guidance_scale", guidance_scale)),
                            entry=e, index=i))
    return jobs, unstyled


def batches(jobs: Sequence[Job], batch_size: int, chunks: Callable[[Job], int] | None = None):
    """Groups jobs that can share a compiled call (same steps and guidance,
    and the same `chunks(job)`: the number of text-context chunks its prompts
    are encoded in, which a batch pads to its longest) into batches of at most
    `batch_size`, in first-seen order."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.steps, j.guidance_scale, chunks(j) if chunks else 1), []).append(j)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i: i + batch_size]


def enhance_settings(args: argparse.Namespace) -> dict | None:
    """The --enhance-* flags as the manifest records them (part of each image's key, so a resumed run
    knows which jobs are done without running the enhancer), or None without --enhance-prompt."""
    from t2i_jax.enhance import DEFAULT_ENHANCER, GenerationSettings

    if not getattr(args, "enhance_prompt", False):  # callers that build their own Namespace may leave it out
        given = [flag for flag, value, default in (
            ("--enhancer", getattr(args, "enhancer", DEFAULT_ENHANCER), DEFAULT_ENHANCER),
            ("--enhance-max-tokens", getattr(args, "enhance_max_tokens", None), None),
            ("--enhance-temperature", getattr(args, "enhance_temperature", None), None)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} only act(s) with --enhance-prompt; add it, or drop them")
        return None

    try:
        given = {"max_new_tokens": args.enhance_max_tokens, "temperature": args.enhance_temperature}
        settings = GenerationSettings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise ValueError(f"--enhance-max-tokens/--enhance-temperature: {e}") from None
    return {"enhancer": args.enhancer, **dataclasses.asdict(settings)}


def expand_jobs(jobs: Sequence[Job], settings: dict) -> dict[int, Job]:
    """Jobs with their prompts expanded by the enhancer, by id() of the original job (whose prompt and
    seed keep naming the image: key, file name). The job's image seed seeds its expansion."""
    from t2i_jax.enhance import Enhancer, GenerationSettings

    kw = dict(settings)
    name = kw.pop("enhancer")
    print(f"loading prompt enhancer {name} ...", file=sys.stderr, flush=True)
    try:
        enhancer = Enhancer.load(name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--enhancer {name}: {e} Or pass a local GPT-2 folder (config.json, weights, "
                                "tokenizer files): --enhancer /path/to/folder") from None
    expanded = enhancer.expand([j.prompt for j in jobs], [j.seed for j in jobs], GenerationSettings(**kw))
    return {id(j): dataclasses.replace(j, prompt=e) for j, e in zip(jobs, expanded)}


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------
# Checks that run before the model loads
# --------------------------------------------------------------------------


def check_out_dir(path: str | os.PathLike) -> None:
    """Raises a ValueError when `path` cannot be the output folder (a file, or
    not writable by this user); creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {path} is an existing file; pass a folder (it is created if missing)")
    existing = p.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, so the folder cannot be made; "
                         "pass a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == p.absolute() else f"would be made in {existing}, which is"
        raise ValueError(f"--out {path} {what} not writable for this user; pass a folder you can write to")
    manifest = p / "manifest.jsonl"
    if manifest.exists() and not os.access(manifest, os.W_OK):
        raise ValueError(f"--out {path}: {manifest} is read-only; make it writable or pass another folder")


def check_attention(attention: str, dtype_name: str, platform: str) -> None:
    """--attention cudnn needs an NVIDIA GPU and bf16/fp16 compute."""
    if attention != "cudnn":
        return
    if platform != "gpu":
        raise ValueError(f"--attention cudnn needs an NVIDIA GPU with cuDNN, and JAX runs on {platform} here; "
                         "use --attention xla (or auto: cuDNN where it applies)")
    if dtype_name == "fp32":
        raise ValueError("--attention cudnn needs bf16 or fp16 compute; pass --dtype bf16, "
                         "or --attention auto (cuDNN where it applies)")


def read_init_image(path: str, flag: str = "--init-image"):
    """The init image (or the image of another `flag`) as an RGB PIL image and
    a hash of its pixels (the resume key: the same picture under another name
    or re-saved losslessly is the same input; an edited file under the same
    name is not)."""
    im = read_image(path, "RGB", flag=flag, what=flag.lstrip("-").replace("-", " "))
    pixels = np.asarray(im)
    digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()[:16]
    return im, digest


def read_mask_flags(args: argparse.Namespace, init_image):
    """The --mask image (float [H, W] in [0, 1]) and a hash of its pixels, or
    (None, None); the inpainting flags checked against each other and the
    mask's size against the init image's, before the model loads."""
    from t2i_jax import inpaint

    if args.mask is None:
        unused = [f for f, on in (("--mask-blur", args.mask_blur), ("--mask-padding", args.mask_padding),
                                  ("--keep-unmasked", args.keep_unmasked)) if on]
        if unused:
            raise ValueError(f"{' and '.join(unused)} need --mask MASK (and --init-image IMG)")
        return None, None
    if init_image is None:
        raise ValueError("--mask needs --init-image IMG: inpainting repaints the mask's white part of that image")
    if args.mask_blur < 0 or args.mask_padding < 0:
        raise ValueError(f"--mask-blur {args.mask_blur} and --mask-padding {args.mask_padding} must be >= 0 pixels")
    mask = inpaint.read_mask(args.mask, init_image.size)
    pixels = np.round(mask * 255).astype(np.uint8)
    digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()[:16]
    return mask, digest


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


def file_name(job: Job, common: dict) -> str:
    """`EEEE-III-PROMPT-sSEED-HASH.png`: the prompt entry and the image's
    index in it, readable, and unique per job and settings (the hash), so
    reruns with other settings never overwrite an image."""
    digest = hashlib.sha1(job.key(common).encode()).hexdigest()[:8]
    return f"{job.entry:04d}-{job.index:03d}-{_slug(job.prompt)}-s{job.seed}-{digest}.png"


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


def _open_manifest(path: Path):
    """The manifest opened for appending, after ending a line a kill cut
    short, so the next entry starts on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


@contextlib.contextmanager
def _sigint_deferred():
    """Holds Ctrl-C while an image and its manifest line are written, then
    raises it: a stop never separates a PNG from its line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each flag's text with its default, once: not where the
    text already says it, and not for switches or flags without a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is`, not `in (None, False)`: a default of 0 equals False. An empty
        # list is a repeatable flag's start, not a default worth saying.
        if ("default" in text or action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS or action.required or not action.option_strings):
            return text
        return text + (" (default: empty)" if action.default == "" else " (default: %(default)s)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The CLI's flags; `--help` shows every default."""
    from t2i_jax.schedulers import SCHEDULERS

    context = bundled_context_length()
    p = argparse.ArgumentParser(prog="python -m t2i_jax.sample", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter,
                                epilog=f"Seeds: image i of prompt entry e gets --seed + {SEED_STRIDE} * e + i (an "
                                       "entry's own JSONL seed S gives S + i), so adding images or prompts never "
                                       "changes an image already made.")
    p.add_argument("--model", default=None,
                   help="diffusers folder, hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) "
                        f"or single-file checkpoint (.safetensors/.ckpt); default: the bundled shapes model "
                        f"({BUNDLED_MODEL_NAME}, 32 px, trained from scratch on synthetic shapes; its text encoder "
                        f"reads {context} tokens, start and end included, where Stable Diffusion's reads 77)")
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: a refiner (diffusers folder, hub id such as stabilityai/stable-diffusion-xl-refiner-1.0,"
                        " or sd_xl_refiner_1.0.safetensors) that finishes the base's last steps (--high-noise-frac)")
    p.add_argument("--high-noise-frac", type=float, default=0.8,
                   help="with --refiner: the fraction of the schedule the base denoises (diffusers' denoising_end; "
                        "the refiner's denoising_start)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeatable; entries are numbered in order, then the --prompts-file lines)")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL objects with prompt and optional "
                                          "negative_prompt, seed, steps, guidance (or guidance_scale)")
    p.add_argument("--negative-prompt", default="", help="negative prompt of every entry that names none")
    p.add_argument("--prompt-syntax", choices=["a1111", "none"], default="a1111",
                   help="a1111: AUTOMATIC1111's emphasis, (word) x1.1, [word] /1.1, (word:1.3), \\( for a literal "
                        "parenthesis, BREAK to start a new chunk, and prompts longer than the text context encoded "
                        "in chunks; none: prompts as written, cut to the context")
    p.add_argument("--style", help=f"prompt template preset: {', '.join(sorted(STYLES))}; applied only where the "
                                   "styled prompt fits the text encoder's context (never with the bundled model's "
                                   f"{context} tokens)")
    p.add_argument("--num-images-per-prompt", type=int, default=1, help=f"images per prompt entry, 1 to {SEED_STRIDE}")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch (padded up to a multiple of the device count; default: the device count)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--scheduler", default="pndm", help=f"sampler: {', '.join(sorted(SCHEDULERS))}")
    p.add_argument("--karras", action="store_true",
                   help="Karras sigmas (scheduler option use_karras_sigmas) for the samplers that take them")
    p.add_argument("--eta", type=float, default=None,
                   help="ancestral noise scale of DDIM (0 deterministic, 1 DDPM-like); default: the model's "
                        "scheduler config")
    p.add_argument("--timestep-spacing", choices=["leading", "trailing", "linspace"], default=None,
                   help="how the steps are spread over the training timesteps; default: the model's scheduler config")
    p.add_argument("--final-sigmas-type", choices=["zero", "sigma_min"], default=None,
                   help="the last step's sigma for the samplers that take it; default: the model's scheduler config")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance; 1 turns it off")
    p.add_argument("--seed", type=int, default=0,
                   help=f"base seed: image i of entry e gets seed + {SEED_STRIDE} * e + i")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--init-image", help="img2img: start from this image (resized to height x width)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="img2img and inpainting: how much to change, in (0, 1]; inpainting usually takes 1.0")
    p.add_argument("--mask", help="inpainting (needs --init-image): repaint where this image is white, keep black; "
                                  "the init image's size")
    p.add_argument("--mask-blur", type=float, default=0, metavar="PX",
                   help="inpainting: Gaussian blur radius for the mask, in pixels (softens the --keep-unmasked seam)")
    p.add_argument("--mask-padding", type=int, default=0, metavar="PX",
                   help="inpainting: grow the repainted area by this many pixels before the blur")
    p.add_argument("--keep-unmasked", action="store_true",
                   help="inpainting: paste the init image back outside the (blurred) mask; pixels where it is 0 "
                        "are kept exactly")
    p.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                   help="ControlNet: diffusers folder, hub id (e.g. lllyasviel/control_v11p_sd15_canny) or original "
                        "single file (.pth/.safetensors); repeatable, one --control-image each")
    p.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="control image of the matching --controlnet (resized to height x width, RGB in [0, 1])")
    p.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                   help="ControlNet residual scale: once for all nets or once per net (default 1.0)")
    p.add_argument("--control-guidance-start", action="append", type=float, default=[], metavar="F",
                   help="fraction of the steps where the ControlNet starts acting: once or once per net (default 0)")
    p.add_argument("--control-guidance-end", action="append", type=float, default=[], metavar="F",
                   help="fraction of the steps where the ControlNet stops acting: once or once per net (default 1)")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: the nets see only the prompt half, residuals weighted 0.1..1")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA file (diffusers/PEFT or kohya; .safetensors, .bin, .pt) merged into the U-Net and "
                        "text encoder(s) before compiling, at WEIGHT (default 1.0); repeatable, merged together; "
                        "SD 1.x/2.x and SDXL (the base model, not a --refiner)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (.pt, .safetensors, .bin; for SDXL one file with clip_l and "
                        "clip_g); write its token (the file's own name, or TOKEN) in the prompts; repeatable")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="compute dtype (default: bf16 on GPU/TPU, fp32 on CPU); params stay as loaded")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn", "chunked"], default="auto",
                   help="attention: auto (cuDNN flash attention on NVIDIA GPUs where the head size and dtype "
                        "allow, XLA elsewhere), xla, cudnn (NVIDIA GPU, bf16/fp16), or chunked (XLA over "
                        "1024-query chunks: the same numbers in less memory, e.g. SDXL at 1024 px on a TPU)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    from t2i_jax.enhance import DEFAULT_ENHANCER, GenerationSettings

    p.add_argument("--enhance-prompt", action="store_true",
                   help="expand each prompt with a GPT-2 prompt model (--enhancer) before encoding; image seed S "
                        "samples its expansion with seed S, the PNG and manifest keep prompt (expanded) and "
                        "original_prompt, and a rerun reuses the recorded expansions")
    p.add_argument("--enhancer", default=DEFAULT_ENHANCER,
                   help="with --enhance-prompt: a transformers GPT-2 folder or hub id")
    p.add_argument("--enhance-max-tokens", type=int, default=None,
                   help=f"with --enhance-prompt: new tokens at most per prompt (default: "
                        f"{GenerationSettings.max_new_tokens})")
    p.add_argument("--enhance-temperature", type=float, default=None,
                   help=f"with --enhance-prompt: sampling temperature, 0 is greedy (default: "
                        f"{GenerationSettings.temperature})")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (~/.cache/t2i_jax/jax, or $T2I_JAX_CACHE)")
    return p.parse_args(argv)


def _file_and_tail(spec: str, flag: str) -> tuple[str, str | None]:
    """FILE or FILE:TAIL; a FILE that exists with a colon in its name is taken whole."""
    path, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).is_file():
        path, tail = spec, None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {spec}: file {path} not found")
    return path, tail


def adapter_flags(args: argparse.Namespace) -> tuple[list[tuple[str, float]], list[tuple[str, str | None]]]:
    """(file, weight) of each --lora and (file, token or None) of each --embedding, checked."""
    loras = []
    for spec in args.lora:
        path, w = _file_and_tail(spec, "--lora")
        try:
            loras.append((path, 1.0 if w is None else float(w)))
        except ValueError:
            raise ValueError(f"--lora {spec}: weight {w!r} is not a number; write FILE:0.8") from None
    embeddings = [_file_and_tail(spec, "--embedding") for spec in args.embedding]
    return loras, [(path, token or None) for path, token in embeddings]


def file_hash(path: str) -> str:
    """sha256 of a file's bytes, 16 hex digits (an adapter's identity in the image keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def scheduler_options(args: argparse.Namespace) -> dict:
    """The per-call scheduler options (diffusers scheduler config keys) the
    flags set; flags left unset are left out, so the model's config rules."""
    options = {}
    if args.karras:
        options["use_karras_sigmas"] = True
    if args.eta is not None:
        options["eta"] = args.eta
    if args.timestep_spacing is not None:
        options["timestep_spacing"] = args.timestep_spacing
    if args.final_sigmas_type is not None:
        options["final_sigmas_type"] = args.final_sigmas_type
    return options


def _option_flags(options: dict) -> str:
    flags = {"use_karras_sigmas": "--karras", "eta": "--eta", "timestep_spacing": "--timestep-spacing",
             "final_sigmas_type": "--final-sigmas-type"}
    return " ".join(flags[k] if v is True else f"{flags[k]} {v}" for k, v in options.items())


def _entries(args: argparse.Namespace) -> list[dict]:
    entries = [{"prompt": p} for p in args.prompt]
    if args.prompts_file:
        entries += read_prompts_file(args.prompts_file)
    if not entries:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not e["prompt"].strip() for e in entries):
        raise ValueError("a prompt is empty; give every --prompt some text")
    return entries


def control_settings(args: argparse.Namespace) -> dict:
    """The Sampler's ControlNet keyword arguments from the flags (no images
    yet), checked before anything loads; {} without --controlnet."""
    nets = len(args.controlnet)
    per_net = {"--control-scale": args.control_scale, "--control-guidance-start": args.control_guidance_start,
               "--control-guidance-end": args.control_guidance_end}
    if not nets:
        given = [f for f, v in {**per_net, "--control-image": args.control_image}.items() if v]
        if given or args.guess_mode:
            raise ValueError(f"{', '.join(given + ['--guess-mode'] * args.guess_mode)} given without --controlnet; "
                             "pass --controlnet MODEL --control-image IMG")
        return {}
    if len(args.control_image) != nets:
        raise ValueError(f"{nets} --controlnet but {len(args.control_image)} --control-image; pass one control "
                         "image per ControlNet, in the same order")
    for flag, values in per_net.items():
        if len(values) not in (0, 1, nets):
            raise ValueError(f"{flag} given {len(values)} times for {nets} ControlNets; give it once (all nets) "
                             "or once per --controlnet")
    out = {"control_scales": args.control_scale or [1.0], "control_guidance_start": args.control_guidance_start
           or [0.0], "control_guidance_end": args.control_guidance_end or [1.0], "guess_mode": args.guess_mode}
    for key in ("control_scales", "control_guidance_start", "control_guidance_end"):
        out[key] = out[key] * nets if len(out[key]) == 1 else out[key]
    for k, (s, e) in enumerate(zip(out["control_guidance_start"], out["control_guidance_end"])):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"ControlNet {k}: --control-guidance-start {s} and --control-guidance-end {e} must "
                             "satisfy 0 <= start < end <= 1, e.g. 0 and 1")
    return out


def run(args: argparse.Namespace) -> dict:
    """Generates the images of `args`; returns a summary dict (counts, timings).

    Every check that needs no model runs first, so a bad flag costs no load
    and leaves nothing on disk.
    """
    import jax
    import jax.numpy as jnp

    from t2i_jax import inpaint, pipeline, schedulers
    from t2i_jax import prompts as prompt_lib
    from t2i_jax.convert.load import load_components

    # ---- Checks, before anything is loaded, compiled or written.
    if args.scheduler not in schedulers.SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; choose one of {sorted(schedulers.SCHEDULERS)}")
    pipeline.check_settings(args.steps, args.guidance_scale, args.strength if args.init_image else None)
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            pipeline.check_size(name, getattr(args, name), 8)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1; leave it out for one image per device")
    if args.eta is not None and args.eta < 0:
        raise ValueError(f"--eta {args.eta} must be >= 0; 0 is deterministic DDIM, 1 DDPM-like")
    options = scheduler_options(args)
    if options:
        # Which sampler takes which option depends on the sampler alone, not
        # on the model's config: checked here, before the model loads.
        try:
            schedulers.build(args.scheduler, None, options)
        except ValueError as e:
            raise ValueError(f"--scheduler {args.scheduler} with {_option_flags(options)}: {e}") from None
    if args.refiner is not None:
        if not 0.0 < args.high_noise_frac < 1.0:
            raise ValueError(f"--high-noise-frac {args.high_noise_frac} is outside (0, 1); use e.g. 0.8")
        for flag, given in (("--init-image", args.init_image), ("--mask", args.mask),
                            ("--controlnet", args.controlnet)):
            if given:
                raise ValueError(f"--refiner runs after a txt2img base; it does not combine with {flag} yet")
    entries = _entries(args)
    enhance = enhance_settings(args)
    build_kw = {"negative_prompt": args.negative_prompt, "style": args.style, "seed": args.seed,
                "steps": args.steps, "guidance_scale": args.guidance_scale,
                "num_images_per_prompt": args.num_images_per_prompt}
    for j in build_jobs(entries, **build_kw)[0]:
        pipeline.check_settings(j.steps, j.guidance_scale)
    check_out_dir(args.out)
    init_image, init_hash = read_init_image(args.init_image) if args.init_image else (None, None)
    mask, mask_hash = read_mask_flags(args, init_image)
    control = control_settings(args)
    loras, embeddings = adapter_flags(args)
    control_images = [read_init_image(path, "--control-image") for path in args.control_image]
    platform = jax.devices()[0].platform
    dtype_name = args.dtype or ("fp32" if platform == "cpu" else "bf16")
    check_attention(args.attention, dtype_name, platform)
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[dtype_name]

    if not args.no_compilation_cache:
        cache = Path(os.environ.get("T2I_JAX_CACHE", Path.home() / ".cache" / "t2i_jax" / "jax"))
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    # ---- Model.
    print(f"loading model {args.model or BUNDLED_MODEL_NAME} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    pipe = load_components(BUNDLED_MODEL if args.model is None else args.model)
    xl = pipe.is_sdxl
    if xl:
        for flag, given in (("--mask", args.mask), ("--controlnet", args.controlnet)):
            if given:
                raise ValueError(f"{pipe.source} is an SDXL model; {flag} is not supported with SDXL yet")
    if args.refiner is not None and not xl:
        raise ValueError(f"--refiner is for SDXL base models; {pipe.source} is an SD 1.x/2.x model")
    refiner = None
    if args.refiner is not None:
        print(f"loading refiner {args.refiner} ...", file=sys.stderr, flush=True)
        refiner = load_components(args.refiner)
        if not refiner.is_sdxl:
            raise ValueError(f"--refiner {args.refiner} is not an SDXL model (its U-Net has no text-time "
                             "embedding); pass an SDXL refiner such as stabilityai/stable-diffusion-xl-refiner-1.0")
    if loras or embeddings:
        from t2i_jax.convert.lora import apply_adapters

        pipe = apply_adapters(pipe, loras, embeddings)
        if refiner is not None and embeddings:  # its one encoder gets clip_g, so the prompt's tokens read the same
            refiner = apply_adapters(refiner, embeddings=embeddings)
    tokenizer = pipe.tokenizer or pipe.tokenizer_2  # an SDXL refiner has only the second
    context = tokenizer.max_length
    native = pipe.unet.config.sample_size * pipe.vae_scale
    about = (f"bundled shapes model ({BUNDLED_MODEL_NAME})" if args.model is None else pipe.source)
    tip = ("; for Stable Diffusion pass --model stable-diffusion-v1-5/stable-diffusion-v1-5"
           if args.model is None else "")
    print(f"model: {about}, {native} px, text context {context} tokens (start and end included), loaded in "
          f"{time.perf_counter() - t0:.1f}s{tip}", file=sys.stderr)
    height, width = args.height or native, args.width or native
    pipeline.check_size("height", height, pipe.vae_scale)
    pipeline.check_size("width", width, pipe.vae_scale)

    # ---- Jobs, fitted to the text encoder's context.
    count_cache: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in count_cache:
            expanded_text = tokenizer.expand(text)  # multi-vector embeddings count all their tokens
            ids = tokenizer.hf(expanded_text, padding=False, truncation=False, verbose=False)["input_ids"]
            count_cache[text] = len(ids)
        return count_cache[text]

    jobs, unstyled = build_jobs(entries, **build_kw, fits=lambda text: count(text) <= context)
    if unstyled:
        warn(f"--style {args.style} does not fit the text encoder's {context}-token context with "
             f"{len(unstyled)} of {len(entries)} prompt(s), e.g. {_short(unstyled[0])!r}; those are used "
             "without the style, so none of their words are cut")
    syntax = args.prompt_syntax
    if xl:
        syntax = "none"  # SDXL prompts are taken as written and cut to 77 tokens, as diffusers (t2i_jax.sdxl)
    texts = list(dict.fromkeys(t for j in jobs for t in (j.prompt, j.negative_prompt)))
    too_long = [t for t in texts if count(t) > context] if syntax == "none" else []  # a1111: chunks, none cut
    unbalanced = [m for m in map(prompt_lib.bracket_problems, texts) if m] if syntax == "a1111" else []
    if unbalanced:
        warn(unbalanced[0] + (f" (and {len(unbalanced) - 1} more prompt(s))" if len(unbalanced) > 1 else ""))
    chunk_cache: dict[str, int] = {}

    def chunks(job: Job) -> int:
        """The chunks of the job's conditioning: its (expanded) prompt's, or its negative prompt's if more
        (guided)."""
        prompt = expanded.get(id(job), job).prompt
        for t in (prompt, job.negative_prompt):
            if t not in chunk_cache:
                chunk_cache[t] = prompt_lib.num_chunks(tokenizer, t, syntax)
        return max(chunk_cache[prompt], chunk_cache[job.negative_prompt] if job.guidance_scale > 1 else 1)

    if too_long:
        warn(f"{len(too_long)} prompt(s) are longer than the text encoder's {context}-token context and are "
             f"cut, e.g. {_short(too_long[0])!r} ({count(too_long[0])} tokens); shorten them to keep every word")

    if args.controlnet:
        from t2i_jax.convert.controlnet import load_controlnet
        from t2i_jax.models.controlnet import check_fits as controlnet_check_fits

        print(f"loading {len(args.controlnet)} ControlNet(s) ...", file=sys.stderr, flush=True)
    nets = [load_controlnet(m) for m in args.controlnet]
    for m, (net, _) in zip(args.controlnet, nets):
        controlnet_check_fits(net.config, pipe.unet.config, pipe.vae_scale, name=f"--controlnet {m}",
                               latent_channels=pipe.latent_channels)
    sampler = pipeline.Sampler(pipe, dtype=dtype, attention_impl=args.attention, controlnets=nets)
    refine = None if refiner is None else pipeline.Sampler(refiner, mesh=sampler.mesh, dtype=dtype,
                                                           attention_impl=args.attention)
    ndev = sampler.num_devices
    bs = -(-(args.batch_size or ndev) // ndev) * ndev
    init = None
    if init_image is not None:
        from PIL import Image

        init = np.asarray(init_image.resize((width, height), Image.LANCZOS), np.float32) / 255.0
    if mask is not None:
        mask = inpaint.prepare_mask(mask, blur=args.mask_blur, padding=args.mask_padding, size=(width, height))
    if control_images:
        from PIL import Image

        # Resized as diffusers' control image processor does (Lanczos), [0, 1], no normalisation.
        control["control_images"] = [np.asarray(im.resize((width, height), Image.LANCZOS), np.float32)[None] / 255.0
                                     for im, _ in control_images]

    out = Path(args.out)
    manifest_path = out / "manifest.jsonl"
    # What an image depends on besides its job: in its key. The init image by
    # its pixels; its path only in the metadata.
    common = {"model": pipe.source, "scheduler": args.scheduler, "height": height, "width": width,
              "dtype": dtype_name, "init_image": init_hash, "strength": args.strength if args.init_image else None}
    common["prompt_syntax"] = syntax  # (word:1.3) and long prompts read as A1111 does, or as written
    if options:
        common["scheduler_options"] = options
    if mask is not None:  # absent otherwise: the keys of earlier runs stay valid
        common.update(mask=mask_hash, mask_blur=args.mask_blur, mask_padding=args.mask_padding,
                      keep_unmasked=args.keep_unmasked)
    if control:
        common["controlnet"] = {"models": args.controlnet, "images": [h for _, h in control_images],
                                **{k: v for k, v in control.items() if k != "control_images"}}
    if enhance:
        common["enhance"] = enhance
    if loras:  # by their bytes; paths only in the metadata
        common["lora"] = [[file_hash(f), w] for f, w in loras]
    if embeddings:
        common["embeddings"] = [[file_hash(f), t] for f, t in embeddings]
    if refiner is not None:
        common.update(refiner=refiner.source, high_noise_frac=args.high_noise_frac)
    done = read_manifest(manifest_path)
    unique: dict[str, Job] = {}  # job key -> its first job (an entry repeated with its own seed repeats jobs)
    for j in jobs:
        unique.setdefault(j.key(common), j)
    todo = [j for k, j in unique.items() if k not in done]
    run_files = {k: done[k]["file"] for k in unique if k in done}
    if run_files:
        print(f"skipping {len(run_files)} image(s) already in {manifest_path}", file=sys.stderr)
    expanded = expand_jobs(todo, enhance) if enhance and todo else {}
    # Under a1111 a long expansion is encoded in chunks (and grouped by their count, see `chunks`).
    cut = [e.prompt for e in expanded.values() if count(e.prompt) > context] if syntax == "none" else []
    if cut:
        warn(f"{len(cut)} expanded prompt(s) are longer than the text encoder's {context}-token context and are "
             f"cut, e.g. {_short(cut[0])!r}; lower --enhance-max-tokens to keep every word")

    # ---- Sampling. The bar counts denoising steps (model evaluations) and
    # advances once per batch: a host callback inside the compiled loop would
    # keep JAX from caching the loop on disk.
    from tqdm import tqdm

    sched = sampler.scheduler(args.scheduler, options or None)
    lat_shape = (bs, height // pipe.vae_scale, width // pipe.vae_scale, pipe.latent_channels)
    strength = args.strength if init is not None else 1.0
    evals = {s: sched.set_timesteps(s, lat_shape, strength=strength).num_evals for s in {j.steps for j in todo}}
    all_batches = list(batches(todo, bs, chunks))
    bar = tqdm(total=sum(evals[b[0].steps] for b in all_batches), unit="step", desc="sampling",
               file=sys.stderr, disable=not all_batches, dynamic_ncols=True)
    compiled: dict[tuple, object] = {}
    made, gen_time, compile_time = 0, 0.0, 0.0
    manifest = None
    try:
        with warnings.catch_warnings():
            # Prompts that do not fit were named above, in one line.
            warnings.filterwarnings("ignore", message=r"prompt .* tokens with start and end", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"prompt .* has unbalanced brackets", category=UserWarning)
            for batch in all_batches:
                real = len(batch)
                padded = list(batch) + [batch[-1]] * (bs - real)  # padding rows are computed and dropped
                extra = {"scheduler_options": options} if options else {}
                if mask is not None:
                    extra["mask_images"] = np.repeat(mask[None], bs, axis=0)
                extra.update(control)
                negatives = [j.negative_prompt for j in padded]
                if xl and not any(negatives):
                    negatives = None  # as diffusers' default: the SDXL base then guides with zeros
                if refine is not None:
                    extra.update(denoising_end=args.high_noise_frac, return_latents=True)
                t0 = time.perf_counter()
                fn, fargs = sampler.prepare(
                    [expanded.get(id(j), j).prompt for j in padded], seeds=[j.seed for j in padded],
                    negative_prompts=negatives, steps=batch[0].steps,
                    guidance_scale=batch[0].guidance_scale, scheduler=args.scheduler, height=height,
                    width=width, strength=args.strength,
                    init_images=None if init is None else np.repeat(init[None], bs, axis=0),
                    prompt_syntax=syntax, **extra)
                # The text's shapes ([n, chunks * L, D]; SDXL's pooled and time ids too).
                program = (batch[0].steps, batch[0].guidance_scale > 1.0,
                           tuple(np.shape(a) for a in jax.tree.leaves(fargs[1])))
                if program not in compiled:
                    bar.set_description("compiling (once per shape)")
                    t1 = time.perf_counter()
                    compiled[program] = fn.lower(*fargs).compile()
                    # The bar's rate and ETA are the sampling's alone (both
                    # clocks moved: tqdm takes a bar last shown before its
                    # start for one never shown, and would not end its line).
                    paused = time.perf_counter() - t1
                    bar.start_t += paused
                    bar.last_print_t += paused
                    compile_time += time.perf_counter() - t0
                    bar.set_description("sampling")
                    t0 = time.perf_counter()
                images = compiled[program](*fargs)
                if refine is not None:  # the refiner finishes the base's latents (diffusers' hand-off)
                    images = refine([expanded.get(id(j), j).prompt for j in padded], seeds=[j.seed for j in padded],
                                    negative_prompts=negatives, steps=batch[0].steps,
                                    guidance_scale=batch[0].guidance_scale, scheduler=args.scheduler,
                                    height=height, width=width, scheduler_options=options or None,
                                    init_latents=np.asarray(jax.device_get(images[1])),
                                    denoising_start=args.high_noise_frac)
                images = np.asarray(jax.device_get(images))
                if mask is not None and args.keep_unmasked:
                    images = inpaint.composite(images, init[None], mask[None])
                gen_time += time.perf_counter() - t0
                images = pipeline.to_uint8(images[:real])
                with _sigint_deferred():
                    if manifest is None:
                        manifest = _open_manifest(manifest_path)
                    for j, im in zip(batch, images):
                        key = j.key(common)
                        name = file_name(j, common)
                        meta = {**dataclasses.asdict(j), **common, "init_image_path": args.init_image}
                        if mask is not None:
                            meta["mask_path"] = args.mask
                        if control:
                            meta["control_image_paths"] = args.control_image
                        if loras or embeddings:
                            meta.update(lora_paths=[f for f, _ in loras], embedding_paths=[f for f, _ in embeddings])
                        if id(j) in expanded:
                            meta.update(prompt=expanded[id(j)].prompt, original_prompt=j.prompt)
                        save_png(out / name, im, {"parameters": meta, "prompt": meta["prompt"], "software": "t2i_jax"})
                        manifest.write(json.dumps({"file": name, "key": key, **meta}) + "\n")
                        manifest.flush()
                        run_files[key] = name
                        made += 1
                bar.update(evals[batch[0].steps])
                bar.set_postfix_str(f"{made}/{len(todo)} images")
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(
            f"interrupted: {made} new image(s) saved in {out} and listed in its manifest.jsonl, "
            f"{len(todo) - made} not made; run the same command again to make them") from None
    finally:
        bar.close()
        if manifest is not None:
            manifest.close()

    files = [run_files[k] for k in unique if k in run_files]
    if files:
        from PIL import Image

        thumbs = [np.asarray(Image.open(out / f).convert("RGB")) for f in files[:64]]
        shape = thumbs[0].shape
        thumbs = [t for t in thumbs if t.shape == shape]
        grid = contact_sheet(thumbs)
        atomic_write(out / "grid.png", lambda f: Image.fromarray(grid).save(f, format="PNG"))
    summary = {"made": made, "skipped": len(unique) - len(todo), "seconds": gen_time,
               "compile_seconds": compile_time, "devices": ndev, "device_kind": jax.devices()[0].device_kind,
               "batch_size": bs, "out": str(out)}
    if made:
        summary["images_per_s"] = made / gen_time
        summary["images_per_s_per_device"] = made / gen_time / ndev
        print(f"{made} image(s) in {gen_time:.1f}s sampling (+{compile_time:.1f}s compiling): "
              f"{made / gen_time:.3f} images/s, {made / gen_time / ndev:.3f} images/s per device "
              f"({ndev} x {summary['device_kind']})", file=sys.stderr)
    print(f"images in {out.resolve()} (manifest.jsonl, grid.png)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: exit 0 on success, 2 on a bad flag or input (one line, before
    the model loads where it can), 130 on Ctrl-C."""
    quiet_console()
    args = parse_args(argv)
    try:
        run(args)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before any image was made; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
