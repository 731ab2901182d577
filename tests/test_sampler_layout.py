"""The layout of `pipeline.Sampler`'s jitted denoising loop on 8 fake CPU
devices: no cross-device exchange inside the loop, the same images as on one
device, params cast once to the compute dtype, and `update_params` swapping
weights without recompiling. The bundled shapes model keeps it real and small.
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t2i_jax import pipeline
from t2i_jax.convert.load import load_components
from t2i_jax.sample import BUNDLED_MODEL

PROMPTS = [
    "a large red circle on a blue background",
    "a small yellow triangle on a green background",
    "a large green square on a white background",
    "a medium purple circle on a yellow background",
    "a large orange triangle on a black background",
    "a medium white square on a red background",
    "a large blue triangle on a orange background",
    "a medium black circle on a white background",
]
SEEDS = list(range(len(PROMPTS)))
SIZE = 32  # the bundled model's native side
STEPS = 3


# --------------------------------------------------------------------------
# HLO text: the while loops' bodies and the collectives in them
# --------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")
# A computation starts at a line `[ENTRY ]%name (params) -> result {` and ends at `}`.
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
# Attributes naming the computations an instruction runs (fusions, reductions,
# loops, conditionals, async wrappers).
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|"
                    r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
# The opcode (not an operand named after one): `= type op(` or `op-start(`.
_COLLECTIVE_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def hlo_computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, from HLO module text."""
    comps, name, lines = {}, None, []
    for line in text.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m and " = " not in line:
                name, lines = m.group(1), []
        elif line.startswith("}"):
            comps[name] = lines
            name = None
        else:
            lines.append(line)
    return comps


def _called(line: str) -> list[str]:
    names = []
    for m in _CALLS.finditer(line):
        names += [s.strip().lstrip("%") for s in m.group(1).strip("{}").split(",") if s.strip()]
    return names


def while_body_computations(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The `body=` computations of every `while(` instruction, and those bodies
    plus every computation they call (transitively), by name."""
    comps = hlo_computations(text)
    bodies = [re.search(r"\bbody=%?([\w.\-]+)", line).group(1)
              for lines in comps.values() for line in lines if " while(" in line]
    reached, todo = {}, list(bodies)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached[name] = comps[name]
            todo += _called("\n".join(comps[name]))
    return bodies, reached


def while_body_collectives(text: str) -> tuple[list[str], Counter]:
    """The while bodies' names and a count of the collective ops run inside them."""
    bodies, reached = while_body_computations(text)
    counts = Counter(m.group(1) for lines in reached.values() for line in lines
                     for m in _COLLECTIVE_OP.finditer(line))
    return bodies, counts


def test_hlo_helper_finds_collectives_in_a_loop_body():
    # The helper must be able to fail: a loop over a batch-split array that
    # sums over the batch every step (an all-reduce in its body) against one
    # that stays elementwise.
    mesh = pipeline.make_mesh(devices=jax.devices()[:8])
    x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data")))

    def run(step):
        f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, x: step(x), x),
                    out_shardings=NamedSharding(mesh, P("data")))
        return f.lower(x).compile().as_text()

    bodies, mixing = while_body_collectives(run(lambda x: x + x.sum(0)))
    assert bodies and sum(mixing.values()) >= 1, mixing
    bodies, local = while_body_collectives(run(lambda x: x * 2.0 + 1.0))
    assert bodies and not local, local


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return load_components(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def eight(pipe):
    return pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:8]))


@pytest.fixture(scope="module")
def one(pipe):
    return pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:1]))


# The bf16 tests' settings; BF16_SCHEDULER's loop is traced by them only.
BF16_SCHEDULER = "euler"


@pytest.fixture(scope="module")
def bf16(pipe):
    """A bf16 Sampler (params cast, the default) on 8 devices, whose
    `traces` list grows by one each time jit traces a loop body of
    BF16_SCHEDULER: a count of compiles that needs no jax internals."""
    s = pipeline.Sampler(pipe, mesh=pipeline.make_mesh(devices=jax.devices()[:8]), dtype=jnp.bfloat16)
    sched = s.scheduler(BF16_SCHEDULER)
    step = sched.step
    s.traces = []

    def counting_step(*args, **kw):
        s.traces.append(1)  # Python runs this only while tracing
        return step(*args, **kw)

    sched.step = counting_step
    return s


