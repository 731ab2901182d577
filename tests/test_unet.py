"""U-Net parity with diffusers' UNet2DConditionModel, load/export, config errors.

Tiny random diffusers models are built here (torch.manual_seed), saved with
save_pretrained and loaded back through t2i_jax.convert.diffusers.
"""

import copy
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

diffusers = pytest.importorskip("diffusers")

from t2i_jax.convert import core  # noqa: E402
from t2i_jax.convert import diffusers as dconv  # noqa: E402
from t2i_jax.models import unet as unet_lib  # noqa: E402

# Three architectures that together cover SD 1.x and 2.x: conv vs linear
# transformer projections, int vs per-block head counts, upcast attention,
# 2 transformer layers, both downsample paddings, flipped/shifted timestep
# embeddings, an odd latent size (diffusers' upsample_size path).
CONFIGS = {
    "sd1": dict(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    ),
    "sd2": dict(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=48, attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
    ),
    "upcast": dict(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16, cross_attention_dim=32, attention_head_dim=2,
        upcast_attention=True, transformer_layers_per_block=2, use_linear_projection=True,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, center_input_sample=True,
        mid_block_scale_factor=1.414,
    ),
}
# (H, W, text length, timesteps); None timesteps -> a scalar
INPUTS = {"sd1": (16, 16, 7, (10, 500)), "sd2": (15, 13, 5, (999, 1)), "upcast": (16, 16, 6, None)}


def rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref))


