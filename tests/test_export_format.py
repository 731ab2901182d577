"""The exporters' shared calling convention and the library versions their
config.json files name (the round trips through from_pretrained are in
test_unet.py, test_vae.py, test_clip.py)."""

import importlib.metadata
import inspect
import json

import diffusers
import jax
import numpy as np
import pytest
import transformers

from t2i_jax.convert import clip as clip_convert
from t2i_jax.convert import core
from t2i_jax.convert import diffusers as dconv
from t2i_jax.models import clip as clip_lib
from t2i_jax.models import unet as unet_lib
from t2i_jax.models import vae as vae_lib
from t2i_jax.train import export


def _zeros(module, *inputs):
    """A params tree of the right shapes, without running init."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def parts():
    ucfg, vcfg = unet_lib.UNetConfig.named("tiny"), vae_lib.VAEConfig.named("tiny")
    text = clip_lib.CLIPTextModel(clip_lib.named_config("tiny").text)
    side = vcfg.downsample_factor
    return {
        "unet": (_zeros(unet_lib.UNet2DConditionModel(ucfg), *unet_lib.dummy_inputs(ucfg)), ucfg),
        "vae": (_zeros(vae_lib.AutoencoderKL(vcfg), np.zeros((1, side, side, 3), np.float32)), vcfg),
        "clip": (_zeros(text, *clip_lib.dummy_inputs(text)), text),
    }


SAVERS = {"unet": dconv.save_unet, "vae": dconv.save_vae, "clip": clip_convert.save_clip}


def test_savers_take_one_argument_order():
    for name, fn in SAVERS.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:3]] == ["params", "module" if name == "clip" else "config", "out_dir"], name
        assert params[3].name == "dtype" and params[3].kind is inspect.Parameter.KEYWORD_ONLY, name


@pytest.mark.parametrize("name", list(SAVERS))
def test_saved_config_names_the_installed_version(parts, tmp_path, name):
    params, spec = parts[name]
    out = SAVERS[name](params, spec, tmp_path / name)
    cfg = json.loads((out / "config.json").read_text())
    if name == "clip":
        assert cfg["transformers_version"] == transformers.__version__
        assert cfg["architectures"] == ["CLIPTextModel"]
    else:
        assert cfg["_diffusers_version"] == diffusers.__version__
    # The old (module, params, ...) order of save_clip, or a config first, fails loudly.
    with pytest.raises(TypeError, match=rf"save_{name} takes \(params, .*pass the params first"):
        SAVERS[name](spec, params, tmp_path / "swapped")
    assert not (tmp_path / "swapped").exists()


def test_pipeline_metadata_names_the_installed_version():
    assert export.scheduler_json({"num_train_timesteps": 1000})["_diffusers_version"] == diffusers.__version__


def test_version_without_the_library_is_the_verified_one(monkeypatch):
    # The fallback names the version the format was checked with: this test
    # environment's (bump VERIFIED_VERSIONS once the round trips pass on a new one).
    assert core.VERIFIED_VERSIONS == {"diffusers": diffusers.__version__, "transformers": transformers.__version__}

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert core.target_version("diffusers") == core.VERIFIED_VERSIONS["diffusers"]
    assert core.target_version("transformers") == core.VERIFIED_VERSIONS["transformers"]