def _kw(scheduler="pndm", guidance_scale=7.5, steps=STEPS):
    return dict(seeds=SEEDS, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                height=SIZE, width=SIZE)


# --------------------------------------------------------------------------
# (a) no cross-device traffic in the loop
# --------------------------------------------------------------------------


def test_denoising_loop_body_has_no_collectives(eight):
    """Batch 8 over 8 devices with guidance: each device denoises its image's
    two halves alone. (Stacking the halves as [uncond; cond] along the split
    batch axis cost 2 all-to-all and 4 collective-permutes per step.)"""
    assert eight.num_devices == 8
    fn, args = eight.prepare(PROMPTS, **_kw())
    text = fn.lower(*args).compile().as_text()
    bodies, counts = while_body_collectives(text)
    _, reached = while_body_computations(text)
    # Among the loops (the PRNG has its own) is the denoising one: the U-Net's
    # convolutions run in it.
    assert any(" convolution(" in line for lines in reached.values() for line in lines), bodies
    assert not counts, f"collectives in the while bodies {bodies}: {dict(counts)}"


# --------------------------------------------------------------------------
# (b) 8 devices give the images of 1 device
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,guidance_scale", [("pndm", 7.5), ("euler_a", 1.0)])
def test_eight_devices_match_one(eight, one, scheduler, guidance_scale):
    """History buffers (pndm) with guidance, per-image sampler noise (euler_a)
    without: the split layout changes no image.

    The 1-device reference runs one image per call, the per-device batch of
    the 8-device run: CPU kernels round a batch of 8 slightly differently
    from a batch of 1 (2.5e-5 after 3 pndm steps, before and after the layout
    change), which is not the layout's doing.
    """
    kw = _kw(scheduler, guidance_scale)
    del kw["seeds"]
    a = eight(PROMPTS, seeds=SEEDS, **kw)
    b = np.concatenate([one([p], seeds=[s], **kw) for p, s in zip(PROMPTS, SEEDS)])
    assert a.shape == (8, SIZE, SIZE, 3) and a.std() > 0.05
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cfg_interleave_round_trip():
    u = jnp.arange(6.0).reshape(3, 2)
    c = 10 + u
    pair = pipeline.cfg_interleave(u, c)
    np.testing.assert_array_equal(pair[0::2], u)  # rows 2b, 2b + 1 are image b's
    np.testing.assert_array_equal(pair[1::2], c)
    back_u, back_c = pipeline.cfg_split(pair)
    np.testing.assert_array_equal(back_u, u)
    np.testing.assert_array_equal(back_c, c)


# --------------------------------------------------------------------------
# (c) params cast once to the compute dtype
# --------------------------------------------------------------------------


def _loop_bodies(jaxpr):
    """The body jaxprs of every scan / while in `jaxpr`, nested ones included."""
    found = []

    def walk(j, inside):
        for e in j.eqns:
            is_loop = e.primitive.name in ("scan", "while")
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is None:
                        continue
                    inner = getattr(inner, "jaxpr", inner)
                    if is_loop and not inside:
                        found.append(inner)
                    walk(inner, inside or is_loop)

    walk(jaxpr, False)
    return found


def _kernel_casts(jaxpr, kernel_shapes) -> int:
    """convert_element_type float32 -> bfloat16 of a kernel-shaped value, in
    the loop bodies (nested calls included)."""
    count = 0

    def walk(j):
        nonlocal count
        for e in j.eqns:
            if e.primitive.name == "convert_element_type":
                src = e.invars[0].aval
                if (src.dtype == jnp.float32 and e.params["new_dtype"] == jnp.bfloat16
                        and tuple(src.shape) in kernel_shapes):
                    count += 1
            for v in e.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))

    for body in _loop_bodies(jaxpr):
        walk(body)
    return count


