"""layers.dot_product_attention's implementation choice: "auto" takes cuDNN
flash attention exactly where jax's cuDNN path accepts the call, XLA
elsewhere, and gives XLA's numbers wherever it picks XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_jax.models import layers
from t2i_jax.models import unet as unet_lib


@pytest.mark.parametrize("head_dim,dtype,platform,cc,masked,ok", [
    # SD1.5's head sizes 40/80/160 on an H100 (compute capability 9.0): all cuDNN.
    (40, jnp.bfloat16, "gpu", "9.0", False, True),
    (160, jnp.bfloat16, "gpu", "9.0", False, True),
    (256, jnp.float16, "gpu", "10.0", False, True),
    # Before Hopper the limit is 128: an A100 runs SD1.5's 160 on XLA.
    (160, jnp.bfloat16, "gpu", "8.0", False, False),
    (128, jnp.bfloat16, "gpu", "8.0", False, True),
    (264, jnp.bfloat16, "gpu", "9.0", False, False),
    (36, jnp.bfloat16, "gpu", "9.0", False, False),  # not a multiple of 8
    (64, jnp.float32, "gpu", "9.0", False, False),  # cuDNN flash attention is bf16/fp16 only
    (64, jnp.bfloat16, "gpu", "9.0", True, False),  # explicit masks stay on XLA
    (64, jnp.bfloat16, "gpu", None, False, False),  # a GPU without a CUDA compute capability (ROCm)
    (64, jnp.bfloat16, "cpu", None, False, False),
    (64, jnp.bfloat16, "tpu", None, False, False),
])
def test_cudnn_support_rules(head_dim, dtype, platform, cc, masked, ok):
    why = layers.cudnn_attention_unsupported(head_dim, dtype, platform=platform, compute_capability=cc,
                                             masked=masked)
    assert (why is None) == ok, why
    if not ok:
        assert isinstance(why, str) and why


def test_resolve_on_this_machine():
    assert jax.devices()[0].platform == "cpu"
    for impl in (None, "xla", "auto"):
        assert layers.resolve_attention_impl(impl, 64, jnp.bfloat16) is None
    assert layers.resolve_attention_impl("cudnn", 64, jnp.bfloat16) == "cudnn"
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs bf16 or fp16 compute, got float32"):
        layers.resolve_attention_impl("cudnn", 64, jnp.float32)
    with pytest.raises(ValueError, match=r"attention_impl 'flash' is not one of None, 'xla', 'cudnn', 'auto'"):
        layers.resolve_attention_impl("flash", 64, jnp.float32)


# slow (22 s): on a CPU 'auto' resolves to XLA, which test_resolve_on_this_machine above asserts fast;
# this runs it through a U-Net.
@pytest.mark.slow
def test_auto_gives_xla_numbers_where_it_picks_xla():
    cfg = unet_lib.UNetConfig.named("tiny")
    x, t, ctx = unet_lib.dummy_inputs(cfg, batch=2)
    x = jax.random.normal(jax.random.key(1), x.shape)
    ctx = jax.random.normal(jax.random.key(2), ctx.shape)
    ref = unet_lib.UNet2DConditionModel(cfg)
    params = jax.jit(ref.init)(jax.random.key(0), x, t, ctx)["params"]
    auto = unet_lib.UNet2DConditionModel(cfg, attention_impl="auto")
    # Jitted: op by op the two forwards took ~40 s of the fast suite.
    np.testing.assert_array_equal(np.asarray(jax.jit(auto.apply)({"params": params}, x, t, ctx)),
                                  np.asarray(jax.jit(ref.apply)({"params": params}, x, t, ctx)))


# --------------------------------------------------------------------------
# "chunked": the XLA path over query chunks, each recomputed in the backward
# --------------------------------------------------------------------------


def _qkv(t, s, heads=2, head_dim=8, batch=2, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (batch, t, heads * head_dim)), jax.random.normal(kk, (batch, s, heads * head_dim)),
            jax.random.normal(kv, (batch, s, heads * head_dim)))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("t,s,chunk,kw", [
    (50, 50, 16, {}),  # 4 chunks, the last one padded
    (48, 77, 16, {}),  # cross-attention: 48 queries, 77 keys
    (50, 50, 7, {"is_causal": True}),  # the causal mask follows each chunk's offset
    (50, 50, 16, {"upcast": True, "scale": 0.3}),
    (50, 50, 16, {"mask": "per-query"}),
    (50, 50, 16, {"mask": "per-key"}),
])
def test_chunked_matches_xla_forward_and_gradient(t, s, chunk, kw):
    q, k, v = _qkv(t, s)
    kw = dict(kw)
    if kw.get("mask") == "per-query":
        kw["mask"] = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 1, t, s)).at[..., 0].set(True)
    elif kw.get("mask") == "per-key":
        kw["mask"] = jnp.ones((s,), bool).at[3:9].set(False)

    def loss(impl, q, k, v):
        out = layers.dot_product_attention(q, k, v, 2, impl=impl, **kw)
        return jnp.sum(jnp.sin(out)), out  # a non-linear read-out: every output element has its own cotangent

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (gx, ox), (gc, oc) = grad(None, q, k, v), grad(f"chunked:{chunk}", q, k, v)
    assert oc.shape == ox.shape == (2, t, 16)
    assert _rel(oc, ox) < 1e-6
    for a, b in zip(gc, gx):
        assert _rel(a, b) < 1e-6


def test_chunked_query_size_and_its_errors():
    assert layers.query_chunk_size("chunked") == layers.DEFAULT_QUERY_CHUNK == 1024
    assert layers.query_chunk_size("chunked:256") == 256
    assert [layers.query_chunk_size(x) for x in (None, "xla", "cudnn", "auto")] == [None] * 4
    for bad in ("chunked:0", "chunked:", "chunked:big"):
        with pytest.raises(ValueError, match=r"the query chunk after 'chunked:' must be a positive integer"):
            layers.query_chunk_size(bad)
    # resolve_attention_impl keeps its own set of values; chunked attention is decided before it.
    with pytest.raises(ValueError, match=r"attention_impl 'chunked' is not one of"):
        layers.resolve_attention_impl("chunked", 64, jnp.float32)


def test_unet_attention_impl_reaches_every_attention():
    # Traced, not compiled: the tiny U-Net attends at its 16x16 latent level (256 queries) and in its
    # 8x8 mid block (64), so "chunked:64" runs each self- and cross-attention of the 16x16 level in
    # 4 chunks, the mid block's whole, and XLA's none in chunks.
    cfg = unet_lib.UNetConfig.named("tiny")
    _, t, ctx = unet_lib.dummy_inputs(cfg, batch=2)
    x = jnp.zeros((2, 16, 16, cfg.in_channels))
    ref = unet_lib.UNet2DConditionModel(cfg)
    params = jax.eval_shape(ref.init, jax.random.key(0), x, t, ctx)["params"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    attentions = sum(1 for p in paths if "to_q" in p and "mid_block" not in p)
    def scans(impl):
        module = unet_lib.UNet2DConditionModel(cfg, attention_impl=impl)
        jaxpr = jax.make_jaxpr(module.apply)({"params": params}, x, t, ctx)
        return [e.params["length"] for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "scan"]
    assert attentions >= 4 and scans(None) == []
    assert scans("chunked:64") == [4] * attentions
    assert scans("chunked") == []  # 256 queries fit one default chunk of 1024: the plain XLA path


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)
