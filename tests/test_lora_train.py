"""LoRA training in the ldm trainer (t2i_jax.train.lora): only adapters in the train state, resume,
export round trip through diffusers' load_lora_weights, train-state memory, and (slow) a new colour
word learnt on the bundled shapes model."""

import ast
import json
import shutil
import sys
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from test_pipeline import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import lora_sd15, lora_shapes, sd15_finetune  # noqa: E402
from t2i_jax.convert import lora as lora_convert  # noqa: E402
from t2i_jax.convert.load import load_components  # noqa: E402
from t2i_jax.models import unet as unet_lib  # noqa: E402
from t2i_jax.train import ldm  # noqa: E402
from t2i_jax.train import lora as lora_lib  # noqa: E402
from t2i_jax.train import state as state_lib  # noqa: E402
from t2i_jax.train.checkpoint import Checkpointer  # noqa: E402

STEPS = 4  # every run has the same schedule, so the compilation cache serves them all
TE_TARGETS = "q_proj|k_proj|v_proj|out_proj"

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


def _config(model: Path):
    """LoRA rank 4 (alpha 8: scale 2) on the tiny diffusers pipeline's U-Net attention and text
    encoder, 16 px shapes, batch 8, streaming (the text encoder is trained), no eval, export on."""
    c = ldm.default_config()
    c.model.init_from = str(model)
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.lora.text_encoder_targets = TE_TARGETS
    c.data = ldm.ml_collections.ConfigDict({"name": "shapes", "resolution": 16, "split": "train", "seed": 0,
                                            "length": 64, "worker_count": 0})
    c.batch_size = 8
    c.progress = False
    c.eval.prompts = []
    c.mesh.num_devices = 1
    c.optim.lr = 3e-2  # large, so that a few steps move lora_up well away from zero
    c.optim.warmup_steps = 1
    c.ema_decay = 0.0
    c.train.steps = STEPS
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny diffusers pipeline; a 4-step LoRA run (checkpoints at 2 and 4); a run resumed
    from a copy of its checkpoint 2 (two runs instead of three: the cheap exact-resume check)."""
    root = tmp_path_factory.mktemp("lora_train")
    build_tiny_pipeline(root / "model")
    full = ldm.train_and_evaluate(_config(root / "model"), root / "full")
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "full" / "checkpoints" / "2", root / "resumed" / "checkpoints" / "2")
    resumed = ldm.train_and_evaluate(_config(root / "model"), root / "resumed")
    pipe = load_components(str(root / "model"))
    return {"root": root, "full": full, "resumed": resumed, "pipe": pipe,
            "targets": lora_lib.find_targets(pipe.params, _config(root / "model"))}


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_state_holds_only_adapters(runs):
    pipe, targets = runs["pipe"], runs["targets"]
    state = runs["full"]["state"]
    # 2 attention layers x 2 (self, cross) x 4 projections x 3 blocks (down, mid, up) ... as found:
    n_unet = sum(t.component == "unet" for t in targets)
    n_te = sum(t.component == "text_encoder" for t in targets)
    assert n_te == 2 * 4  # two CLIP layers, q/k/v/out_proj
    assert n_unet == len([k for k in _flat(pipe.params["unet"]) if k.endswith("kernel") and k.split("/")[-2] in
                          ("to_q", "to_k", "to_v", "to_out_0")])
    params = _flat(state.params)
    assert len(params) == 2 * len(targets)
    assert {k.split("/")[-1] for k in params} == {"lora_down", "lora_up"}
    # The optimizer state: Adam's moments of the adapters and scalars, nothing of the base U-Net.
    opt = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x)]
    assert len(opt) == 2 * len(params)
    assert sorted(x.shape for x in opt) == sorted([v.shape for v in params.values()] * 2)
    assert state.ema_params is None
    # Trained: every lora_up left zero, every lora_down moved off its init.
    ups = [v for k, v in params.items() if k.endswith("lora_up")]
    assert min(float(np.abs(u).max()) for u in ups) > 1e-3


def test_frozen_base_in_compute_dtype(runs):
    pipe = runs["pipe"]
    c = _config(runs["root"] / "model")
    c.model.dtype = "bfloat16"
    frozen = lora_lib.frozen_params(pipe.params, c)
    for comp in ("unet", "text_encoder"):
        flat = _flat(frozen[comp])
        kernels = [k for k in flat if k.endswith("kernel") or k.endswith("embedding")]
        assert kernels and all(flat[k].dtype == jnp.bfloat16 for k in kernels)
        assert all(flat[k].dtype == np.float32 for k in flat if k.endswith("scale"))  # norms stay fp32
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(frozen["vae"]))


def test_only_target_kernels_change(runs):
    """Merged into the base, the trained adapters change exactly the targeted kernels."""
    pipe, targets = runs["pipe"], runs["targets"]
    merged = lora_lib.merged_params(pipe.params, jax.device_get(runs["full"]["state"].params), targets, 2.0)
    changed = set()
    for comp in ("unet", "text_encoder"):
        a, b = _flat(pipe.params[comp]), _flat(merged[comp])
        changed |= {(comp, k) for k in a if not np.array_equal(a[k], b[k])}
    assert changed == {(t.component, "/".join((*t.path, "kernel"))) for t in targets}


def test_checkpoint_holds_adapters_and_resume_is_exact(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert resumed["step"] == STEPS
    a, b = _flat(full["state"].params), _flat(resumed["state"].params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0)
    ckpt = Checkpointer(runs["root"] / "resumed" / "checkpoints")
    assert ckpt.all_steps() == [2, STEPS]
    ckpt.close()
    state_dir = runs["root"] / "resumed" / "checkpoints" / str(STEPS) / "state"
    # What orbax saved, leaf by leaf: step, rng, Adam's count and the adapters with their moments.
    saved = [ast.literal_eval(k) for k in json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]]
    n_adapters = len(_flat(full["state"].params))
    assert sum(k[-1] in ("lora_down", "lora_up") for k in saved) == 3 * n_adapters  # params, mu, nu
    assert not {k[-1] for k in saved} & {"kernel", "bias", "scale", "embedding"}  # no base weight
    on_disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    unet_bytes = lora_lib.state_bytes(runs["pipe"].params["unet"])
    # The adapters' arrays (0.3 MB) and orbax's per-leaf metadata; the base U-Net alone is larger.
    assert lora_lib.state_bytes(full["state"]) < on_disk < unet_bytes


def _unet_inputs(seed=0):
    r = np.random.RandomState(seed)
    x = r.randn(2, 16, 16, 4).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = r.randn(2, 77, 32).astype(np.float32)
    return x, t, ctx


def _diffusers_unet(ref, lora_path, x, t, ctx):
    ref.unload_lora_weights()
    ref.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    with torch.no_grad():
        out = ref.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                       encoder_hidden_states=torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
        ids = torch.from_numpy(ref.tokenizer(["a red circle"], padding="max_length", return_tensors="np").input_ids)
        te = ref.text_encoder(ids).last_hidden_state.numpy()
    return out, te, ids.numpy()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_export_round_trip_through_diffusers(runs):
    """The trained LoRA, exported in both formats, loaded by diffusers' load_lora_weights, gives the
    U-Net (and text encoder) output t2i_jax computes with it: the training forward (intercepted
    branch) and the merged params the sampler uses."""
    model = runs["root"] / "model"
    pipe = runs["pipe"]
    adapters = jax.device_get(runs["full"]["state"].params)
    x, t, ctx = _unet_inputs()
    ours = np.asarray(lora_lib.apply(pipe.unet, {"params": pipe.params["unet"]}, adapters["unet"], x, t, ctx,
                                     lora_scale=2.0))
    base = np.asarray(pipe.unet.apply({"params": pipe.params["unet"]}, x, t, ctx))
    assert _rel(ours, base) > 1e-3  # the adapters do change the output
    export = runs["root"] / "full" / "export"
    pipe_ref = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                                 requires_safety_checker=False)
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        ref, ref_te, ids = _diffusers_unet(pipe_ref, export / name, x, t, ctx)
        assert _rel(ours, ref) < 1e-5, name
        te = lora_lib.apply(pipe.text_encoder, {"params": pipe.params["text_encoder"]}, adapters["text_encoder"],
                            ids, lora_scale=2.0).last_hidden_state
        assert _rel(np.asarray(te), ref_te) < 1e-5, name
        # Our reader: the file merged into the base params (what --lora and the sampler do).
        merged = lora_convert.merge_loras(pipe.params, [(lora_convert.read_lora(export / name, pipe.params), 1.0)])
        assert _rel(np.asarray(pipe.unet.apply({"params": merged["unet"]}, x, t, ctx)), ref) < 1e-5, name


def test_save_lora_alpha_pattern_and_errors(tmp_path):
    """Layers with different alphas keep them through the diffusers metadata and kohya alphas."""
    rng = np.random.RandomState(0)
    layers = [lora_convert.LoraLayer("unet", m, rng.randn(2, 8).astype(np.float32), rng.randn(8, 2).astype(np.float32),
                                     s) for m, s in (("a.to_q", 0.5), ("a.to_k", 0.5), ("b.to_v", 3.0))]
    params = {"unet": {"a": {"to_q": {"kernel": np.zeros((8, 8))}, "to_k": {"kernel": np.zeros((8, 8))}},
                       "b": {"to_v": {"kernel": np.zeros((8, 8))}}}, "text_encoder": {}}
    for fmt in ("diffusers", "kohya"):
        path = lora_convert.save_lora(tmp_path / f"{fmt}.safetensors", layers, fmt=fmt)
        back = {x.module: x for x in lora_convert.read_lora(path, params)}
        assert {m: back[m].scale for m in back} == {"a.to_q": 0.5, "a.to_k": 0.5, "b.to_v": 3.0}
        np.testing.assert_array_equal(back["b.to_v"].up, layers[2].up)
    with pytest.raises(ValueError, match="format 'peft'"):
        lora_convert.save_lora(tmp_path / "x.safetensors", layers, fmt="peft")


def test_target_errors(runs):
    pipe = runs["pipe"]
    c = _config(runs["root"] / "model")
    c.lora.targets = "to_qq"
    with pytest.raises(ValueError, match="'to_qq' match no Dense or conv layer of the unet"):
        lora_lib.find_targets(pipe.params, c)


def test_locon_on_3x3_convs_matches_merge_and_diffusers(runs, tmp_path):
    """LoRA on the ResNets' 3x3 convs and the stride-2 downsampler (kohya's LoCon): the training
    forward (a k x k conv down to the rank, a 1x1 up) equals the merged kernel, and both exported
    files, loaded by diffusers' load_lora_weights, give the same U-Net output (fp32)."""
    pipe = runs["pipe"]
    c = _config(runs["root"] / "model")
    c.lora.targets = r"resnets\.\d+\.conv[12]|downsamplers|to_k"
    c.lora.text_encoder_targets = ""
    targets = lora_lib.find_targets(pipe.params, c)
    windows = {t.module: t.kernel for t in targets}
    assert windows["down_blocks.0.downsamplers.0.conv"] == (3, 3)
    assert sum(k == (3, 3) for k in windows.values()) >= 5 and (1, 1) in windows.values()
    adapters = lora_lib.init_adapters(jax.random.PRNGKey(1), targets, 4)
    flat = traverse_util.flatten_dict(adapters)
    down = flat[("unet", *next(t.path for t in targets if t.module.endswith("downsamplers.0.conv")), "lora_down")]
    assert down.shape[:2] == (3, 3)
    bound = float(jnp.abs(down).max())
    assert 0.5 / np.sqrt(9 * down.shape[2]) < bound <= 1 / np.sqrt(9 * down.shape[2])  # PEFT's fan-in bound
    r = np.random.RandomState(3)  # lora_up starts at zero: give it values, so that the branch counts
    adapters = traverse_util.unflatten_dict({k: (r.randn(*v.shape).astype(np.float32) * 0.3 if k[-1] == "lora_up"
                                                 else np.asarray(v)) for k, v in flat.items()})
    x, t, ctx = _unet_inputs(1)
    ours = np.asarray(lora_lib.apply(pipe.unet, {"params": pipe.params["unet"]}, adapters["unet"], x, t, ctx,
                                     lora_scale=0.5))
    base = np.asarray(pipe.unet.apply({"params": pipe.params["unet"]}, x, t, ctx))
    assert _rel(ours, base) > 1e-2
    merged = lora_lib.merged_params(pipe.params, adapters, targets, 0.5)
    assert _rel(np.asarray(pipe.unet.apply({"params": merged["unet"]}, x, t, ctx)), ours) < 1e-5
    layers = lora_lib.to_layers(adapters, targets, 0.5)
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(runs["root"] / "model", safety_checker=None,
                                                                 requires_safety_checker=False)
    for fmt in ("diffusers", "kohya"):
        path = lora_convert.save_lora(tmp_path / f"{fmt}.safetensors", layers, fmt=fmt)
        ref, _, _ = _diffusers_unet(ref_pipe, path, x, t, ctx)
        assert _rel(ours, ref) < 1e-5, fmt


