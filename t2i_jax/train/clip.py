"""CLIP contrastive training: fine-tune a pretrained HF CLIP or train one from scratch.

    python -m t2i_jax.train --config configs/clip_flickr8k.py:/data/flickr8k --workdir runs/clip8k

Loss: symmetric InfoNCE over the *global* batch with CLIP's learned
temperature (`logit_scale`, clamped to [0, log 100] after every update as in
the CLIP paper). Retrieval recall@1/5/10 both ways and the matched-pair cosine
on a held-out split are measured before and after training
(`workdir/eval_before.json`, `eval_after.json`); the result is exported in
transformers format to `workdir/export/`.

Global loss: the batch is one global array split over the ("data", "fsdp")
mesh axes and the step is a `jax.jit` over global arrays, so `text @ image.T`
is the full [B, B] logit matrix of the global batch whatever the device count;
`contrastive_loss` pins both embedding matrices replicated, so XLA all-gathers
them (a few KB per example) and each device computes its own rows of logits
against every other example, as in CLIP's own multi-worker implementation.
With gradient accumulation the negatives are those of each micro-batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import data as data_lib
from t2i_jax import parallel
from t2i_jax.convert import clip as clip_convert
from t2i_jax.convert import hub
from t2i_jax.eval import retrieval
from t2i_jax.models import clip as clip_lib
from t2i_jax.tokenizer import Tokenizer
from t2i_jax.train import config as config_lib
from t2i_jax.train import inputs
from t2i_jax.train import loop as loop_lib
from t2i_jax.train import state as state_lib
from t2i_jax.train import workdir as workdir_lib
from t2i_jax.train.metrics import MetricWriter

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)
# OpenAI CLIP's pixel statistics; the data pipeline gives [-1, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# FSDP for every tensor above the size threshold; the rest replicated.
PARTITION_RULES = ((r"logit_scale", P()), (r".*", "fsdp"))


# ===========================================================================
# Config
# ===========================================================================

def default_config() -> ml_collections.ConfigDict:
    """Every key this trainer reads, with defaults; a config file changes what it needs."""
    c = config_lib.base_config()  # seed, data, batch_size, train, optim, ema_decay, mesh, export, progress
    c.objective = "clip"  # picks t2i_jax.train.clip

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # transformers CLIP folder or hub id; "" trains from scratch
    c.model.name = "tiny"  # from scratch: a clip.named_config variant ...
    c.model.overrides = ml_collections.ConfigDict()  # ... with these transformers CLIPConfig fields merged in
    c.model.dtype = "float32"  # compute dtype: "bfloat16" on accelerators; params stay fp32
    c.model.remat = False  # recompute each layer in the backward pass (less memory)
    c.model.attention_impl = ""  # "" (XLA), "cudnn", or "auto" (cuDNN where it applies)
    c.optim.b2 = 0.98  # CLIP's value

    c.eval = ml_collections.ConfigDict()
    c.eval.enabled = True  # before and after training
    c.eval.data = ml_collections.ConfigDict()  # a separate eval source (data config), or empty ...
    c.eval.holdout_tail = 0  # ... or: hold out the last N records of the training source
    c.eval.num_images = 1000
    c.eval.batch_size = 256
    c.eval.use_ema = False  # evaluate and export the EMA params (needs ema_decay > 0)
    return c


# ===========================================================================
# Data
# ===========================================================================

class _Slice:
    """Records [start, stop) of a random-access source (a held-out tail), with a stable repr for grain."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        return self.source[self.start + int(i)]

    def __repr__(self):
        return f"{self.source!r}[{self.start}:{self.stop}]"


def make_data(config, tokenizer):
    """(train loader, eval source) from `config.data` and `config.eval`."""
    # "" marks an unset string field (config_flags cannot override a None); the data config
    # then reports a missing path by name.
    dcfg = {k: v for k, v in config.data.to_dict().items() if v != ""}
    dcfg["global_batch_size"] = config.batch_size
    source = data_lib.source_from_config(dcfg)
    eval_source = None
    tail = int(config.eval.holdout_tail)
    if tail:
        if tail >= len(source):
            raise ValueError(f"eval.holdout_tail {tail} leaves nothing of the {len(source)} records to train on")
        source, eval_source = _Slice(source, 0, len(source) - tail), _Slice(source, len(source) - tail, len(source))
    elif config.eval.data:
        ecfg = {"resolution": dcfg["resolution"], **config.eval.data.to_dict()}
        eval_source = data_lib.source_from_config(ecfg)
    loader = data_lib.make_loader(source, global_batch_size=config.batch_size, resolution=dcfg["resolution"],
                                  tokenizer=tokenizer, **inputs.loader_kwargs(dcfg))
    return loader, eval_source


# ===========================================================================
# Model
# ===========================================================================