def torch_unet(cfg: dict, seed: int = 0):
    """A diffusers U-Net with random weights, norms and biases off their init values."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_inputs(name: str, cfg: dict, seed: int = 1):
    h, w, length, ts = INPUTS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.get("in_channels", 4), h, w, generator=g)
    ctx = torch.randn(2, length, cfg["cross_attention_dim"], generator=g)
    t = torch.tensor(ts) if ts is not None else torch.tensor(321)
    return x, t, ctx


def to_jax(x, t, ctx):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())


class Case:
    """A saved diffusers U-Net, its Flax twin, and its reference output."""

    def __init__(self, name, folder):
        self.name, self.cfg, self.folder = name, CONFIGS[name], folder
        self.torch = torch_unet(self.cfg)
        self.torch.save_pretrained(folder)
        self.inputs = make_inputs(name, self.cfg)
        with torch.no_grad():
            self.ref = self.torch(*self.inputs).sample.numpy()
        self.module, self.params = dconv.load_unet(folder)
        self.apply = jax.jit(self.module.apply)

    def run(self, params, module=None):
        fn = self.apply if module is None else jax.jit(module.apply)
        out = fn({"params": params}, *to_jax(*self.inputs))
        return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Case(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


# --------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(cases, name):
    case = cases(name)
    t0 = time.time()
    out = case.run(case.params)
    err = rel_err(out, case.ref)
    print(f"\nunet {name}: rel err {err:.2e} (jit+run {time.time() - t0:.1f}s)")
    assert out.shape == case.ref.shape
    assert err <= 1e-5


def test_config_read_from_diffusers_file(cases):
    case = cases("sd2")
    cfg = case.module.config
    assert cfg.attention_head_dim == (2, 4, 8)
    assert cfg.use_linear_projection is True and cfg.cross_attention_dim == 48
    # heads per block are diffusers' attention_head_dim; head size is channels // heads
    p = case.params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert p.shape == (64, 64)
    assert case.params["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].shape == (32, 32)  # Linear


def test_bf16_compute_close_to_fp32(cases):
    case = cases("sd1")
    module = unet_lib.UNet2DConditionModel(case.module.config, dtype=jnp.bfloat16)
    out = case.run(case.params, module)
    err = rel_err(out, case.ref)
    print(f"\nunet bf16 rel err {err:.2e}")
    assert out.dtype == np.float32
    assert 1e-5 < err <= 2e-2  # really ran in bf16, and close


def test_remat_same_values_and_grads(cases):
    case = cases("sd1")
    plain = case.module
    remat = unet_lib.UNet2DConditionModel(plain.config, remat=True)
    x, t, ctx = to_jax(*case.inputs)

    def loss(module):
        return lambda p: jnp.mean(jnp.square(module.apply({"params": p}, x, t, ctx, train=True)))

    # the remat module really checkpoints (one remat region per block), the plain one does not
    jaxprs = [str(jax.make_jaxpr(jax.grad(loss(m)))(case.params)) for m in (plain, remat)]
    assert jaxprs[0].count("remat") == 0 and jaxprs[1].count("remat") == 5  # 2 down, mid, 2 up
    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss(m)))(case.params) for m in (plain, remat))
    assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
    flat0, flat1 = traverse_util.flatten_dict(g0), traverse_util.flatten_dict(g1)
    assert flat0.keys() == flat1.keys()
    num = sum(float(jnp.sum(jnp.square(flat0[k] - flat1[k]))) for k in flat0)
    den = sum(float(jnp.sum(jnp.square(flat0[k]))) for k in flat0)
    assert (num / den) ** 0.5 <= 1e-5


# --------------------------------------------------------------------------
# Export round trip and file variants
# --------------------------------------------------------------------------


# slow (30 s): U-Net export to diffusers stays fast in test_train_ldm.py::test_export_loads_in_diffusers_and_sample_cli
# and test_sdxl.py::test_folder_export_round_trip.
@pytest.mark.slow
def test_save_unet_round_trip_through_diffusers(cases, tmp_path):
    case = cases("sd2")
    # Fresh Flax params (not the ones read from torch), perturbed so no leaf sits at its init value.
    shapes = jax.eval_shape(case.module.init, jax.random.key(0), *unet_lib.dummy_inputs(case.module.config))
    leaves, tree = jax.tree.flatten(shapes["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, s.shape) + (1.0 if len(s.shape) == 1 else 0)
                                       for k, s in zip(keys, leaves)])
    params = jax.tree.map(np.asarray, params)
    out_dir = dconv.save_unet(params, case.module.config, tmp_path / "unet")
    model, info = diffusers.UNet2DConditionModel.from_pretrained(out_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == [] and info["error_msgs"] == []
    with torch.no_grad():
        ref = model.eval()(*case.inputs).sample.numpy()
    err = rel_err(case.run(params), ref)
    print(f"\nunet round trip rel err {err:.2e}")
    assert err <= 1e-5
    # and back: the exported folder loads to the same params
    _, again = dconv.load_unet(out_dir)
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, again)
    assert max(jax.tree.leaves(diff)) == 0.0


def test_fp16_variant_and_bin_files(cases, tmp_path):
    case = cases("sd1")
    copy.deepcopy(case.torch).to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    _, p16 = dconv.load_unet(tmp_path / "fp16", variant="fp16")
    want = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), case.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, p16, want))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.fp16.safetensors"):
        dconv.load_unet(case.folder, variant="fp16")

    case.torch.save_pretrained(tmp_path / "bin", safe_serialization=False)
    _, pbin = dconv.load_unet(tmp_path / "bin")
    assert jax.tree.all(jax.tree.map(np.array_equal, pbin, case.params))


def test_sharded_files(cases, tmp_path):
    case = cases("sd1")
    case.torch.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    copy.deepcopy(case.torch).half().save_pretrained(tmp_path / "sharded16", max_shard_size="100KB", variant="fp16")
    names = sorted(p.name for p in (tmp_path / "sharded16").iterdir())
    assert len(names) > 4 and "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    _, params = dconv.load_unet(tmp_path / "sharded")
    assert jax.tree.all(jax.tree.map(np.array_equal, params, case.params))
    _, p16 = dconv.load_unet(tmp_path / "sharded16", variant="fp16")
    want = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), case.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, p16, want))


def test_hub_id_is_resolved_offline(monkeypatch, tmp_path):
    # No network in tests: an uncached hub id must fail with a message naming it and the fix.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"could not get 'nobody/no-such-sd-model'.*--local-dir"):
        dconv.load_unet("nobody/no-such-sd-model")


def test_pipeline_folder_uses_unet_subfolder(cases, tmp_path):
    case = cases("sd1")
    case.torch.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    module, params = dconv.load_unet(tmp_path / "pipe")
    assert module.config == case.module.config
    assert jax.tree.all(jax.tree.map(np.array_equal, params, case.params))


# --------------------------------------------------------------------------
# Configs and errors
# --------------------------------------------------------------------------


def test_named_variants():
    sd15 = unet_lib.UNetConfig.named("sd15")
    assert (sd15.cross_attention_dim, sd15.attention_head_dim, sd15.use_linear_projection) == (768, 8, False)
    assert sd15.block_out_channels == (320, 640, 1280, 1280) and sd15.layers_per_block == 2
    sd21 = unet_lib.UNetConfig.named("sd21")
    assert sd21.attention_head_dim == (5, 10, 20, 20)
    assert (sd21.cross_attention_dim, sd21.use_linear_projection, sd21.upcast_attention) == (1024, True, True)
    assert sd21.sample_size == 96
    d = sd21.to_diffusers()
    assert d["_class_name"] == "UNet2DConditionModel" and d["attention_head_dim"] == [5, 10, 20, 20]
    assert unet_lib.UNetConfig.from_diffusers(d) == sd21
    with pytest.raises(ValueError, match="'sd3'.*sd15"):
        unet_lib.UNetConfig.named("sd3")


def test_unknown_config_field_names_field_and_file(cases, tmp_path):
    case = cases("sd1")
    folder = tmp_path / "unet"
    case.torch.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "fancy_new_option": 3}))
    with pytest.raises(ValueError) as e:
        dconv.load_unet(folder)
    msg = str(e.value)
    assert "unknown field 'fancy_new_option'" in msg and str(folder / "config.json") in msg


def test_unsupported_variant_field_is_named():
    base = unet_lib.UNetConfig.named("tiny").to_diffusers()
    with pytest.raises(ValueError, match=r"x/config.json: field 'class_embed_type' = 'timestep' is not supported"):
        unet_lib.UNetConfig.from_diffusers({**base, "class_embed_type": "timestep"}, "x/config.json")
    # SDXL's "text_time" is implemented (tests/test_sdxl.py); other addition embeddings are not.
    with pytest.raises(ValueError, match="addition_embed_type 'image' is not supported"):
        unet_lib.UNetConfig.from_diffusers({**base, "addition_embed_type": "image"})
    # the default values of those fields, as real SD configs carry them, are fine
    ok = unet_lib.UNetConfig.from_diffusers({**base, "class_embed_type": None, "dual_cross_attention": False,
                                             "only_cross_attention": False, "num_class_embeds": None})
    assert ok == unet_lib.UNetConfig.named("tiny")
    with pytest.raises(ValueError, match="down block type 'SimpleCrossAttnDownBlock2D'"):
        unet_lib.UNetConfig.from_diffusers({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D",
                                                                          "DownBlock2D"]})


def test_other_architecture_is_rejected(cases, tmp_path):
    case = cases("sd1")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"describes a AutoencoderKL, not a UNet2DConditionModel"):
        dconv.load_unet(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"describes a UNet2DConditionModel, not a AutoencoderKL"):
        dconv.load_vae(case.folder)

    import transformers

    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"transformers config \(\['CLIPTextModel'\]\)"):
        dconv.load_unet(tmp_path / "clip")

    # weights of another U-Net under this config: the strict report names the keys
    folder = tmp_path / "mixed"
    case.torch.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 40}))
    with pytest.raises(core.ConversionError) as e:
        dconv.load_unet(folder)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in str(e.value)
    assert "model expects (40, 32), checkpoint has (32, 32)" in str(e.value)
    assert len(e.value.report.misshapen) == 8  # to_k, to_v in 4 attentions (down 1, mid 1, up 2)


def test_missing_folder_or_weights_are_named(cases, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        dconv.load_unet(tmp_path / "nowhere")
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no load_unet config found.*empty/unet/config.json"):
        dconv.load_unet(folder)
    (folder / "config.json").write_text(json.dumps(unet_lib.UNetConfig.named("tiny").to_diffusers()))
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model.safetensors"):
        dconv.load_unet(folder)


# --------------------------------------------------------------------------
# Full-size configs (random weights)
# --------------------------------------------------------------------------


def _full_case(name: str):
    cfg = unet_lib.UNetConfig.named(name)
    raw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**raw).eval()
    module = unet_lib.UNet2DConditionModel(cfg)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    expected = jax.eval_shape(module.init, jax.random.key(0), *unet_lib.dummy_inputs(cfg))["params"]
    params, _ = core.load_params(state, expected, source=name)
    return model, module, params


@pytest.mark.slow
def test_sd15_parameter_count():
    cfg = unet_lib.UNetConfig.named("sd15")
    module = unet_lib.UNet2DConditionModel(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *unet_lib.dummy_inputs(cfg))["params"]
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    raw = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = sum(p.numel() for p in diffusers.UNet2DConditionModel(**raw).parameters())
    assert ours == theirs == 859_520_964


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_parity(name):
    t0 = time.time()
    model, module, params = _full_case(name)
    cfg = module.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ref = model(x, t, ctx).sample.numpy()
    del model
    out = jax.jit(module.apply)({"params": params}, *to_jax(x, t, ctx))
    err = rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)
    print(f"\nunet {name} full size: rel err {err:.2e} ({time.time() - t0:.0f}s)")
    assert err <= 1e-4
