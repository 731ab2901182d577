"""Ahead-of-time TPU compiles (`t2i_jax.bench.aot`) and the memory planner (`t2i_jax.bench.plan`).

Every program here is compiled by libtpu's TPU compiler for a v5e:2x2 slice
(4 chips) from abstract arguments, on this CPU-only machine: the sampler's
loop has no parameter or activation traffic inside its while body, the train
steps carry the collectives the partition rules imply, and per-chip state
halves when the FSDP degree doubles. The slow cases compile SD1.5 at full
size (minutes each).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("libtpu", reason='libtpu (the TPU compiler) is not installed: pip install -e ".[tpu-aot]"')

from t2i_jax import parallel  # noqa: E402
from t2i_jax.bench import aot, cli, plan, tpu_chips  # noqa: E402
from t2i_jax.models import layers  # noqa: E402

TOPOLOGY = "v5e:2x2"
LOOP_TRAFFIC = ("all-gather", "all-to-all", "collective-permute")
ONE_LAYER_CLIP = (("text_config", {"num_hidden_layers": 1}), ("vision_config", {"num_hidden_layers": 1}))
ONE_LEVEL_UNET = (("block_out_channels", (32,)), ("down_block_types", ("CrossAttnDownBlock2D",)),
                  ("up_block_types", ("CrossAttnUpBlock2D",)))


@pytest.fixture(scope="module")
def sample(chips, v5e):
    s = aot.AotSettings(topology=TOPOLOGY, model="tiny", batch=4, steps=3)
    return aot.compile_sample(s, parallel.make_mesh(devices=chips), v5e)


@pytest.fixture(scope="module")
def train_ldm(chips, v5e):  # slow tests only: the LDM step takes ~6x CLIP's compile
    # data 2 x fsdp 2: both kinds of parallelism in one program. A one-level U-Net (a quicker compile)
    # with every tensor above 4096 elements sharded; the smaller ones (biases, norms) stay replicated.
    s = aot.AotSettings(topology=TOPOLOGY, model="tiny", batch=4, fsdp=2, fsdp_min_size=4096,
                        unet_overrides=ONE_LEVEL_UNET)
    return aot.compile_train_ldm(s, parallel.make_mesh(data=-1, fsdp=2, devices=chips), v5e)


@pytest.fixture(scope="module")
def clip_by_fsdp(chips, v5e):
    out = {}
    for f in (2, 4):
        # Every tensor sharded (no size threshold): the state is then all FSDP.
        s = aot.AotSettings(topology=TOPOLOGY, model="tiny", batch=8, fsdp=f, fsdp_min_size=0,
                            clip_overrides=ONE_LAYER_CLIP)
        out[f] = aot.compile_train_clip(s, parallel.make_mesh(data=-1, fsdp=f, devices=chips), v5e)
    return out


def test_topology_and_chip_table(chips):
    assert len(chips) == 4 and chips[0].device_kind == "TPU v5 lite"
    c = tpu_chips.chip_for(chips[0].device_kind)
    assert (c.kind, c.hbm_bytes, c.hbm_bytes_per_s, c.bf16_flops_per_s) == ("v5e", 16 * 2**30, 819e9, 197e12)
    assert tpu_chips.chip_for("tpu:v6e:2x4").bf16_flops_per_s == 918e12
    assert tpu_chips.chip_for("v5p:2x2x1").hbm_bytes == 95 * 2**30
    with pytest.raises(ValueError, match="v9z.*known kinds"):
        tpu_chips.chip_for("v9z:2x2")
    with pytest.raises(ValueError, match="v5e:3x7.*e.g. v5e:2x2"):
        aot.topology_devices("tpu:v5e:3x7")


def test_collective_parser_places_ops_inside_and_outside_a_loop(chips):
    # A while body whose matmul needs its sharded operand gathered, then a sum (an all-reduce) after it:
    # the parser must see the first inside the loop of 7 trips and the second outside.
    mesh = Mesh(np.asarray(chips).reshape(2, 2), ("data", "fsdp"))
    x = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P("data", "fsdp")))

    def f(a):
        a = jax.lax.fori_loop(0, 7, lambda i, c: jnp.tanh(c @ c), a)
        return jnp.sum(a)

    hlo = jax.jit(f, out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
    col = aot.collectives(hlo)
    assert col["in_while"].get("all-gather", 0) >= 1
    assert col["counts"].get("all-reduce", 0) >= 1 and col["in_while"].get("all-reduce", 0) == 0
    assert [w["trips"] for w in col["whiles"]] == [7]
    inside = [o for o in col["ops"] if o["in_while"]]
    assert inside and all(o["while_trips"] == 7 for o in inside)


def test_sampler_loop_moves_no_params_or_activations_between_chips(sample):
    # Params replicated, every image (and both of its guidance halves) on one chip: nothing to gather,
    # exchange or permute while denoising.
    assert not any(sample["collectives"]["in_while"].get(op) for op in LOOP_TRAFFIC), sample["collectives"]
    assert not any(sample["unet_eval_collectives"].get(op) for op in LOOP_TRAFFIC)
    # PNDM: 3 steps are 4 model evaluations (its warm-up step runs twice), one U-Net call per trip on
    # the CFG-doubled batch; the compiled while loop has those trips.
    assert (sample["loop_trips"], sample["unet_evals_per_trip"], sample["unet_evals"]) == (4, 1, 4)
    assert sample["unet_rows_per_eval"] == 8
    assert 4 in [w["trips"] for w in sample["collectives"]["whiles"]]
    # Totals: XLA's loop count (one trip) + 3 more U-Net evaluations.
    loop, unet = sample["loop_program_cost_per_chip"], sample["unet_eval_cost_per_chip"]
    assert sample["flops_per_chip"] == pytest.approx(loop["flops"] + 3 * unet["flops"])
    assert sample["bytes_accessed_per_chip"] == pytest.approx(loop["bytes_accessed"] + 3 * unet["bytes_accessed"])
    assert sample["flops_per_item"] == pytest.approx(sample["flops_per_chip"] / 1.0)  # one image per chip
    roof = sample["roofline_per_chip"]
    assert roof["bound_s"] == max(roof["compute_s"], roof["memory_s"])
    assert roof["compute_s"] == pytest.approx(sample["flops_per_chip"] / 197e12)
    assert sample["max_items_per_s_per_chip"] == pytest.approx(1.0 / roof["bound_s"])
    mem = sample["memory_per_chip"]
    assert mem["fits"] and mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + \
        mem["generated_code"]
    # The loop's params: U-Net and VAE kernels in bf16, replicated; XLA's arguments are those (in TPU
    # tiles) plus the small embeddings, seeds, latents and scheduler state, and not the text
    # encoder's params the Sampler also passes (jit drops unused arguments).
    assert mem["params"] <= mem["argument"] < mem["params"] + sample["text_encoder_bytes_per_chip"]


def test_train_step_collectives_follow_the_partition_rules(clip_by_fsdp):
    # The trainers' one step (train.loop.make_train_step), CLIP's objective, data 2 x fsdp 2: FSDP
    # (params over "fsdp") all-gathers weights where they are used and reduce-scatters gradients back
    # to their shards; data parallelism (the batch over "data" too) all-reduces the rest.
    r = clip_by_fsdp[2]
    assert (r["fsdp"], r["data"]) == (2, 2)
    c = r["collectives"]["counts"]
    assert c.get("all-gather", 0) > 0 and c.get("reduce-scatter", 0) > 0 and c.get("all-reduce", 0) > 0, c
    # No loop in the step (no gradient accumulation): nothing sits in a while body.
    assert r["collectives"]["in_while"] == {}


@pytest.mark.slow
def test_ldm_train_step_collectives_follow_the_partition_rules(train_ldm):
    c = train_ldm["collectives"]["counts"]
    # FSDP (params over "fsdp"): weights all-gathered where used, gradients reduce-scattered back to
    # their shards; data parallel (the batch over "data", small tensors replicated): all-reduce.
    assert c.get("all-gather", 0) > 0 and c.get("reduce-scatter", 0) > 0 and c.get("all-reduce", 0) > 0, c
    assert (train_ldm["fsdp"], train_ldm["data"]) == (2, 2)
    mem = train_ldm["memory_per_chip"]
    # The state is donated: its outputs alias its arguments.
    assert mem["alias"] >= mem["params"] + mem["optimizer_state"]
    # AdamW's two moments and the EMA copy: 3x the params.
    assert mem["optimizer_state"] == pytest.approx(3 * mem["params"], rel=0.01)


def test_state_per_chip_halves_when_fsdp_doubles(clip_by_fsdp):
    two, four = clip_by_fsdp[2], clip_by_fsdp[4]
    m2, m4 = two["memory_per_chip"], four["memory_per_chip"]
    # From the shardings (what the partition rules give each chip) ...
    state = lambda m: m["params"] + m["optimizer_state"]  # noqa: E731
    assert state(m2) / state(m4) == pytest.approx(2.0, rel=0.1)
    # ... and from XLA's own plan: the arguments are the state plus a batch of the same size per chip.
    batch_bytes = 2 * (8 // 4) * 32 * 32 * 3 * 4 + (8 // 4) * 77 * 4  # images + ids per chip, generous
    assert (m2["argument"] - batch_bytes) / (m4["argument"] - batch_bytes) == pytest.approx(2.0, rel=0.1)


def test_planner_takes_the_smallest_fitting_fsdp_then_the_largest_micro_batch(monkeypatch):
    # The search alone: fake per-chip totals in place of compiles (16 GiB chips, 16 of them, 8 samples
    # per chip). State falls with fsdp; activations grow with the micro-batch, more without remat,
    # more with XLA's attention than the chunked one.
    GiB = 2**30
    state = {1: 17, 2: 9, 4: 5, 8: 3, 16: 2}

    def total(fsdp, remat, attention, micro):
        per_sample = (0.4 if remat else 1.2) * (1.0 if attention == "chunked" else 2.5)
        return state[fsdp] + per_sample * micro * (1 if fsdp > 2 else 8)  # fsdp 2: 8x the activations

    compiled = []
    monkeypatch.setattr(aot, "train_ldm_program", lambda s, mesh: {"fsdp": s.fsdp})
    monkeypatch.setattr(aot, "train_bytes_lower_bound", lambda prog: (state[prog["fsdp"]] - 0.5) * GiB)

    def fake_compile(s, mesh, chip, program=None):
        key = (s.fsdp, s.remat, s.attention_impl, 8 // s.grad_accum)
        compiled.append(key)
        t = total(*key) * GiB
        return {"memory_per_chip": {"total": t, "fits": t <= chip.hbm_bytes}, "flops_per_item": 1.0,
                "roofline_per_chip": {}, "max_items_per_s_per_chip": 1.0, "collectives": {"counts": {}},
                "compile_s": 0.0}

    monkeypatch.setattr(aot, "compile_train_ldm", fake_compile)
    report = plan.plan(aot.AotSettings(topology="v5e:4x4", model="tiny", batch=128))
    # fsdp 1: over HBM before any activation (skipped). fsdp 2, every saving on, 1 per chip: 12.2 GiB,
    # fits. Bisection over micro-batches 1, 2, 4, 8: 4 (21.8) does not fit, 2 (15.4) does. At 2 per
    # chip remat off (28.2) does not fit; XLA's attention under remat (25) does not.
    assert compiled == [(2, True, "chunked", 1), (2, True, "chunked", 4), (2, True, "chunked", 2),
                        (2, False, "chunked", 2), (2, True, "xla", 2)]
    c = report["choice"]
    assert (c["fsdp"], c["remat"], c["attention_impl"], c["micro_batch_per_chip"], c["grad_accum"]) == (
        2, True, "chunked", 2, 4)
    assert report["compiles"] == 5 and "skipped" in report["candidates"][0]
    assert "choice: fsdp=2 remat=True attention=chunked micro-batch=2/chip (grad_accum=4)" in plan.table(report)

    # Cut to remat only and XLA's attention: fsdp 2 fits nothing (1 per chip is 17 GiB), fsdp 4 fits
    # 8 per chip (13 GiB).
    compiled.clear()
    report = plan.plan(aot.AotSettings(topology="v5e:4x4", model="tiny", batch=128), remat_options=(True,),
                       attention_options=("xla",))
    assert compiled == [(2, True, "xla", 1), (4, True, "xla", 1), (4, True, "xla", 4), (4, True, "xla", 8)]
    assert report["choice"]["fsdp"] == 4 and report["choice"]["micro_batch_per_chip"] == 8
    assert plan.degrees(16) == [1, 2, 4, 8, 16] and plan.degrees(12) == [1, 2, 4, 12]
    assert plan.micro_batches(8) == [1, 2, 4, 8] and plan.micro_batches(12) == [3, 6, 12]
    with pytest.raises(ValueError, match=r"micro-batch\(es\) \[3\] per chip do not divide the 8 samples per chip"):
        plan.plan(aot.AotSettings(topology="v5e:4x4", model="tiny", batch=128), micro_batch_options=(3, 8))


def test_chunked_attention_cuts_the_compiled_peak(chips):
    # One v5e chip, the gradient of 2 x 4 heads of self-attention over 2048 tokens: XLA's path holds
    # the fp32 scores (2 x 4 x 2048^2 x 4 B = 128 MiB); query chunks of 256 hold an eighth of them.
    sh = NamedSharding(Mesh(chips[:1], ("x",)), P())
    spec = jax.ShapeDtypeStruct((2, 2048, 4 * 32), jnp.bfloat16, sharding=sh)

    def memory(impl):
        def loss(q, k, v):
            return jnp.sum(layers.dot_product_attention(q, k, v, 4, impl=impl).astype(jnp.float32) ** 2)
        return aot._memory(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile())

    xla, chunked = memory(None), memory("chunked:256")
    assert xla["temp"] >= 128 * 2**20 and xla["total"] >= 128 * 2**20
    assert chunked["total"] < 0.4 * xla["total"]
    assert chunked["temp"] < 0.1 * xla["temp"]  # what XLA counts outside the chunk loop


def test_cli_errors_name_the_fix(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--aot", "tpu:v5e:2x2", "--plan", "tpu:v5e:2x2"])
    assert "give one of them" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch 6 does not split over the 4 chips"):
        cli.main(["--aot", "tpu:v5e:2x2", "--batch", "6"])
    with pytest.raises(ValueError, match="--what 'decode'"):
        cli.main(["--aot", "tpu:v5e:2x2", "--what", "decode"])


# --------------------------------------------------------------------------
# Full size (minutes per compile)
# --------------------------------------------------------------------------

MAXDIFFUSION_TRAIN_FLOPS_PER_SAMPLE = 2.41e12  # SD2 at 512 px, MaxDiffusion's recipes


# The plan BENCHMARKS.md records, with the options cut to the candidate chosen (each full-size compile
# took 15-25 min on the 2-core machine): remat, chunked attention, the config's 8 per chip.
SD15_PLAN_OPTIONS = dict(remat_options=(True,), attention_options=("chunked",), micro_batch_options=(8,))


@pytest.mark.slow
def test_sd15_train_step_fits_v5e_4x4_with_the_planners_choice():
    # configs/sd15_finetune.py's 8 per device, on 16 chips.
    report = plan.plan(aot.AotSettings(topology="v5e:4x4", model="sd15", resolution=512, batch=128), print,
                       **SD15_PLAN_OPTIONS)
    print(plan.table(report))
    choice = report["choice"]
    assert choice is not None and choice["memory_per_chip"]["total"] <= 16 * 2**30
    assert choice["attention_impl"] == "chunked" and choice["micro_batch_per_chip"] == 8


@pytest.mark.slow
def test_sd15_train_flops_per_sample_match_maxdiffusions_count():
    # The recipes' count is the model's: forward + backward (3 forwards) of the U-Net at 512 px. XLA's
    # count of the same step with remat off, XLA attention and no accumulation loop (see
    # `aot.train_ldm_model_flops`); measured here: 2.373 TFLOP, -1.5%.
    r = aot.train_ldm_model_flops(aot.AotSettings(model="sd15", resolution=512))
    print(r)
    assert r["flops_per_sample"] == pytest.approx(MAXDIFFUSION_TRAIN_FLOPS_PER_SAMPLE, rel=0.05)


@pytest.mark.slow
def test_sd15_train_step_plan_for_v6e_2x4():
    report = plan.plan(aot.AotSettings(topology="v6e:2x4", model="sd15", resolution=512, batch=64), print,
                       **SD15_PLAN_OPTIONS)
    print(plan.table(report))
    assert report["choice"] is not None and report["choice"]["memory_per_chip"]["total"] <= 32 * 2**30


@pytest.mark.slow
def test_sd15_sampler_512_50_steps_compiles_for_v5e_2x2(chips, v5e):
    s = aot.AotSettings(topology=TOPOLOGY, model="sd15", resolution=512, batch=4, steps=50)
    r = aot.compile_sample(s, parallel.make_mesh(devices=chips), v5e)
    print({k: r[k] for k in ("flops_per_chip", "bytes_accessed_per_chip", "roofline_per_chip",
                             "max_items_per_s_per_chip", "memory_per_chip", "compile_s")})
    assert r["memory_per_chip"]["fits"] and r["loop_trips"] == 51 and r["unet_evals_per_trip"] == 1
    assert not any(r["collectives"]["in_while"].get(op) for op in LOOP_TRAFFIC)
    assert 0 < r["max_items_per_s_per_chip"] < math.inf


def test_unprintable_compiled_module_keeps_the_report():
    # libtpu compiled SD1.5's train step for v6e:2x4 but jax could not print the module: the
    # report keeps memory and cost, and says why the collectives are missing.
    class Unprintable:
        def as_text(self):
            raise RuntimeError("INTERNAL: RET_CHECK failure Async done requires its operand to be an asynchronous op")

    text, why = aot.hlo_text(Unprintable())
    assert text is None and "not counted" in why and "Async done" in why
    assert aot._collective_counts(Unprintable()) == {"error": why}
