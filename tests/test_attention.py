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
