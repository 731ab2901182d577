"""VAE parity with diffusers' AutoencoderKL, legacy key names, export, errors."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from t2i_jax.convert import core  # noqa: E402
from t2i_jax.convert import diffusers as dconv  # noqa: E402
from t2i_jax.models import vae as vae_lib  # noqa: E402

CONFIGS = {
    # SD-like: quant convs and mid-block attention
    "sd": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
               latent_channels=4, sample_size=32),
    # the switches: no quant convs, no mid attention, 2 layers, 3 levels, 1-channel images
    "plain": dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8,
                  in_channels=1, out_channels=1, latent_channels=3, sample_size=32,
                  use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}


def rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


class Case:
    """A saved diffusers VAE, its Flax twin and reference encode/decode outputs."""

    def __init__(self, name, folder):
        self.cfg = CONFIGS[name]
        torch.manual_seed(0)
        self.torch = diffusers.AutoencoderKL(**self.cfg).eval()
        with torch.no_grad():
            for p in self.torch.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        self.torch.save_pretrained(folder)
        self.folder = folder
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(2, self.cfg.get("in_channels", 3), 32, 24, generator=g) * 2 - 1
        with torch.no_grad():
            post = self.torch.encode(self.x).latent_dist
            self.mean, self.logvar = post.mean.numpy(), post.logvar.numpy()
            self.kl = post.kl().numpy()
            self.z = torch.randn(post.mean.shape, generator=g)
            self.dec = self.torch.decode(self.z).sample.numpy()
        self.module, self.params = dconv.load_vae(folder)
        self.encode = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method="encode"))
        self.decode = jax.jit(lambda p, z: self.module.apply({"params": p}, z, method="decode"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Case(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_parity(cases, name):
    case = cases(name)
    t0 = time.time()
    post = case.encode(case.params, nhwc(case.x))
    dec = case.decode(case.params, nhwc(case.z))
    errs = {"mean": rel_err(nchw(post.mean), case.mean), "logvar": rel_err(nchw(post.logvar), case.logvar),
            "kl": rel_err(post.kl(), case.kl), "decode": rel_err(nchw(dec), case.dec)}
    print(f"\nvae {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" ({time.time() - t0:.1f}s)")
    f = case.module.config.downsample_factor
    assert post.mean.shape == (2, 32 // f, 24 // f, case.cfg["latent_channels"])
    assert max(errs.values()) <= 1e-5


def test_posterior_sample_and_call(cases):
    case = cases("sd")
    post = case.encode(case.params, nhwc(case.x))
    rng = jax.random.key(7)
    s = post.sample(rng)
    noise = jax.random.normal(rng, post.mean.shape)
    np.testing.assert_allclose(s, post.mean + jnp.exp(0.5 * post.logvar) * noise, rtol=1e-6, atol=1e-6)
    assert float(jnp.std(s - post.mode())) > 0.01
    # __call__ reconstructs from the mean unless asked to sample
    rec, _ = case.module.apply({"params": case.params}, nhwc(case.x))
    with torch.no_grad():
        ref = case.torch(case.x).sample.numpy()
    assert rel_err(nchw(rec), ref) <= 1e-5
    rec2, _ = case.module.apply({"params": case.params}, nhwc(case.x), sample_posterior=True, rng=rng)
    want = case.decode(case.params, s)
    assert rel_err(rec2, np.asarray(want)) <= 1e-5
    rec3, _ = case.module.apply({"params": case.params}, nhwc(case.x), sample_posterior=True,
                                rngs={"sample": rng})
    assert rel_err(rec3, np.asarray(rec)) > 1e-3  # the "sample" stream also samples


def test_logvar_is_clipped_like_diffusers():
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 2)), jnp.full((1, 2, 2, 1), -50.0),
                               jnp.full((1, 2, 2, 1), 35.0)], axis=-1)
    post = vae_lib.DiagonalGaussian.from_moments(moments)
    assert post.logvar[0, 0, 0].tolist() == [-30.0, 20.0]


def test_bf16_compute_close_to_fp32(cases):
    case = cases("sd")
    module = vae_lib.AutoencoderKL(case.module.config, dtype=jnp.bfloat16)
    post = module.apply({"params": case.params}, nhwc(case.x), method="encode")
    dec = module.apply({"params": case.params}, nhwc(case.z), method="decode")
    errs = rel_err(nchw(post.mean), case.mean), rel_err(nchw(dec), case.dec)
    print(f"\nvae bf16: mean {errs[0]:.2e}, decode {errs[1]:.2e}")
    assert dec.dtype == jnp.float32
    assert all(1e-5 < e <= 2e-2 for e in errs)


def test_legacy_attention_names_and_1x1_convs(cases, tmp_path):
    case = cases("sd")
    state = core.read_weights_dir(case.folder, dconv.WEIGHT_STEMS)
    old = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in state.items():
        for new, legacy in renames.items():
            if ".mid_block.attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
                if k.startswith("decoder") and k.endswith("weight"):
                    v = v[:, :, None, None]  # the 1x1-conv form
        old[k] = np.asarray(v)
    assert sum(".query." in k or ".proj_attn." in k for k in old) == 8
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text((case.folder / "config.json").read_text())
    core.write_safetensors(old, folder / "diffusion_pytorch_model.safetensors")
    _, params = dconv.load_vae(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, case.params))


def test_save_vae_round_trip_through_diffusers(cases, tmp_path):
    case = cases("sd")
    leaves, tree = jax.tree.flatten(case.params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree.unflatten(tree, [np.asarray(a + 0.02 * jax.random.normal(k, a.shape))
                                       for k, a in zip(keys, leaves)])
    out_dir = dconv.save_vae(params, case.module.config, tmp_path / "vae")
    model, info = diffusers.AutoencoderKL.from_pretrained(out_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == [] and info["error_msgs"] == []
    assert model.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        post = model.eval().encode(case.x).latent_dist
        dec = model.decode(case.z).sample.numpy()
    ours = case.encode(params, nhwc(case.x))
    errs = rel_err(nchw(ours.mean), post.mean.numpy()), rel_err(nchw(case.decode(params, nhwc(case.z))), dec)
    print(f"\nvae round trip: mean {errs[0]:.2e}, decode {errs[1]:.2e}")
    assert max(errs) <= 1e-5


def test_named_variants_and_config_errors(cases):
    sd = vae_lib.VAEConfig.named("sd")
    assert sd.block_out_channels == (128, 256, 512, 512) and sd.layers_per_block == 2
    assert sd.downsample_factor == 8 and sd.scaling_factor == 0.18215
    assert vae_lib.VAEConfig.from_diffusers(sd.to_diffusers()) == sd
    cfg = json.loads((cases("sd").folder / "config.json").read_text())
    assert vae_lib.VAEConfig.from_diffusers(cfg) == cases("sd").module.config
    with pytest.raises(ValueError, match=r"vae/config.json: unknown field 'blur_kernel'"):
        vae_lib.VAEConfig.from_diffusers({**cfg, "blur_kernel": 3}, "vae/config.json")
    with pytest.raises(ValueError, match=r"field 'latents_mean' = \[0.1, 0.2\] is not supported"):
        vae_lib.VAEConfig.from_diffusers({**cfg, "latents_mean": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"expected 2 x 'DownEncoderBlock2D'"):
        vae_lib.VAEConfig.from_diffusers({**cfg, "down_block_types": ["DownEncoderBlock2D", "Other"]})


def test_load_errors_name_the_problem(cases, tmp_path):
    case = cases("sd")
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        dconv.load_vae(tmp_path / "no-such-vae")
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((case.folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model.safetensors.*holds \['config.json'\]"):
        dconv.load_vae(folder)
    with pytest.raises(ValueError, match="is a file"):
        dconv.load_vae(case.folder / "diffusion_pytorch_model.safetensors")
    # a VAE whose weights have one channel count more than its config says
    cfg = json.loads((case.folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "latent_channels": 3}))
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(case.folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(core.ConversionError, match=r"quant_conv.weight: model expects \(1, 1, 6, 6\)"):
        dconv.load_vae(folder)


# --------------------------------------------------------------------------
# Full size (random weights)
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_sd_vae_full_size_parity():
    t0 = time.time()
    cfg = vae_lib.VAEConfig.named("sd")
    raw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**raw).eval()
    module = vae_lib.AutoencoderKL(cfg)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    params, _ = core.load_params(state, expected, source="sd-vae")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        dec = model.decode(z).sample.numpy()
    ours = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, nhwc(x))
    ours_dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, nhwc(z))
    errs = (rel_err(nchw(ours.mean), post.mean.numpy()), rel_err(nchw(ours.logvar), post.logvar.numpy()),
            rel_err(nchw(ours_dec), dec))
    print(f"\nvae sd full size: mean {errs[0]:.2e}, logvar {errs[1]:.2e}, decode {errs[2]:.2e} "
          f"({time.time() - t0:.0f}s)")
    assert max(errs) <= 1e-4
