"""AUTOMATIC1111's web API on our pipeline: request fields, their checks, sampler names, responses.

A request body is read into a `Request` (what the batcher runs) or an `ApiError` naming the field,
the value and the limit or fix. Unknown fields are ignored, as A1111 does; A1111 fields we know
but cannot honour are named in the response's `info` ("not_honoured") when given a non-default
value. Seeds follow A1111: image i of a request gets `seed + i`, -1 draws a random seed, and the
CLI's `--seed S --num-images-per-prompt n` makes the same images.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from t2i_jax import schedulers
from t2i_jax.sample import MAX_SEED, STYLES, style_prompt

# A1111 sampler name -> (our sampler, scheduler options, aliases A1111 also accepts).
SAMPLERS = {
    "Euler a": ("euler_a", {}, ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", {}, ["k_euler"]),
    "LMS": ("lms", {}, ["k_lms"]),
    "LMS Karras": ("lms", {"use_karras_sigmas": True}, ["k_lms_ka"]),
    "Heun": ("heun", {}, ["k_heun"]),
    "DPM++ 2M": ("dpmpp_2m", {}, ["k_dpmpp_2m"]),
    "DPM++ 2M Karras": ("dpmpp_2m", {"use_karras_sigmas": True}, ["k_dpmpp_2m_ka"]),
    "DDIM": ("ddim", {}, []),
    "PLMS": ("pndm", {}, []),
    "UniPC": ("unipc", {}, []),
    "DDPM": ("ddpm", {}, []),
}
_BY_NAME = {k.lower(): k for k in SAMPLERS} | {a.lower(): k for k, (_, _, al) in SAMPLERS.items() for a in al}
DEFAULT_SAMPLER = "Euler a"
# A1111's `scheduler` field (its 1.9 split of sampler and sigma schedule): the ones we have.
SCHEDULES = {"automatic": {}, "karras": {"use_karras_sigmas": True}}

# A1111 fields we know but do not implement, with the values that mean "off" (what its clients send by
# default); a request that sets one otherwise is served and the field named in `info`.
NOT_HONOURED = {
    "subseed": (-1,), "subseed_strength": (0,), "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "enable_hr": (False,), "restore_faces": (False,), "tiling": (False,), "s_churn": (0,), "s_tmax": (0,),
    "s_tmin": (0,), "s_noise": (1,), "refiner_checkpoint": ("",), "refiner_switch_at": (0,),
    "script_name": ("",), "alwayson_scripts": ({},), "save_images": (False,), "inpaint_full_res": (False,),
    "initial_noise_multiplier": (1,), "image_cfg_scale": (0,), "include_init_images": (False,),
}
TASK_ID = re.compile(r"^[A-Za-z0-9_()\-.:]{1,64}$")


class ApiError(Exception):
    """A request the server answers with `status` and a JSON body naming what is wrong."""

    def __init__(self, status: int, detail: str, *, field: str | None = None, value: Any = None,
                 limit: Any = None, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.field, self.value, self.limit = status, detail, field, value, limit
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """The JSON error body: A1111's `error`/`detail` plus the field, its value and the limit."""
        out = {"error": {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge",
                         422: "ValidationError", 429: "TooManyRequests", 503: "ServiceUnavailable"}.get(
            self.status, "Error"), "detail": self.detail}
        if self.field is not None:
            out.update(field=self.field, value=_jsonable(self.value))
        if self.limit is not None:
            out["limit"] = self.limit
        return out


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)[:200]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits (configurable on the command line)."""

    max_steps: int = 150
    max_size: int = 1024  # pixels, each side
    max_images: int = 16  # batch_size * n_iter
    max_prompt_chars: int = 4000
    max_body_bytes: int = 16 << 20


@dataclasses.dataclass
class Request:
    """One parsed generation request: everything its images depend on."""

    model: str
    prompt: str
    negative_prompt: str
    seeds: list[int]
    steps: int
    cfg_scale: float
    sampler_name: str  # A1111's
    sampler: str  # ours
    scheduler_options: dict
    width: int
    height: int
    task_id: str | None = None
    init_image: np.ndarray | None = None  # float [H, W, 3] in [0, 1], resized to height x width
    mask: np.ndarray | None = None  # float [H, W] in [0, 1], white = repaint
    strength: float | None = None
    styles: list[str] = dataclasses.field(default_factory=list)
    styles_applied: bool = False
    not_honoured: list[str] = dataclasses.field(default_factory=list)
    send_images: bool = True
    parameters: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 1
    n_iter: int = 1


# --------------------------------------------------------------------------
# Field readers
# --------------------------------------------------------------------------


def _get(body: dict, name: str, kinds: tuple, default, want: str):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(422, f"field {name!r} is {json.dumps(_jsonable(value))}; it must be {want}",
                       field=name, value=value)
    return value


def _int(body, name, default, lo, hi, limit_name=None):
    value = _get(body, name, (int,), default, "an integer")
    if not lo <= value <= hi:
        limit = hi if value > hi else lo
        raise ApiError(400, f"field {name!r} is {value}; it must be in [{lo}, {hi}]"
                       + (f" (the server's {limit_name})" if limit_name and value > hi else ""),
                       field=name, value=value, limit=limit)
    return value


def _str(body, name, default, limits: Limits):
    value = _get(body, name, (str,), default, "a string")
    if value is not None and len(value) > limits.max_prompt_chars:
        raise ApiError(400, f"field {name!r} has {len(value)} characters; at most {limits.max_prompt_chars}",
                       field=name, value=value[:40] + "...", limit=limits.max_prompt_chars)
    return value


def sampler_for(name: str, schedule: str | None = None) -> tuple[str, str, dict]:
    """(A1111 name, our sampler, scheduler options) for an A1111 sampler name (or alias) and its optional
    `scheduler` field; unknown names are an ApiError listing the names served."""
    key = _BY_NAME.get(name.lower()) if isinstance(name, str) else None
    if key is None:
        raise ApiError(400, f"unknown sampler_name {name!r}; use one of: {', '.join(SAMPLERS)}",
                       field="sampler_name", value=name, limit=list(SAMPLERS))
    ours, options, _ = SAMPLERS[key]
    options = dict(options)
    if schedule is not None:
        if not isinstance(schedule, str) or schedule.lower() not in SCHEDULES:
            raise ApiError(400, f"unknown scheduler {schedule!r}; use one of: Automatic, Karras",
                           field="scheduler", value=schedule, limit=["Automatic", "Karras"])
        extra = SCHEDULES[schedule.lower()]
        karras = schedulers.accepting("use_karras_sigmas")
        if extra and ours not in karras:
            raise ApiError(400, f"scheduler {schedule!r} does not apply to sampler {key!r}; Karras sigmas go with "
                           f"{', '.join(k for k, v in SAMPLERS.items() if v[0] in karras)}",
                           field="scheduler", value=schedule)
        options.update(extra)
    return key, ours, options


def decode_image(data, field: str, mode: str):
    """A base64 image (optionally a data: URL) as a PIL image in `mode`; bad data is an ApiError. Only bytes
    are read: a string that is a file path is not opened."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str):
        raise ApiError(422, f"field {field!r} must be a base64-encoded image string", field=field,
                       value=type(data).__name__)
    text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"field {field!r} is not valid base64; send the PNG/JPEG bytes base64-encoded "
                       "(optionally as a data: URL)", field=field, value=data[:40]) from None
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise ApiError(400, f"field {field!r} decodes to {len(raw)} bytes that are not an image PIL can read; "
                       "send a PNG or JPEG", field=field, value=data[:40]) from None
    return im.convert(mode)


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------


