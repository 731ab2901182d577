"""Load every part of a Stable Diffusion model into the bundle: `load_components(path_or_id)`.

It sits above the converters (diffusers folders, original single files) and
the models, and builds a `t2i_jax.models.bundle.StableDiffusion`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i_jax.convert import clip as clip_convert
from t2i_jax.convert import core, hub, single_file
from t2i_jax.convert import diffusers as diffusers_convert
from t2i_jax.models import clip as clip_lib
from t2i_jax.models import unet as unet_lib
from t2i_jax.models import vae as vae_lib
from t2i_jax.models.bundle import StableDiffusion
from t2i_jax.schedulers.schedule import SD_SCHEDULER
from t2i_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _is_single_file(s: str) -> bool:
    p = Path(s).expanduser()
    if p.is_file():
        return True
    # `org/name/path/file.safetensors` on the hub.
    return not p.exists() and s.count("/") >= 2 and s.endswith(_SINGLE_FILE_SUFFIXES)


def load_components(path_or_id: str | os.PathLike, *, dtype=jnp.float32, param_dtype=np.float32,
                    variant: str | None = None, config: Mapping[str, Mapping[str, Any]] | None = None,
                    attention_impl: str | None = None, vae: str | os.PathLike | None = None) -> StableDiffusion:
    """Loads tokenizer, text encoder, VAE, U-Net and scheduler config.

    SDXL models (diffusers `StableDiffusionXLPipeline` /
    `StableDiffusionXLImg2ImgPipeline` folders and hub ids, the base and the
    refiner, or the original `sd_xl_base_1.0.safetensors` /
    `sd_xl_refiner_1.0.safetensors` files) also get `tokenizer_2` and
    `text_encoder_2`; the refiner has only those (`tokenizer` and
    `text_encoder` are None).

    `path_or_id` is one of:
    - a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`,
      `text_encoder/`, `tokenizer/`, `scheduler/`) or its hub id
      (`stable-diffusion-v1-5/stable-diffusion-v1-5`); `variant="fp16"` picks
      the `*.fp16.safetensors` weights;
    - an original single-file checkpoint (`v1-5-pruned-emaonly.safetensors`,
      `.ckpt`), local or on the hub as `org/name/file.safetensors`; SD1/SD2
      is inferred from the tensors; `config` overrides per component, e.g.
      `{"scheduler": {"prediction_type": "v_prediction"}}` for SD2 768-v files.

    `dtype` is the compute dtype of the modules (bf16 on accelerators);
    params are returned in `param_dtype`. `vae`: a diffusers AutoencoderKL
    folder or hub id that replaces the model's VAE (e.g.
    `madebyollin/sdxl-vae-fp16-fix`, whose config says `force_upcast: false`:
    it decodes in fp16/bf16 without overflowing). Returns a
    `t2i_jax.models.bundle.StableDiffusion`.
    """
    s = os.fspath(path_or_id)
    if _is_single_file(s):
        pipe = _from_single_file(s, dtype, param_dtype, config, attention_impl)
    elif config:
        raise ValueError("config overrides apply to single-file checkpoints; a diffusers folder brings its own "
                         "config.json files (edit those instead)")
    else:
        pipe = _from_diffusers(s, dtype, param_dtype, variant, attention_impl)
    if vae is not None:
        module, vae_params = diffusers_convert.load_vae(vae, dtype=dtype, param_dtype=param_dtype)
        if module.config.latent_channels != pipe.vae.config.latent_channels:
            raise ValueError(f"vae {os.fspath(vae)!r} has {module.config.latent_channels} latent channels; "
                             f"{s} uses {pipe.vae.config.latent_channels}: pass a VAE of this model family")
        pipe = dataclasses.replace(pipe, vae=module, params={**pipe.params, "vae": vae_params})
    return pipe


def _scheduler_config(raw: Mapping[str, Any]) -> dict:
    # The sampler is chosen at sampling time; only the noise schedule matters.
    return {k: v for k, v in raw.items() if not k.startswith("_")}


# SDXL model_index.json settings the Sampler reads, with diffusers' defaults.
SDXL_OPTIONS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
# diffusers pipeline classes whose folders hold an SDXL model (text_encoder_2 / tokenizer_2).
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def _from_diffusers(s: str, dtype, param_dtype, variant, attention_impl):
    root = hub.resolve(s, allow_patterns=["model_index.json", "tokenizer/*", "tokenizer_2/*", "scheduler/*"])
    if root.is_dir() and not (root / "model_index.json").is_file() and not (root / "unet").is_dir():
        raise FileNotFoundError(
            f"{root} is not a diffusers Stable Diffusion folder: it has no model_index.json and no unet/ "
            f"(it holds {sorted(p.name for p in root.iterdir())[:10]}). Pass the pipeline folder, or a "
            "single-file checkpoint (.safetensors/.ckpt)")
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    cls = index.get("_class_name", "StableDiffusionPipeline")
    sdxl = cls in SDXL_PIPELINES or (not index and (root / "text_encoder_2").is_dir())
    if not sdxl and ("XL" in cls or "Flux" in cls or "StableDiffusion3" in cls):
        raise ValueError(f"{s} is a {cls}; t2i_jax runs Stable Diffusion 1.x/2.x pipelines and "
                         f"{', '.join(SDXL_PIPELINES)}")
    if sdxl:
        return _sdxl_from_diffusers(s, root, index, dtype, param_dtype, variant, attention_impl)
    tok_dir = root / "tokenizer"
    if tok_dir.is_dir():
        tokenizer = Tokenizer.from_pretrained(tok_dir)
    else:
        log.warning("%s has no tokenizer/ folder; using the bundled CLIP tokenizer", root)
        tokenizer = Tokenizer.bundled()
    text_encoder, te_params = clip_convert.load_clip(s, subfolder="text_encoder", dtype=dtype,
                                                     param_dtype=param_dtype, attention_impl=attention_impl)
    unet, unet_params = diffusers_convert.load_unet(s, variant=variant, dtype=dtype, param_dtype=param_dtype,
                                                    attention_impl=attention_impl)
    vae, vae_params = diffusers_convert.load_vae(s, variant=variant, dtype=dtype, param_dtype=param_dtype)
    return StableDiffusion(tokenizer, text_encoder, unet, vae,
                           {"text_encoder": te_params, "unet": unet_params, "vae": vae_params},
                           _folder_scheduler(root), source=s)


def _folder_scheduler(root: Path) -> dict:
    sched_path = root / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        return _scheduler_config(json.loads(sched_path.read_text()))
    log.warning("%s has no scheduler/scheduler_config.json; using SD's noise schedule", root)
    return dict(SD_SCHEDULER)


def _has_part(root: Path, index: Mapping[str, Any], name: str) -> bool:
    """Whether a pipeline folder holds component `name` (model_index says [None, None] for an absent one)."""
    entry = index.get(name)
    if entry is not None and (not isinstance(entry, (list, tuple)) or entry[0] is None):
        return False
    return (root / name).is_dir() if entry is None else True


def _sdxl_from_diffusers(s: str, root: Path, index: Mapping[str, Any], dtype, param_dtype, variant,
                         attention_impl) -> StableDiffusion:
    """An SDXL base or refiner pipeline folder (or hub id): both text encoders where present."""
    params: dict = {}
    encoders = []
    for te_name, tok_name, pad in (("text_encoder", "tokenizer", "<|endoftext|>"),
                                   ("text_encoder_2", "tokenizer_2", "!")):
        if not _has_part(root, index, te_name):
            encoders += [None, None]
            continue
        module, params[te_name] = clip_convert.load_clip(s, subfolder=te_name, dtype=dtype, param_dtype=param_dtype,
                                                         attention_impl=attention_impl, variant=variant)
        if (root / tok_name).is_dir():
            tokenizer = Tokenizer.from_pretrained(root / tok_name)
        else:
            log.warning("%s has no %s/ folder; using the bundled CLIP tokenizer (padding with %r)", root,
                        tok_name, pad)
            tokenizer = Tokenizer.bundled(pad_token=pad)
        encoders += [tokenizer, module]
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = encoders
    if text_encoder_2 is None or not text_encoder_2.with_projection:
        raise ValueError(f"{s}: an SDXL pipeline needs text_encoder_2/, a CLIPTextModelWithProjection (its pooled "
                         "projection conditions the U-Net); this folder has none")
    unet, params["unet"] = diffusers_convert.load_unet(s, variant=variant, dtype=dtype, param_dtype=param_dtype,
                                                       attention_impl=attention_impl)
    vae, params["vae"] = diffusers_convert.load_vae(s, variant=variant, dtype=dtype, param_dtype=param_dtype)
    options = {k: bool(index.get(k, default)) for k, default in SDXL_OPTIONS.items()}
    pipe = StableDiffusion(tokenizer, text_encoder, unet, vae, params, _folder_scheduler(root), source=s,
                           tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2, pipeline_options=options)
    check_sdxl(pipe)
    return pipe


def check_sdxl(pipe: StableDiffusion) -> None:
    """Raises a ValueError naming the mismatch when an SDXL bundle's text widths do not fit its U-Net."""
    ucfg = pipe.unet.config
    if not pipe.is_sdxl:
        raise ValueError(f"{pipe.source}: the U-Net has addition_embed_type {ucfg.addition_embed_type!r}, not "
                         "'text_time'; it is not an SDXL U-Net")
    width = sum(m.config.hidden_size for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None)
    cross = ucfg.per_block("cross_attention_dim")[0]
    if width != cross:
        raise ValueError(f"{pipe.source}: the text encoders' states are {width} wide together; the U-Net's "
                         f"cross_attention_dim is {cross}. The parts come from different models")
    unet_lib.text_time_sizes(ucfg, pipe.text_encoder_2.config.projection_dim)


def _from_single_file(s: str, dtype, param_dtype, config, attention_impl):
    path = Path(s).expanduser()
    if not path.is_file():
        import huggingface_hub

        repo, filename = "/".join(s.split("/")[:2]), "/".join(s.split("/")[2:])
        try:
            path = Path(huggingface_hub.hf_hub_download(repo, filename))
        except Exception as e:
            raise FileNotFoundError(
                f"could not get {filename!r} from hub repo {repo!r} ({type(e).__name__}: {e}). If this machine "
                f"is offline, download the file elsewhere and pass its local path.") from e
    parts = single_file.load_single_file(path, config)
    for w in parts.get("warnings", ()):
        log.warning("%s", w)

    def load(module, part, dummy):
        expected = jax.eval_shape(module.init, jax.random.key(0), *dummy)["params"]
        params, _ = core.load_params(part["state_dict"], expected, source=f"{path} ({name})",
                                     origin=part.get("origin"), ignore=(r"position_ids$",), dtype=param_dtype)
        return params

    name = "unet"
    ucfg = unet_lib.UNetConfig.from_diffusers(parts["unet"]["config"], f"{path} (inferred U-Net config)")
    unet = unet_lib.UNet2DConditionModel(ucfg, dtype=dtype, attention_impl=attention_impl)
    unet_params = load(unet, parts["unet"], unet_lib.dummy_inputs(ucfg))
    name = "vae"
    vcfg = vae_lib.VAEConfig.from_diffusers(parts["vae"]["config"], f"{path} (inferred VAE config)")
    vae = vae_lib.AutoencoderKL(vcfg, dtype=dtype)
    side = 8 * vcfg.downsample_factor
    vae_params = load(vae, parts["vae"], (jnp.zeros((1, side, side, vcfg.in_channels), jnp.float32),))
    if parts["family"].startswith("sdxl"):
        return _sdxl_single_file(parts, unet, unet_params, vae, vae_params, dtype, param_dtype, attention_impl, path)
    name = "text_encoder"
    text_encoder = clip_convert.build_module(parts["text_encoder"]["config"], dtype=dtype,
                                             attention_impl=attention_impl)
    te_params = load(text_encoder, parts["text_encoder"], clip_lib.dummy_inputs(text_encoder))
    # SD2's OpenCLIP tokenizer is the same BPE; it pads with "!" (id 0).
    tokenizer = Tokenizer.bundled(pad_token="!" if parts["family"] == "sd2" else "<|endoftext|>")
    sched = dict(parts["scheduler"]["config"])
    return StableDiffusion(tokenizer, text_encoder, unet, vae,
                           {"text_encoder": te_params, "unet": unet_params, "vae": vae_params}, sched,
                           source=str(path))


def _sdxl_single_file(parts, unet, unet_params, vae, vae_params, dtype, param_dtype, attention_impl, path):
    """The bundle of an SDXL base or refiner single file (`convert.sdxl_file`): CLIP-L (base only) pads
    with <|endoftext|>, the bigG tokenizer with "!" (id 0), as stabilityai's tokenizer_2."""
    params = {"unet": unet_params, "vae": vae_params}
    found = {}
    for name, pad in (("text_encoder", "<|endoftext|>"), ("text_encoder_2", "!")):
        if name not in parts:
            found[name] = (None, None)
            continue
        module = clip_convert.build_module(parts[name]["config"], dtype=dtype, attention_impl=attention_impl)
        expected = jax.eval_shape(module.init, jax.random.key(0), *clip_lib.dummy_inputs(module))["params"]
        params[name], _ = core.load_params(parts[name]["state_dict"], expected, source=f"{path} ({name})",
                                           origin=parts[name].get("origin"), ignore=(r"position_ids$",),
                                           dtype=param_dtype)
        found[name] = (Tokenizer.bundled(pad_token=pad), module)
    # As stabilityai's model_index.json files say: the refiner (no CLIP-L) conditions on an aesthetic score
    # and encodes an empty negative prompt; the base uses zeros for it.
    refiner = parts["family"] == "sdxl_refiner"
    options = {"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner}
    pipe = StableDiffusion(*found["text_encoder"], unet, vae, params, dict(parts["scheduler"]["config"]),
                           source=str(path), tokenizer_2=found["text_encoder_2"][0],
                           text_encoder_2=found["text_encoder_2"][1], pipeline_options=options)
    check_sdxl(pipe)
    return pipe
