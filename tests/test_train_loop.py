"""The one train loop (t2i_jax.train.loop): no host sync on the step path, the non-finite guard,
EMA warm-up, gradient accumulation, the prefetcher's checkpoint state, the latent cache's skips."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax._src.array import ArrayImpl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import clip_shapes, shapes_ldm, shapes_vae  # noqa: E402
from t2i_jax import data as data_lib  # noqa: E402
from t2i_jax import parallel  # noqa: E402
from t2i_jax.train import clip as clip_train  # noqa: E402
from t2i_jax.train import ldm  # noqa: E402
from t2i_jax.train import loop as loop_lib  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train import state as state_lib  # noqa: E402
from t2i_jax.train import vae as vae_train  # noqa: E402
from t2i_jax.train.checkpoint import Checkpointer  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


# ---------------------------------------------------------------------------
# (a) No device array reaches the host between log steps.
# ---------------------------------------------------------------------------

class HostReads:
    """Counts every way a jax Array reaches the host: jax.device_get and the Array's own
    conversions (float/int/bool/index, __array__ (np.asarray), item, tolist). jax.transfer_guard
    does not fire on CPU, where device memory is host memory, so the calls are counted instead."""

    METHODS = ("__float__", "__int__", "__bool__", "__index__", "__array__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.count = 0
        self._inside = 0  # one device_get of a whole pytree counts once, not once per leaf
        real_get = jax.device_get

        def device_get(x):
            self.count += self._inside == 0
            self._inside += 1
            try:
                return real_get(x)
            finally:
                self._inside -= 1

        monkeypatch.setattr(jax, "device_get", device_get)
        for name in self.METHODS:
            real = getattr(ArrayImpl, name)

            def counted(arr, *a, _real=real, **k):
                self.count += self._inside == 0
                return _real(arr, *a, **k)

            monkeypatch.setattr(ArrayImpl, name, counted)


def _quiet(c, steps):
    c.train.steps = steps
    c.train.log_every = 10**6  # only the last step logs
    c.train.checkpoint_every = 10**6
    c.progress = False
    c.export = False
    c.mesh.num_devices = 1
    return c


def _clip(steps):
    c = _quiet(clip_shapes.get_config(), steps)
    c.batch_size = 16
    c.eval.enabled = False
    return clip_train, c


def _vae(steps):
    c = _quiet(shapes_vae.get_config(), steps)
    c.data.resolution = 16
    c.batch_size = 8
    c.eval.enabled = False
    return vae_train, c


def _ldm(steps):
    c = _quiet(shapes_ldm.get_config(), steps)
    c.data.resolution = 16
    c.data.length = 32
    c.batch_size = 8
    c.eval.prompts = []
    return ldm, c


PLANTED = [0, 5, 17]  # records of the LDM run's 32 whose image bytes are garbage


# The LDM (~64 s) and VAE (~40 s) cases are behind --slow; the same loop code is asserted fast for CLIP.
@pytest.mark.parametrize("make", [_clip, pytest.param(_vae, marks=pytest.mark.slow),
                                  pytest.param(_ldm, marks=pytest.mark.slow)], ids=["clip", "vae", "ldm"])
def test_no_host_reads_between_log_steps(make, tmp_path, monkeypatch):
    counts = []
    # Both runs are configured for 6 steps (the lr schedule, a constant of the step's program, is
    # then the same, and the second run's step comes from the compilation cache); the first stops
    # after 3 as a preemption would.
    for steps in (3, 6):
        module, c = make(6)
        c.train.preempt_at_step = 3 if steps == 3 else 0
        if module is ldm:  # the latent cache skips and counts bad images (and the loop logs the count)
            real = ldm.make_source
            monkeypatch.setattr(ldm, "make_source", lambda config, real=real: (_Planted(real(config)[0], PLANTED),
                                                                               real(config)[1]))
        reads = HostReads(monkeypatch)
        r = module.train_and_evaluate(c, tmp_path / str(steps))
        assert r["step"] == steps
        counts.append(reads.count)
        monkeypatch.undo()
        if module is ldm:
            assert r["skipped_images"] == len(PLANTED)
            if steps == 6:  # the run that reached its (log) step
                assert metrics_lib.read_jsonl(tmp_path / "6" / "metrics.jsonl")[-1]["skipped_images"] == 3
    # The same number of host reads for 3 and 6 steps: none per step (the old loops made ~6).
    assert counts[0] == counts[1], counts
    assert counts[0] > 0  # the counter works: the last step's log and checkpoint read the device


# ---------------------------------------------------------------------------
# The step: guard, EMA warm-up, accumulation (a toy objective).
# ---------------------------------------------------------------------------

def _toy(config, mesh, tx):
    """Least squares w -> mean((x w - y)^2) over the batch."""

    def loss_fn(params, frozen, batch, step):
        del frozen, step
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.mean(err ** 2), {}

    obj = loop_lib.Objective("toy", loss_fn, ("x", "y"))
    abstract = jax.eval_shape(lambda: state_lib.create_state({"w": jnp.zeros(4)}, tx, ema=config.ema_decay > 0,
                                                             seed=0))
    shardings = state_lib.state_shardings(abstract, parallel.DEFAULT_RULES, mesh, 2**14)
    step = loop_lib.make_train_step(obj, tx, lambda s: 0.1, config, mesh, shardings, {})
    state = jax.jit(lambda: state_lib.create_state({"w": jnp.zeros(4)}, tx, ema=config.ema_decay > 0, seed=0),
                    out_shardings=shardings)()
    return step, state


def _toy_config(**kw):
    c = ml_collections.ConfigDict({"train": {"grad_accum": 1}, "ema_decay": 0.0, "ema_warmup": True})
    c.update(kw)
    return c


def _toy_batches(n, bad=None):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        y = (x @ np.arange(1.0, 5.0) + rng.normal(size=8) * 0.1).astype(np.float32)
        if bad is not None and i + 1 == bad:
            y[0] = np.nan
        out.append({"x": x, "y": y})
    return out


def test_ema_warmup_matches_direct_computation():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    decay = 0.999
    step, state = _toy(_toy_config(ema_decay=decay), mesh, optax.sgd(0.1))
    acc = loop_lib.new_train_accumulator(step, state, {}, _toy_batches(1)[0], mesh)
    ema = None
    for t, b in enumerate(_toy_batches(30), start=1):
        state, acc = step(state, acc, {}, parallel.host_to_global(b, mesh))
        w = np.asarray(state.params["w"], np.float64)
        d = 0.0 if t == 1 else min(decay, t / (9.0 + t))  # diffusers EMAModel: (1 + s) / (10 + s), s = t - 1
        ema = w.copy() if ema is None else d * ema + (1 - d) * w
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-6, atol=1e-7)
    # Without warm-up, 30 steps at 0.999 leave ~97% of the zero init in the EMA; with it, none.
    assert np.linalg.norm(ema - w) < 0.5 * np.linalg.norm(w)


def test_guard_skips_the_bad_step_and_every_one_after():
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    step, state = _toy(_toy_config(), mesh, optax.sgd(0.1))
    batches = _toy_batches(6, bad=4)
    acc = loop_lib.new_train_accumulator(step, state, {}, batches[0], mesh)
    seen = []
    for b in batches:
        state, acc = step(state, acc, {}, parallel.host_to_global(b, mesh))
        seen.append(np.asarray(state.params["w"]).copy())
    host = loop_lib.read_accumulator(acc)
    assert host["first_bad"] == 4 and np.isnan(host["bad"]["loss"])
    assert int(state.step) == 3  # updates 4, 5, 6 were not applied
    np.testing.assert_array_equal(seen[5], seen[2])
    assert np.all(np.isfinite(seen[5])) and not np.array_equal(seen[2], seen[1])


@pytest.mark.slow  # 44 s on 2 cores (two VAE + discriminator steps compiled); CLIP's accumulation runs fast
def test_grad_accum_two_halves_equal_one_batch():
    """The VAE objective (with its discriminator) over 2 micro-batches of 8 equals one batch of 16."""
    c = shapes_vae.get_config()
    c.data.resolution = 16
    c.disc.enabled = True
    c.disc.start = 0
    vae = vae_train.make_vae(c)
    disc = vae_train.PatchDiscriminator(c.disc.channels, c.disc.layers)
    mesh = parallel.make_mesh(devices=jax.devices()[:2])  # each device holds rows of both micro-batches
    tx, schedule = vae_train.make_optimizer(c, 10)
    init = lambda k: state_lib.create_state(vae_train.init_params(vae, disc, c, k), tx, ema=False, seed=0)  # noqa
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(abstract, parallel.DEFAULT_RULES, mesh, 2**14)
    images = np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
    out = []
    for accum in (1, 2):
        c.train.grad_accum = accum
        step = loop_lib.make_train_step(vae_train.make_objective(vae, disc, c), tx, schedule, c, mesh, shardings, {})
        state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(1))
        batch = parallel.host_to_global({"image": images}, mesh)
        acc = loop_lib.new_train_accumulator(step, state, {}, batch, mesh)
        state, acc = step(state, acc, {}, batch)
        out.append((jax.device_get(state.params), loop_lib.read_accumulator(acc)["means"]))
    (p1, m1), (p2, m2) = out
    for k in ("loss", "rec_loss", "kl", "g_loss", "d_loss", "grad_norm"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    # The discriminator has an optimizer of its own: its AdamW state is a separate branch.
    assert set(out[0][0]) == {"vae", "disc"}


def test_disc_has_its_own_learning_rate():
    c = shapes_vae.get_config()
    c.disc.enabled = True
    c.disc.lr = 1e-1
    c.optim.warmup_steps = 0
    tx, _ = vae_train.make_optimizer(c, 10)
    params = {"vae": {"w": jnp.ones(3)}, "disc": {"w": jnp.ones(3)}}
    grads = {"vae": {"w": jnp.ones(3)}, "disc": {"w": jnp.ones(3)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each param by about its learning rate.
    assert abs(float(updates["vae"]["w"][0]) + c.optim.lr) < 0.1 * c.optim.lr
    assert abs(float(updates["disc"]["w"][0]) + 1e-1) < 1e-2


# ---------------------------------------------------------------------------
# Non-finite updates never reach a checkpoint.
# ---------------------------------------------------------------------------

def test_huge_learning_rate_stops_with_only_finite_checkpoints(tmp_path):
    """lr = 1e39 gives finite loss and gradients at step 1 but non-finite params: the guard checks
    the update, so no checkpoint holds the params it would give (the old guard saved step 1 as "good")."""
    _, c = _clip(4)
    c.optim.lr = 1e39
    c.optim.warmup_steps = 0
    c.train.checkpoint_every = 1
    c.train.log_every = 1
    with pytest.raises(FloatingPointError, match=r"step 1: the update is not finite.*\(none\)"):
        clip_train.train_and_evaluate(c, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    for s in ckpt.all_steps():
        raw = ckpt.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(raw["params"]))
    assert ckpt.all_steps() == []


# ---------------------------------------------------------------------------
# (c) The prefetcher: order and checkpoint state as without it.
# ---------------------------------------------------------------------------

def test_prefetcher_state_is_that_of_the_consumed_batch():
    source = data_lib.shapes.ShapesSource(16, split="train", seed=0, length=64)

    def loader():
        return iter(data_lib.make_loader(source, global_batch_size=4, seed=3, resolution=16))

    plain = loader()
    expected, states = [], []
    for _ in range(6):
        expected.append(next(plain)["image"])
        states.append(plain.get_state())
    pf = loop_lib.Prefetcher(loader(), put=lambda b: b, size=3)
    got = [next(pf)["image"] for _ in range(3)]
    for a, b in zip(got, expected[:3]):
        np.testing.assert_array_equal(a, b)
    import time
    time.sleep(0.5)  # let the thread run ahead
    assert pf.get_state() == states[2]  # not the thread's position
    saved = pf.get_state()
    pf.close()
    resumed = loader()
    resumed.set_state(saved)
    pf2 = loop_lib.Prefetcher(resumed, put=lambda b: b)
    for want in expected[3:]:
        np.testing.assert_array_equal(next(pf2)["image"], want)
    pf2.close()
    with pytest.raises(RuntimeError, match="before the first batch"):
        pf2.set_state(saved)


def test_prefetcher_hands_over_errors():
    def boom():
        yield {"x": np.zeros(1)}
        raise ValueError("bad record 7")

    class It:
        def __init__(self):
            self.g = boom()

        def __next__(self):
            return next(self.g)

        def get_state(self):
            return b"{}"

    pf = loop_lib.Prefetcher(It(), put=lambda b: b)
    next(pf)
    with pytest.raises(ValueError, match="bad record 7"):
        next(pf)


# ---------------------------------------------------------------------------
# The latent cache skips and counts bad images.
# ---------------------------------------------------------------------------

class _Planted:
    """A shapes source with undecodable bytes in place of the images at `bad`."""

    def __init__(self, source, bad):
        self.source, self.bad = source, set(bad)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rec = dict(self.source[i])
        if i in self.bad:
            rec["image"] = b"not an image"
            rec["key"] = f"planted-{i}"
        return rec


def test_cache_of_only_bad_images_is_an_error(tmp_path, monkeypatch):
    _, c = _ldm(2)
    real = ldm.make_source
    monkeypatch.setattr(ldm, "make_source", lambda config: (_Planted(real(config)[0], range(32)), real(config)[1]))
    with pytest.raises(ValueError, match="none of the 32 records.*planted-0"):
        ldm.train_and_evaluate(c, tmp_path)
