"""Ahead-of-time TPU compiles and the planner's lower bound for SDXL models (`t2i_jax.bench.aot`, `.plan`).

tiny-sdxl (SDXL's conditioning at toy widths, one U-Net level: a quicker compile) on v5e:2x2: the
Sampler's SDXL loop (both encoders' context, pooled text, time ids) moves nothing between chips
inside its while body; the LDM trainer's SDXL step, with configs/sdxl_finetune.py's settings,
carries FSDP's collectives; the lower bound per FSDP degree comes from abstract values alone.
"""

import dataclasses
import math

import jax
import pytest

pytest.importorskip("libtpu", reason='libtpu (the TPU compiler) is not installed: pip install -e ".[tpu-aot]"')

from configs import sdxl_finetune  # noqa: E402
from t2i_jax import parallel  # noqa: E402
from t2i_jax.bench import aot, cli, plan, tpu_chips  # noqa: E402
from t2i_jax.bench import models as bench_models  # noqa: E402
from t2i_jax.train import sdxl_cond  # noqa: E402

TOPOLOGY = "v5e:2x2"
LOOP_TRAFFIC = ("all-gather", "all-to-all", "collective-permute")
# One level, cross-attention in it (a quicker compile); the text-time embedding stays SDXL's.
ONE_LEVEL_SDXL = (("block_out_channels", (32,)), ("down_block_types", ("CrossAttnDownBlock2D",)),
                  ("up_block_types", ("CrossAttnUpBlock2D",)), ("transformer_layers_per_block", (1,)),
                  ("attention_head_dim", (4,)))
RES = 16  # 8 x 8 latents with the tiny VAE


@pytest.fixture(scope="module")
def sample(chips, v5e):
    s = aot.AotSettings(topology=TOPOLOGY, model="tiny-sdxl", batch=4, steps=3, resolution=RES,
                        unet_overrides=ONE_LEVEL_SDXL)
    return aot.compile_sample(s, parallel.make_mesh(devices=chips), v5e)


def _unet_param_count(overrides) -> int:
    parts = bench_models.model_parts("tiny-sdxl", unet_overrides=overrides)
    return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(bench_models.abstract_params(
        {"unet": parts["unet"]})))


def test_sdxl_sampler_loop_moves_nothing_between_chips_and_counts_its_trips(sample):
    # Params replicated, each image with its conditioning (context, pooled text, time ids) on one chip.
    assert not any(sample["collectives"]["in_while"].get(op) for op in LOOP_TRAFFIC), sample["collectives"]
    assert not any(sample["unet_eval_collectives"].get(op) for op in LOOP_TRAFFIC)
    # The model's sampler (Euler for SDXL): 3 steps are 3 evaluations, one U-Net call per trip on the
    # CFG-doubled batch; the compiled while loop has those trips.
    assert (sample["scheduler"], sample["sdxl"]) == ("euler", True)
    assert (sample["loop_trips"], sample["unet_evals_per_trip"], sample["unet_evals"]) == (3, 1, 3)
    assert sample["unet_rows_per_eval"] == 8
    assert 3 in [w["trips"] for w in sample["collectives"]["whiles"]]
    loop, unet = sample["loop_program_cost_per_chip"], sample["unet_eval_cost_per_chip"]
    assert sample["flops_per_chip"] == pytest.approx(loop["flops"] + 2 * unet["flops"])
    # The U-Net evaluation alone is most of one trip (the body adds the scheduler's few element-wise ops,
    # the rest of the loop program is the decode): a wrong U-Net call (no added conditioning, other rows)
    # would not come out at this size.
    assert 0.2 * loop["flops"] < unet["flops"] < loop["flops"]
    # The text encoders run before the loop: both are reported, neither is a loop argument.
    parts = bench_models.model_parts("tiny-sdxl")
    text = bench_models.abstract_params({k: parts[k] for k in ("text_encoder", "text_encoder_2")})
    assert sample["text_encoder_bytes_per_chip"] == sum(4 * math.prod(a.shape) for a in jax.tree_util.tree_leaves(text))
    mem = sample["memory_per_chip"]
    assert mem["fits"] and mem["params"] <= mem["argument"] < mem["params"] + sample["text_encoder_bytes_per_chip"]


@pytest.mark.slow  # ~27 s of compile; as for SD1's LDM step (test_aot.py), the fast suite builds the program only
def test_sdxl_train_step_compiles_with_fsdp_and_data(chips, v5e):
    # data 2 x fsdp 2, the config's settings (bf16, no EMA on 4 devices) but remat off and one
    # micro-batch (a compile a third quicker; the config's remat is checked below, without a compile).
    s = aot.AotSettings(topology=TOPOLOGY, model="tiny-sdxl", batch=4, fsdp=2, fsdp_min_size=4096, grad_accum=1,
                        remat=False, resolution=RES, unet_overrides=ONE_LEVEL_SDXL)
    r = aot.compile_train_ldm(s, parallel.make_mesh(data=-1, fsdp=2, devices=chips), v5e)
    c = r["collectives"]["counts"]
    # FSDP: weights all-gathered where used, gradients reduce-scattered back to their shards.
    assert c.get("all-gather", 0) > 0 and c.get("reduce-scatter", 0) > 0, c
    assert r["collectives"]["in_while"] == {}  # no accumulation loop
    assert (r["fsdp"], r["data"], r["remat"], r["ema"], r["grad_accum"]) == (2, 2, False, False, 1)
    mem = r["memory_per_chip"]
    # AdamW's two moments, no EMA copy (configs/sdxl_finetune.py turns EMA on from 8 devices).
    assert mem["optimizer_state"] == pytest.approx(2 * mem["params"], rel=0.01)
    assert mem["alias"] >= mem["params"] + mem["optimizer_state"]  # the state is donated