# slow (23 s): the bf16 compute path stays fast in test_pipeline.py::test_sampler_dtype_sets_the_modules_compute_dtype.
@pytest.mark.slow
def test_bf16_params_are_cast_once(pipe, bf16):
    cast = bf16
    uncast = pipeline.Sampler(pipe, mesh=bf16.mesh, dtype=jnp.bfloat16, cast_params=False)
    # The cached copy: kernels bf16, biases and norm scales as loaded; the text
    # encoder (outside the loop, fp32 embedding sums) untouched; the pipe's own
    # params too.
    for part in pipeline.CAST_PARTS:
        for leaf in jax.tree.leaves(cast.params[part]):
            assert leaf.dtype == (jnp.bfloat16 if leaf.ndim >= 2 else jnp.float32), (part, leaf.shape)
    assert {x.dtype for x in jax.tree.leaves(cast.params["text_encoder"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(uncast.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(pipe.params)} == {np.dtype(np.float32)}

    kernels = [x for x in jax.tree.leaves(pipe.params["unet"]) if x.ndim >= 2]
    kernel_shapes = {tuple(x.shape) for x in kernels}
    kw = _kw(BF16_SCHEDULER, 6.0, steps=2)
    fn_c, args_c = cast.prepare(PROMPTS, **kw)
    fn_u, args_u = uncast.prepare(PROMPTS, **kw)
    assert _kernel_casts(jax.make_jaxpr(fn_c)(*args_c).jaxpr, kernel_shapes) == 0
    # Uncast, the modules convert every kernel at every step (the check can
    # fail: 132 converts for the bundled U-Net's 132 kernels).
    assert _kernel_casts(jax.make_jaxpr(fn_u)(*args_u).jaxpr, kernel_shapes) >= len(kernels)

    # The same bf16 weights either way; the images differ only as far as XLA
    # on CPU may skip a fused f32 -> bf16 -> f32 round trip of an uncast
    # kernel (excess precision). Measured: max 0.006, mean 0.0007 on images
    # with std 0.35 (bf16 vs fp32: max 0.16, mean 0.0036).
    a, b = np.asarray(fn_c(*args_c)), np.asarray(fn_u(*args_u))
    assert a.std() > 0.05 and np.abs(a - b).mean() < 0.002 and np.abs(a - b).max() < 0.03


# --------------------------------------------------------------------------
# (d) update_params
# --------------------------------------------------------------------------


def test_update_params_reuses_the_compiled_loop(pipe, bf16):
    """New U-Net weights (a trainer's eval) are cast like the first ones and
    run in the loop compiled for those."""
    original = pipe.params["unet"]
    kw = _kw(BF16_SCHEDULER, 6.0, steps=2)
    try:
        a = bf16(PROMPTS, **kw)
        traced = len(bf16.traces)
        assert traced >= 1
        leaves, tree = jax.tree.flatten(original)
        rng = np.random.RandomState(0)
        perturbed = jax.tree.unflatten(tree, [(np.asarray(x) * (1 + 0.2 * rng.standard_normal(x.shape))).astype(
            np.float32) for x in leaves])
        bf16.update_params({"unet": perturbed})
        assert bf16.params["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
        b = bf16(PROMPTS, **kw)
        bf16.update_params({"unet": original})
        c = bf16(PROMPTS, **kw)
    finally:
        bf16.update_params({"unet": original})
    assert np.abs(a - b).max() > 0.05  # the new weights are used
    np.testing.assert_array_equal(c, a)  # and the old ones come back
    assert len(bf16.traces) == traced  # no retrace, hence no recompile
    loop = bf16.loop(BF16_SCHEDULER, True, False, False)
    if hasattr(loop, "_cache_size"):  # jax's own count, where it has one
        assert loop._cache_size() == 1


def test_update_params_rejects_another_model(eight, pipe):
    unet = pipe.params["unet"]
    leaves, tree = jax.tree.flatten(unet)
    wrong = jax.tree.unflatten(tree, [np.zeros((3,) + tuple(leaves[0].shape), np.float32)] + leaves[1:])
    with pytest.raises(ValueError, match=r"update_params: unet.* the sampler runs with .*build a new Sampler"):
        eight.update_params({"unet": wrong})
    with pytest.raises(ValueError, match=r"parts \['controlnet'\].*subset of"):
        eight.update_params({"controlnet": unet})
    with pytest.raises(ValueError, match=r"unet params do not match"):
        eight.update_params({"unet": {"extra": unet}})


def test_update_params_keeps_its_own_copy(eight, pipe):
    # Params already laid out as the Sampler's (a trainer's replicated
    # params, fp32 like the Sampler's: nothing to cast), deleted after the
    # update as a donating train step would: the Sampler's stay.
    vae = jax.device_put(pipe.params["vae"], NamedSharding(eight.mesh, P()))
    try:
        eight.update_params({"vae": vae})
        for x in jax.tree.leaves(vae):
            x.delete()
        assert not any(x.is_deleted() for x in jax.tree.leaves(eight.params["vae"]))
    finally:
        eight.update_params({"vae": pipe.params["vae"]})