def make_model(config, *, load_weights: bool = True):
    """(module, host params or None): `model.init_from` (HF folder / hub id), else the named variant
    `model.name` with `model.overrides` (transformers CLIPConfig fields) merged in, from scratch.
    `load_weights=False` (resuming) reads only the pretrained model's config.json."""
    m = config.model
    kw = dict(dtype=jnp.dtype(m.dtype), attention_impl=m.attention_impl or None, remat=m.remat)
    if m.init_from and load_weights:
        return clip_convert.load_clip(m.init_from, **kw)
    if m.init_from:
        folder = hub.resolve(m.init_from, allow_patterns=["config.json"])
        return clip_convert.build_module(json.loads((folder / "config.json").read_text()), **kw), None
    hf = config_lib.merge_dicts(clip_lib.named_config(m.name).to_hf(), m.overrides.to_dict())
    return clip_lib.CLIPModel(clip_lib.CLIPConfig.from_hf(hf), **kw), None


def make_tokenizer(config, model) -> Tokenizer:
    """The model folder's own tokenizer if it has one, else the bundled OpenAI CLIP BPE."""
    max_len = model.config.text.max_position_embeddings
    folder = config.model.init_from
    if folder and os.path.isdir(folder) and any(
            os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        return Tokenizer.from_pretrained(folder, max_length=max_len)
    return Tokenizer.bundled(max_length=max_len)


def _pixels(images):
    """[-1, 1] NHWC -> CLIP-normalised pixel values."""
    mean, std = jnp.asarray(CLIP_MEAN), jnp.asarray(CLIP_STD)
    return ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std


def embed(model, params, input_ids, images):
    """L2-normalised fp32 (text, image) embeddings [B, P]."""
    def f(m, ids, px):
        return m.get_text_features(ids), m.get_image_features(px)
    t, v = model.apply({"params": params}, input_ids, _pixels(images), method=f)
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(t.astype(jnp.float32)), norm(v.astype(jnp.float32))


def contrastive_loss(text, image, logit_scale, mesh=None):
    """Symmetric InfoNCE over the whole batch; returns (loss, accuracy).

    text, image: normalised [B, P], row i of each a matching pair. With a mesh,
    the gathered ("all") copies are pinned replicated: the explicit all-gather.
    """
    all_text, all_image = text, image
    if mesh is not None:
        all_text = jax.lax.with_sharding_constraint(text, NamedSharding(mesh, P()))
        all_image = jax.lax.with_sharding_constraint(image, NamedSharding(mesh, P()))
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
    logits_per_text = scale * text @ all_image.T  # [B, B]
    logits_per_image = scale * image @ all_text.T
    labels = jnp.arange(text.shape[0])
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits_per_text, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits_per_image, labels).mean()) / 2
    accuracy = ((jnp.argmax(logits_per_text, -1) == labels).mean() + (jnp.argmax(logits_per_image, -1) == labels)
                .mean()) / 2
    return loss, accuracy


# ===========================================================================
# Step (the shared tail is t2i_jax.train.loop)
# ===========================================================================

def make_objective(model, mesh) -> loop_lib.Objective:
    """CLIP's contrastive loss over each (micro-)batch; the temperature clamped after every update."""

    def loss_fn(params, frozen, batch, step):
        del frozen, step
        text, image = embed(model, params, batch["input_ids"], batch["image"])
        loss, acc = contrastive_loss(text, image, params["logit_scale"], mesh)
        return loss, {"accuracy": acc, "temperature": 1.0 / jnp.exp(params["logit_scale"].astype(jnp.float32))}

    def post_update(params):
        return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, MAX_LOGIT_SCALE)}

    return loop_lib.Objective("clip", loss_fn, ("image", "input_ids"), post_update=post_update)


# ===========================================================================
# Checkpoint (see train/checkpoint.py); export
# ===========================================================================

def export(model, params, tokenizer, out_dir: Path) -> None:
    """transformers folder: config.json + model.safetensors, tokenizer, preprocessor_config.json."""
    clip_convert.save_clip(params, model, out_dir)
    tokenizer.save_pretrained(out_dir)
    r = model.config.vision.image_size
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": r},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": r, "width": r}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True}, indent=2) + "\n")


# ===========================================================================
# Eval
# ===========================================================================

def make_evaluator(model, mesh, param_shardings, eval_set, batch_size: int):
    """`params -> retrieval metrics dict` over `eval_set` (see t2i_jax.eval.retrieval)."""
    batch_sh, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def texts(params, ids):
        return model.apply({"params": params}, ids, method=clip_lib.CLIPModel.get_text_features)

    def images(params, img):
        return model.apply({"params": params}, _pixels(img), method=clip_lib.CLIPModel.get_image_features)

    text_fn = jax.jit(texts, in_shardings=(param_shardings, batch_sh), out_shardings=rep)
    image_fn = jax.jit(images, in_shardings=(param_shardings, batch_sh), out_shardings=rep)

    def run(fn, params, x):
        return np.asarray(loop_lib.eval_in_batches(fn, params, [x], batch_size, mesh), np.float32)

    relevant = retrieval.relevance_from_captions(eval_set["captions"], eval_set["text_to_image"],
                                                 len(eval_set["image"]))

    def evaluate(params):
        t = run(text_fn, params, eval_set["input_ids"])
        v = run(image_fn, params, eval_set["image"])
        return retrieval.retrieval_metrics(t, v, eval_set["text_to_image"], relevant=relevant)

    return evaluate