# ---------------------------------------------------------------------------
# Memory: the train state's arrays, from shapes alone.

def _state_bytes(config, params_shapes, targets=None):
    tx, _ = ldm.make_optimizer(config, 1000)
    if targets is not None:
        params_shapes = jax.eval_shape(lambda: lora_lib.init_adapters(jax.random.PRNGKey(0), targets,
                                                                      int(config.lora.rank)))
    state = jax.eval_shape(lambda p: state_lib.create_state(p, tx, ema=config.ema_decay > 0, seed=0), params_shapes)
    return lora_lib.state_bytes(state), lora_lib.state_bytes(params_shapes)


def test_train_state_memory_lora_vs_full():
    """SD1.5-size U-Net: LoRA rank 8 (configs/lora_sd15.py) against the full fine-tune
    (configs/sd15_finetune.py: AdamW + EMA), optimizer state included (BENCHMARKS.md)."""
    unet = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.named("sd15"))
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *unet_lib.dummy_inputs(unet.config))["params"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert 859e6 < n_params < 860e6  # SD1.5's 859.5M
    full, full_params = _state_bytes(sd15_finetune.get_config(), shapes)
    lc = lora_sd15.get_config()
    targets = lora_lib.find_targets({"unet": shapes, "text_encoder": {}}, lc)
    assert len(targets) == 16 * 2 * 4  # 16 transformer blocks, 2 attentions, q/k/v/out
    lora, lora_params = _state_bytes(lc, shapes, targets)
    assert full == 4 * full_params + 8 + 8 + 4  # params, mu, nu, EMA (fp32) + step, rng, Adam count
    assert lora_params == 4 * 8 * sum(t.d_in + t.d_out for t in targets)
    assert lora / full < 0.03
    print(f"\nfull fine-tune state {full / 1e9:.2f} GB, LoRA rank 8 state {lora / 1e6:.1f} MB "
          f"({100 * lora / full:.3f}%), adapters {lora_params / 1e6:.2f} MB")


def test_configs():
    for cfg in (lora_shapes.get_config(), lora_sd15.get_config()):
        assert lora_lib.enabled(cfg) and cfg.lora.rank in (4, 8)
    assert lora_lib.scale(lora_sd15.get_config()) == 1.0
    with pytest.raises(ValueError, match="records=N"):
        lora_shapes.get_config("rank=3")


# ---------------------------------------------------------------------------
# A colour the bundled model never saw: the shapes source and the evaluator.

def test_extra_colour_in_source_and_evaluator():
    from t2i_jax.data.shapes import COLORS, EXTRA_COLORS, ShapesSource
    from t2i_jax.eval import adherence

    default, explicit = ShapesSource(32, seed=3), ShapesSource(32, seed=3, colors=list(COLORS))
    for i in range(5):  # naming the default palette draws exactly what the default source does
        np.testing.assert_array_equal(default[i]["image"], explicit[i]["image"])
    teal = ShapesSource(32, split="eval", seed=3, colors=["teal"])
    recs = [teal[i] for i in range(6)]
    assert {r["color"] for r in recs} == {"teal"} and all(r["background"] in COLORS for r in recs)
    assert all((r["image"] == EXTRA_COLORS["teal"]).all(-1).any() for r in recs)
    mixed = ShapesSource(32, seed=0, colors=("teal",) * len(COLORS) + tuple(COLORS))
    share = np.mean([mixed[i]["color"] == "teal" for i in range(400)])
    assert abs(share - 576 / 996) < 0.06  # 8 x 72 teal combinations against the 420 of the train split
    prompts = [r["captions"][0] for r in recs]
    assert adherence.parse_caption(prompts[0]).color == "teal"
    images = [r["image"] for r in recs]
    assert adherence.evaluate(images, prompts, extra_colors=["teal"]).accuracy["all"] == 1.0
    assert adherence.evaluate(images, prompts).accuracy["color"] == 0.0  # the default palette has no teal
    with pytest.raises(ValueError, match="choose from"):
        ShapesSource(32, colors=["cyan"])


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 16's bar is not reached yet: teal 52% (>= 80%), originals -10 points (within 5); "
                   "configs/README.md", strict=False)