def test_sdxl_train_config_is_the_config_files():
    c = aot.ldm_config("sdxl", 16)
    ref = sdxl_finetune.get_config("gpus=16")
    assert (c.model.dtype, c.model.remat, c.optim.lr, c.ema_decay, c.mesh.fsdp) == (
        "bfloat16", True, ref.optim.lr, 0.9999, 16)
    assert (c.batch_size, c.train.grad_accum, c.diffusion.snr_gamma, c.cache.enabled) == (4, 4, 5.0, True)
    assert aot.ldm_config("sdxl", 4).ema_decay == 0.0
    # The config's 4 micro-batches where the batch per chip allows: 1 per chip is one micro-batch.
    prog = aot.train_ldm_program(aot.AotSettings(topology=TOPOLOGY, model="tiny-sdxl", resolution=RES),
                                 parallel.make_mesh(data=-1, fsdp=4, devices=aot.topology_devices(TOPOLOGY)),
                                 accumulator=False)
    assert prog["grad_accum"] == 1 and tuple(prog["args"][3]) == sdxl_cond.batch_keys(True)
    assert set(prog["args"][2]) == {"vae", "text_encoder", "text_encoder_2"}
    with pytest.raises(ValueError, match="grad_accum 3 cuts batch 8 into micro-batches of 2.66667, which do not "
                                         "split over the 4 chips"):
        aot.train_ldm_program(aot.AotSettings(topology=TOPOLOGY, model="tiny-sdxl", batch=8, grad_accum=3),
                              parallel.make_mesh(data=-1, fsdp=4, devices=aot.topology_devices(TOPOLOGY)))


def test_lower_bound_halves_when_fsdp_doubles(monkeypatch):
    s = aot.AotSettings(topology=TOPOLOGY, model="tiny-sdxl", batch=8, resolution=RES, fsdp_min_size=0,
                        unet_overrides=ONE_LEVEL_SDXL)
    r = plan.lower_bounds(s)
    rows = {row["fsdp"]: row for row in r["rows"]}
    assert sorted(rows) == [1, 2, 4] and r["batch"] == 8 and not r["ema"]
    sharded = {d: row["lower_bound_bytes"] - row["frozen_bytes"] - row["batch_bytes"] for d, row in rows.items()}
    assert sharded[1] / sharded[2] == pytest.approx(2.0, rel=0.1)
    assert sharded[2] / sharded[4] == pytest.approx(2.0, rel=0.1)
    n = _unet_param_count(ONE_LEVEL_SDXL)
    for d, row in rows.items():
        assert row["lower_bound_bytes"] == row["state_bytes"] + row["frozen_bytes"] + row["batch_bytes"] + \
            row["gradient_bytes"]
        # One fp32 gradient shard; params + two AdamW moments (+ a step counter or two).
        assert row["gradient_bytes"] == pytest.approx(4 * n / d, rel=0.01)
        assert row["state_bytes"] == pytest.approx(3 * 4 * n / d, rel=0.01)
    # Latent mean and std [8, 8, 8, 4], context [77, 64], pooled [32] and 6 time ids per sample, 2 per chip.
    assert rows[4]["batch_bytes"] == 2 * 4 * (2 * 8 * 8 * 4 + 77 * 64 + 32 + 6)
    assert r["smallest_passing_fsdp"] == 1
    # A chip between the fsdp 2 and fsdp 1 bounds: 2 is the smallest that passes.
    small = dataclasses.replace(tpu_chips.chip_for(TOPOLOGY), hbm_bytes=(rows[1]["lower_bound_bytes"] +
                                                                       rows[2]["lower_bound_bytes"]) // 2)
    monkeypatch.setattr(tpu_chips, "chip_for", lambda name: small)
    r = plan.lower_bounds(s, fsdp_degrees=(1, 2))
    assert [row["passes"] for row in r["rows"]] == [False, True] and r["smallest_passing_fsdp"] == 2


def test_cli_takes_sdxl_models_without_clip():
    assert aot.default_what("sdxl") == ("sample", "train_ldm") and aot.default_what("sd15") == aot.WHAT
    with pytest.raises(ValueError, match="no CLIP is trained for tiny-sdxl.*use --what sample,train_ldm"):
        cli.main(["--model", "tiny-sdxl", "--aot", "tpu:v5e:2x2", "--what", "train_clip"])


# --------------------------------------------------------------------------
# Full size (abstract values only; no compile)
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("topology", sorted(sdxl_finetune.POD_PLANS))
def test_sdxl_config_pod_plan_passes_the_lower_bound(topology):
    # configs/sdxl_finetune.py's stated fsdp per pod, at its 4 images per chip and 1024 px: the smallest
    # degree whose arguments + one fp32 gradient fit the chip (activations come on top).
    stated = sdxl_finetune.POD_PLANS[topology]
    n = len(aot.topology_devices(topology))
    s = aot.AotSettings(topology=topology, model="sdxl", resolution=1024, batch=4 * n)
    below = [d for d in plan.degrees(n) if d < stated][-1:]
    r = plan.lower_bounds(s, fsdp_degrees=below + [stated])
    print({row["fsdp"]: row["lower_bound_bytes"] / 2**30 for row in r["rows"]})
    assert r["rows"][-1]["passes"] and not any(row["passes"] for row in r["rows"][:-1])
    assert r["smallest_passing_fsdp"] == stated
    # The config's docstring states these bounds.
    for row in r["rows"]:
        assert f"{row['fsdp']}: {row['lower_bound_bytes'] / 2**30:.2f} GiB" in sdxl_finetune.__doc__