# ===========================================================================
# Loop
# ===========================================================================

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains CLIP per `config` in `workdir` (resuming from its latest checkpoint), evaluates, exports.

    Returns {"step", "stopped" (None | "signal" | "preempt_at_step"), "eval_before",
    "eval_after", "state"}. Raises FloatingPointError on a non-finite loss or grad norm.
    """
    workdir, is_main, ckpt, start = workdir_lib.open_run(config, workdir)

    # --- model, data -------------------------------------------------------
    model, host_params = make_model(config, load_weights=start is None)
    tokenizer = make_tokenizer(config, model)
    res = model.config.vision.image_size
    if config.data.resolution != res:
        raise ValueError(f"data.resolution {config.data.resolution} differs from the model's image_size {res}; "
                         f"set --config.data.resolution={res}")
    loader, eval_source = make_data(config, tokenizer)
    total_steps = int(config.train.steps)
    if total_steps <= 0:
        total_steps = math.ceil(config.train.epochs * len(loader.source) / config.batch_size)
    ocfg = ml_collections.ConfigDict({**config.optim.to_dict(), "total_steps": total_steps})
    tx, schedule = state_lib.make_optimizer(ocfg)

    # --- sharding ----------------------------------------------------------
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, num_devices=config.mesh.num_devices)
    if config.batch_size % mesh.devices.size or (config.batch_size // config.train.grad_accum) % mesh.devices.size:
        raise ValueError(f"batch_size {config.batch_size} / grad_accum {config.train.grad_accum} must be a multiple "
                         f"of the {mesh.devices.size} devices")
    ema = config.ema_decay > 0
    init = lambda params: state_lib.create_state(params, tx, ema=ema, seed=config.seed)  # noqa: E731
    abstract_params = clip_convert.expected_shapes(model)
    abstract_state = jax.eval_shape(init, abstract_params)
    shardings = state_lib.state_shardings(abstract_state, PARTITION_RULES, mesh, config.mesh.fsdp_min_size)
    param_shardings = shardings.params

    # --- checkpoint: resume or start -------------------------------------------
    it = iter(loader)

    def fresh():
        if host_params is None:
            dummy = clip_lib.dummy_inputs(model)
            return jax.jit(lambda k: init(model.init(k, *dummy)["params"]), out_shardings=shardings)(
                jax.random.PRNGKey(config.seed))
        return jax.jit(init, in_shardings=(param_shardings,), out_shardings=shardings, donate_argnums=(0,))(
            jax.device_put(host_params, param_shardings))

    state, start = loop_lib.init_or_resume(ckpt, start, fresh, abstract_state, shardings, it)
    host_params = None  # the state owns the params now

    # --- eval before -------------------------------------------------------
    evaluate, results = None, {}
    if config.eval.enabled and eval_source is not None:
        eval_set = inputs.make_eval_set(eval_source, config.eval.num_images, res, tokenizer)
        evaluate = make_evaluator(model, mesh, param_shardings, eval_set, config.eval.batch_size)
        before_path = workdir / "eval_before.json"
        if start == 0:  # the same decision on every host: evaluate is a collective
            results["before"] = evaluate(state.params)
            if is_main:
                before_path.write_text(json.dumps(results["before"], indent=2) + "\n")
        elif before_path.exists():  # resumed: measured by the first run
            results["before"] = json.loads(before_path.read_text())

    # --- loop --------------------------------------------------------------
    writer = MetricWriter(workdir, enabled=is_main, start=start)
    try:
        state, stopped, _ = loop_lib.fit(
            make_objective(model, mesh), config, tx=tx, schedule=schedule, mesh=mesh, ckpt=ckpt, writer=writer,
            is_main=is_main, state=state, state_shardings=shardings, frozen={}, frozen_shardings={}, data_iter=it,
            start=start, total_steps=total_steps, skipped=loader.skipped_count)
    finally:
        writer.close()
        ckpt.close()
    final_step = int(jax.device_get(state.step))

    # --- eval after, export ----------------------------------------------------
    if stopped is None:
        params = state.ema_params if (ema and config.eval.use_ema) else state.params
        if evaluate is not None:
            results["after"] = evaluate(params)
            if is_main:
                (workdir / "eval_after.json").write_text(json.dumps(results["after"], indent=2) + "\n")
                print(f"CLIP retrieval on {results['after']['num_images']} held-out images "
                      f"({results['after']['num_texts']} captions), %:\n" + retrieval.format_table(results))
        if config.export:
            host = parallel.to_host(params)
            if is_main:
                export(model, host, tokenizer, workdir / "export")
    return {"step": final_step, "stopped": stopped, "eval_before": results.get("before"),
            "eval_after": results.get("after"), "state": state}