def test_lora_learns_a_new_colour_word(tmp_path):
    """configs/lora_shapes.py on the bundled model, after scripts/lora_teal_base.py taught the VAE
    encoder teal (the bundled one encodes teal shapes as green ones): "teal" shapes at >= 80%
    shape-colour adherence, the original prompts within 5 points of the base model (24 prompts
    each, PNDM 25 steps; configs/README.md has the 50-prompt, 50-step figures). At 400 steps it took
    13 min on 2 loaded cores; the config's 1200 steps train ~18 min (the recorded run), ~25 min in all."""
    import time

    t0 = time.time()
    rt = _script("lora_teal_base").build_base(tmp_path / "base", lora_shapes.get_config())
    assert rt["before"] < 0.6 and rt["after"] >= 0.8  # the bundled encoder loses teal; the taught one keeps it
    c = lora_shapes.get_config(f"base={tmp_path / 'base'}")
    c.progress = False
    c.eval.prompts = []
    c.mesh.num_devices = 1
    ldm.train_and_evaluate(c, tmp_path / "run")
    res = _script("lora_colour_eval").run(str(tmp_path / "run" / "export" / "pytorch_lora_weights.safetensors"),
                                          n=24, steps=25)
    acc = {(m, w): r.accuracy for m, d in res.items() for w, r in d.items()}
    print(f"\nencoder round trip {rt}, adherence {acc}, {time.time() - t0:.0f} s")
    assert acc["base", "new"]["color"] < 0.2  # the base model does not know the word
    assert acc["lora", "new"]["color"] >= 0.8
    for key in ("color", "all"):
        assert acc["lora", "original"][key] >= acc["base", "original"][key] - 0.05
    assert time.time() - t0 < 3600  # bounded: fixed steps, one training run
