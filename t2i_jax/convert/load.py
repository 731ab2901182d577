"""Load every part of a Stable Diffusion model into the bundle: `load_components(path_or_id)`.

It sits above the converters (diffusers folders, original single files) and
the models, and builds a `t2i_jax.models.bundle.StableDiffusion`.
"""

from __future__ import annotations

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
                    attention_impl: str | None = None) -> StableDiffusion:
    """Loads tokenizer, text encoder, VAE, U-Net and scheduler config.

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
    params are returned in `param_dtype`. Returns a
    `t2i_jax.models.bundle.StableDiffusion`.
    """
    s = os.fspath(path_or_id)
    if _is_single_file(s):
        return _from_single_file(s, dtype, param_dtype, config, attention_impl)
    if config:
        raise ValueError("config overrides apply to single-file checkpoints; a diffusers folder brings its own "
                         "config.json files (edit those instead)")
    return _from_diffusers(s, dtype, param_dtype, variant, attention_impl)


def _scheduler_config(raw: Mapping[str, Any]) -> dict:
    # The sampler is chosen at sampling time; only the noise schedule matters.
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _from_diffusers(s: str, dtype, param_dtype, variant, attention_impl):
    root = hub.resolve(s, allow_patterns=["model_index.json", "tokenizer/*", "scheduler/*"])
    if root.is_dir() and not (root / "model_index.json").is_file() and not (root / "unet").is_dir():
        raise FileNotFoundError(
            f"{root} is not a diffusers Stable Diffusion folder: it has no model_index.json and no unet/ "
            f"(it holds {sorted(p.name for p in root.iterdir())[:10]}). Pass the pipeline folder, or a "
            "single-file checkpoint (.safetensors/.ckpt)")
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    cls = index.get("_class_name", "StableDiffusionPipeline")
    if "XL" in cls or "Flux" in cls or "StableDiffusion3" in cls:
        raise ValueError(f"{s} is a {cls}; t2i_jax runs Stable Diffusion 1.x/2.x pipelines")
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
    sched_path = root / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        sched = _scheduler_config(json.loads(sched_path.read_text()))
    else:
        log.warning("%s has no scheduler/scheduler_config.json; using SD's noise schedule", root)
        sched = dict(SD_SCHEDULER)
    return StableDiffusion(tokenizer, text_encoder, unet, vae,
                           {"text_encoder": te_params, "unet": unet_params, "vae": vae_params}, sched, source=s)


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
