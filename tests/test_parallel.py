"""Mesh, partition rules, batch sharding, distributed initialisation and gradient accumulation on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import parallel
from t2i_jax.models import clip
from t2i_jax.train import state as state_lib


def test_make_mesh():
    assert jax.device_count() == 8
    m = parallel.make_mesh(data=-1, fsdp=4)
    assert m.axis_names == ("data", "fsdp") and dict(m.shape) == {"data": 2, "fsdp": 4}
    assert dict(parallel.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8}
    one = parallel.make_mesh(devices=jax.devices()[:1])
    assert one.devices.size == 1
    with pytest.raises(ValueError, match="does not cover the 8 devices"):
        parallel.make_mesh(data=3, fsdp=2)
    assert parallel.make_mesh(num_devices=3).devices.size == 3  # the trainers' mesh.num_devices
    with pytest.raises(ValueError, match="num_devices=9: there are 8 devices"):
        parallel.make_mesh(num_devices=9)
    with pytest.raises(TypeError, match=r"make_mesh\(devices=\[...\]\)"):
        parallel.make_mesh(jax.devices()[:2])  # the old pipeline.make_mesh(devices) call


def test_sampler_uses_the_training_mesh_and_splits_over_both_axes():
    from t2i_jax import pipeline

    assert pipeline.make_mesh is parallel.make_mesh  # one function, one convention
    mesh = parallel.make_mesh(data=2, fsdp=4)
    x = jax.device_put(np.arange(16.0).reshape(8, 2), pipeline._batch_sharding(mesh))
    assert sorted(s.index[0].start for s in x.addressable_shards) == list(range(8))  # a row per device
    y = jax.jit(lambda a: pipeline._shard_batch_axis(2 * a, mesh, 1))(jnp.zeros((3, 8)))
    assert {s.data.shape for s in y.addressable_shards} == {(3, 1)}  # split along axis 1 over all 8


def test_fsdp_spec():
    assert parallel.fsdp_spec((768, 3072), 8) == P(None, "fsdp")  # largest divisible dim
    assert parallel.fsdp_spec((3072, 768), 8) == P("fsdp", None)
    assert parallel.fsdp_spec((1001, 50), 8) == P()  # big, but no dim divisible by 8: replicated
    assert parallel.fsdp_spec((1000, 51), 8) == P("fsdp", None)  # the largest divisible one
    assert parallel.fsdp_spec((768,), 8) == P()  # below the size threshold
    assert parallel.fsdp_spec((768, 3072), 1) == P()  # no fsdp axis


def test_clip_partition_rules_under_fsdp8():
    mesh = parallel.make_mesh(data=1, fsdp=8)
    model = clip.CLIPModel(clip.named_config("vit-b-32"))
    shapes = jax.eval_shape(model.init, jax.random.key(0), *clip.dummy_inputs(model))["params"]
    rules = ((r"logit_scale", P()), (r".*", "fsdp"))
    sh = parallel.tree_shardings(shapes, rules, mesh)
    def spec_in(tree, path):
        for k in path:
            tree = tree[k]
        return tree.spec

    enc = ("text_model", "encoder", "layers_0")
    assert spec_in(sh, ("text_model", "embeddings", "token_embedding", "embedding")) == P("fsdp", None)  # 49408 x 512
    assert spec_in(sh, enc + ("mlp", "fc1", "kernel")) == P(None, "fsdp")  # 512 x 2048
    assert spec_in(sh, enc + ("self_attn", "q_proj", "kernel")) == P("fsdp", None)  # 512 x 512, tie: first
    assert spec_in(sh, ("vision_model", "embeddings", "patch_embedding", "kernel")) == P(None, None, None, "fsdp")
    assert spec_in(sh, ("visual_projection", "kernel")) == P("fsdp", None)  # 768 x 512
    # Small tensors stay replicated.
    assert spec_in(sh, enc + ("layer_norm1", "scale")) == P()
    assert spec_in(sh, enc + ("mlp", "fc1", "bias")) == P()
    assert spec_in(sh, ("vision_model", "embeddings", "class_embedding")) == P()
    assert sh["logit_scale"].spec == P()
    leaves = jax.tree_util.tree_leaves(sh)
    sharded = sum(int(np.prod(s.shape)) for s, x in zip(jax.tree_util.tree_leaves(shapes), leaves)
                  if x.spec != P())
    total = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert sharded / total > 0.99  # the big matrices are nearly all of CLIP

    # The same rules shard a whole train state: Adam moments like their params.
    tx, _ = state_lib.make_optimizer(_optim())
    abstract = jax.eval_shape(lambda p: state_lib.create_state(p, tx, ema=True, seed=0), shapes)
    st = state_lib.state_shardings(abstract, rules, mesh, 2**14)
    fc1 = lambda t: t["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].spec  # noqa: E731
    assert fc1(st.opt_state[1][0].mu) == fc1(st.opt_state[1][0].nu) == fc1(st.ema_params) == P(None, "fsdp")
    assert st.step.spec == P() and st.opt_state[1][0].count.spec == P()


def _optim(**kw):
    import ml_collections
    base = dict(lr=1e-3, warmup_steps=2, end_lr_factor=0.0, total_steps=10, b1=0.9, b2=0.98, eps=1e-6,
                weight_decay=0.1, grad_clip=1.0)
    return ml_collections.ConfigDict({**base, **kw})


def test_rule_with_explicit_spec_and_bad_rank():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    tree = {"a": {"kernel": jnp.zeros((8, 4))}, "b": jnp.zeros((3,))}
    specs = parallel.partition_specs(tree, [(r"a/kernel$", P("data", "fsdp"))], mesh)
    assert specs == {"a": {"kernel": P("data", "fsdp")}, "b": P()}
    with pytest.raises(ValueError, match="gives"):
        parallel.partition_specs(tree, [(r"b", P("data", "fsdp"))], mesh)


def test_host_to_global_splits_batch_over_all_devices():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = parallel.host_to_global({"x": x}, mesh)["x"]
    assert g.sharding == NamedSharding(mesh, P(("data", "fsdp")))
    np.testing.assert_array_equal(np.asarray(g), x)
    shards = sorted(g.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape for s in shards] == [(2, 3)] * 8
    np.testing.assert_array_equal(np.asarray(shards[3].data), x[6:8])
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        parallel.host_to_global({"x": x[:12]}, mesh)


def test_initialize_distributed_single_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                "SLURM_NPROCS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed("auto") is False
    assert parallel.initialize_distributed("off") is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # single-host TPU VM: still one process
    assert parallel.initialize_distributed("auto") is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert parallel._looks_multi_process() == "SLURM job with 4 tasks"
    with pytest.raises(ValueError, match="distributed mode"):
        parallel.initialize_distributed("sometimes")


def test_accumulated_gradients_equal_full_batch_on_8_devices():
    """For a per-example loss, the mean over 4 micro-batches is the full-batch gradient."""
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    batch = {"x": rng.normal(size=(32, 5)).astype(np.float32), "y": rng.normal(size=(32, 3)).astype(np.float32)}

    def grad_fn(p, b):
        def loss(p):
            err = b["x"] @ p["w"] - b["y"]
            return jnp.mean(err**2), {"abs": jnp.mean(jnp.abs(err))}
        return jax.value_and_grad(loss, has_aux=True)(p)

    micro = NamedSharding(mesh, P(None, ("data", "fsdp")))
    acc = jax.jit(lambda p, b: state_lib.accumulate_gradients(grad_fn, p, b, 4, micro))
    full = jax.jit(lambda p, b: grad_fn(p, b))
    gb = parallel.host_to_global(batch, mesh)
    (l4, a4), g4 = acc(params, gb)
    (l1, a1), g1 = full(params, gb)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    np.testing.assert_allclose(a4["abs"], a1["abs"], rtol=1e-5)
    np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-5)


def test_schedule_warmup_and_cosine():
    sched = state_lib.make_schedule(_optim(end_lr_factor=0.1))
    np.testing.assert_allclose([sched(0), sched(1), sched(2), sched(10)], [0.0, 5e-4, 1e-3, 1e-4], rtol=1e-6)
    mid = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * 4 / 8))  # step 6: 4 of 8 decay steps
    np.testing.assert_allclose(sched(6), mid, rtol=1e-6)


def test_ema_update():
    ema = {"w": jnp.ones(3)}
    out = state_lib.ema_update(ema, {"w": jnp.zeros(3)}, 0.9)
    np.testing.assert_allclose(out["w"], 0.9)