def parse(body, *, img2img: bool, limits: Limits, models: list[str], default_model: str, native: int,
          size_multiple: int = 8, fits=lambda text: True, rng: random.Random | None = None) -> Request:
    """A txt2img / img2img JSON body as a `Request`; an ApiError for the first bad field.

    `models`: the configured model names (override_settings.sd_model_checkpoint picks one);
    `native`: the default width and height; `size_multiple`: the VAE factor sizes must divide by;
    `fits(text)`: whether a styled prompt fits the text encoder (see `sample.style_prompt`).
    """
    if not isinstance(body, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {type(body).__name__}")
    prompt = _str(body, "prompt", "", limits)
    negative = _str(body, "negative_prompt", "", limits)
    steps = _int(body, "steps", 20, 1, limits.max_steps, "--max-steps")
    cfg = _get(body, "cfg_scale", (int, float), 7.0, "a number")
    if not 1.0 <= cfg <= 30.0 or not np.isfinite(cfg):
        raise ApiError(400, f"field 'cfg_scale' is {cfg}; it must be in [1, 30] (1 turns guidance off)",
                       field="cfg_scale", value=cfg, limit=30 if cfg > 30 else 1)
    width = _int(body, "width", native, 1, limits.max_size, "--max-size")
    height = _int(body, "height", native, 1, limits.max_size, "--max-size")
    for name, v in (("width", width), ("height", height)):
        if v % size_multiple:
            lo = v // size_multiple * size_multiple
            fix = f"{lo} or {lo + size_multiple}" if lo else f"{size_multiple}"
            raise ApiError(400, f"field {name!r} is {v}, not a multiple of {size_multiple} (the model's VAE "
                           f"factor); use {fix}", field=name, value=v, limit=size_multiple)
    batch_size = _int(body, "batch_size", 1, 1, limits.max_images, "--max-images")
    n_iter = _int(body, "n_iter", 1, 1, limits.max_images, "--max-images")
    if batch_size * n_iter > limits.max_images:
        raise ApiError(400, f"batch_size {batch_size} x n_iter {n_iter} = {batch_size * n_iter} images; at most "
                       f"{limits.max_images} per request", field="batch_size", value=batch_size,
                       limit=limits.max_images)
    seed = _get(body, "seed", (int,), -1, "an integer (-1 for a random seed)")
    n = batch_size * n_iter
    if seed == -1:
        seed = (rng or random).randrange(0, MAX_SEED - n + 2)
    if not 0 <= seed <= MAX_SEED - n + 1:
        raise ApiError(400, f"field 'seed' is {seed}; it must be -1 (random) or in [0, {MAX_SEED - n + 1}] "
                       f"(image i gets seed + i, a uint32)", field="seed", value=seed, limit=MAX_SEED - n + 1)
    name = _get(body, "sampler_name", (str,), None, "a string") or _get(body, "sampler_index", (str,), None,
                                                                          "a string") or DEFAULT_SAMPLER
    sampler_name, sampler, options = sampler_for(name, _get(body, "scheduler", (str,), None, "a string"))
    eta = _get(body, "eta", (int, float), None, "a number")
    not_honoured = []
    if eta is not None:
        if sampler == "ddim":
            if not 0 <= eta <= 1:
                raise ApiError(400, f"field 'eta' is {eta}; it must be in [0, 1]", field="eta", value=eta, limit=1)
            options["eta"] = float(eta)
        elif eta not in (0, 1):
            not_honoured.append("eta")  # A1111's eta for ancestral samplers; ours is DDIM's only
    styles = _get(body, "styles", (list,), [], "a list of style names")
    for s in styles:
        if not isinstance(s, str) or s not in STYLES:
            raise ApiError(400, f"unknown style {s!r} in 'styles'; use any of: {', '.join(sorted(STYLES))}",
                           field="styles", value=s, limit=sorted(STYLES))
    styled_prompt, styled_negative, applied = prompt, negative, bool(styles)
    for s in styles:
        styled_prompt, styled_negative, ok = style_prompt(styled_prompt, styled_negative, s, fits)
        applied = applied and ok
    model = default_model
    override = _get(body, "override_settings", (dict,), {}, "an object")
    if "sd_model_checkpoint" in override:
        model = override["sd_model_checkpoint"]
        if model not in models:
            raise ApiError(400, f"override_settings.sd_model_checkpoint {model!r} is not a configured model; use "
                           f"one of: {', '.join(models)}", field="override_settings.sd_model_checkpoint",
                           value=model, limit=models)
    not_honoured += sorted(k for k in set(override) - {"sd_model_checkpoint"})
    task_id = _get(body, "force_task_id", (str,), None, "a string")
    if task_id is not None and not TASK_ID.match(task_id):
        raise ApiError(400, "field 'force_task_id' must be 1-64 characters of letters, digits and _()-.:",
                       field="force_task_id", value=task_id)
    send_images = _get(body, "send_images", (bool,), True, "true or false")
    for k, off in NOT_HONOURED.items():
        if k in body and body[k] is not None and body[k] not in off and not (
                k == "subseed" and body.get("subseed_strength", 0) == 0):  # a subseed at strength 0 does nothing
            not_honoured.append(k)
    req = Request(model=model, prompt=styled_prompt, negative_prompt=styled_negative,
                  seeds=[seed + i for i in range(n)], steps=steps, cfg_scale=float(cfg), sampler_name=sampler_name,
                  sampler=sampler, scheduler_options=options, width=width, height=height, task_id=task_id,
                  styles=list(styles), styles_applied=applied, not_honoured=not_honoured, send_images=send_images,
                  batch_size=batch_size, n_iter=n_iter)
    if img2img:
        _parse_img2img(body, req)
    # (txt2img's denoising_strength is A1111's hires pass setting: named with enable_hr when that is on.)
    req.parameters = {"prompt": prompt, "negative_prompt": negative, "styles": styles, "seed": seed,
                      "steps": steps, "cfg_scale": cfg, "sampler_name": sampler_name, "batch_size": batch_size,
                      "n_iter": n_iter, "width": width, "height": height,
                      "override_settings": {"sd_model_checkpoint": model}}
    if img2img:
        req.parameters["denoising_strength"] = req.strength
    return req


def _parse_img2img(body: dict, req: Request) -> None:
    from PIL import Image

    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise ApiError(422, "field 'init_images' must be a list with one base64 image", field="init_images",
                       value=type(images).__name__)
    if len(images) > 1:
        req.not_honoured.append("init_images[1:]")  # A1111 cycles through them; we take the first
    im = decode_image(images[0], "init_images[0]", "RGB")
    req.init_image = np.asarray(im.resize((req.width, req.height), Image.LANCZOS), np.float32) / 255.0
    strength = _get(body, "denoising_strength", (int, float), 0.75, "a number")
    if not 0 < strength <= 1:
        raise ApiError(400, f"field 'denoising_strength' is {strength}; it must be in (0, 1]",
                       field="denoising_strength", value=strength, limit=1)
    req.strength = float(strength)
    if body.get("resize_mode", 0) != 0:
        req.not_honoured.append("resize_mode")
    if body.get("mask") is not None:
        from t2i_jax import inpaint

        m = decode_image(body["mask"], "mask", "L")
        mask = np.asarray(m, np.float32) / 255.0
        if _get(body, "inpainting_mask_invert", (int, bool), 0, "0 or 1"):
            mask = 1.0 - mask
        blur = _get(body, "mask_blur", (int, float), 4, "a number of pixels")
        if not 0 <= blur <= 64:
            raise ApiError(400, f"field 'mask_blur' is {blur}; it must be in [0, 64]", field="mask_blur",
                           value=blur, limit=64)
        req.mask = inpaint.prepare_mask(mask, blur=blur, size=(req.width, req.height))


# --------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------


def infotext(req: Request, seed: int, model: str) -> str:
    """A1111's one-image parameters text (what it writes into PNGs and `infotexts`)."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    extra = f", Denoising strength: {req.strength}" if req.strength is not None else ""
    lines.append(f"Steps: {req.steps}, Sampler: {req.sampler_name}, CFG scale: {req.cfg_scale:g}, Seed: {seed}, "
                 f"Size: {req.width}x{req.height}, Model: {model}{extra}")
    return "\n".join(lines)


def png_base64(image: np.ndarray, text: str | None = None) -> str:
    """A uint8 HWC image as base64 PNG, with A1111's `parameters` text chunk."""
    from PIL import Image, PngImagePlugin

    info = None
    if text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response(req: Request, images: list[np.ndarray], *, interrupted: bool = False,
             job_timestamp: str | None = None, extra: dict | None = None) -> dict:
    """The txt2img/img2img response: `images` (base64 PNG), `parameters`, `info` (a JSON string)."""
    texts = [infotext(req, s, req.model) for s in req.seeds[:len(images)]]
    info = {"prompt": req.prompt, "all_prompts": [req.prompt] * len(req.seeds),
            "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * len(req.seeds),
            "seed": req.seeds[0], "all_seeds": list(req.seeds), "subseed": -1, "all_subseeds": [-1] * len(req.seeds),
            "subseed_strength": 0, "width": req.width, "height": req.height, "sampler_name": req.sampler_name,
            "sampler": req.sampler, "scheduler_options": req.scheduler_options, "cfg_scale": req.cfg_scale,
            "steps": req.steps, "batch_size": req.batch_size, "n_iter": req.n_iter, "restore_faces": False,
            "sd_model_name": req.model, "sd_model_hash": None, "denoising_strength": req.strength,
            "styles": req.styles, "styles_applied": req.styles_applied, "not_honoured": sorted(set(req.not_honoured)),
            "infotexts": texts, "index_of_first_image": 0, "clip_skip": 1, "is_using_inpainting_conditioning":
            req.mask is not None, "job_timestamp": job_timestamp or time.strftime("%Y%m%d%H%M%S"),
            "interrupted": interrupted, "task_id": req.task_id, **(extra or {})}
    if req.styles and not req.styles_applied:
        info["styles_note"] = ("the styled prompt does not fit the text encoder's context; the prompt was used "
                               "as written")
    encoded = [png_base64(im, t) for im, t in zip(images, texts)] if req.send_images else []
    return {"images": encoded, "parameters": req.parameters, "info": json.dumps(info)}


def samplers_list() -> list[dict]:
    """GET /sdapi/v1/samplers."""
    return [{"name": k, "aliases": al, "options": {"scheduler": ours, **{a: str(b) for a, b in opts.items()}}}
            for k, (ours, opts, al) in SAMPLERS.items()]
