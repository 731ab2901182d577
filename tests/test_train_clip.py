"""CLIP training on synthetic shapes: learning, eval, export, resume, sharding, SIGTERM, NaN guard, metrics,
and the retrieval metrics and event-file writer it relies on."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import clip_flickr8k, clip_flickr30k, clip_shapes  # noqa: E402
from t2i_jax.eval import retrieval  # noqa: E402
from t2i_jax.train import clip as clip_train  # noqa: E402
from t2i_jax.train import metrics as metrics_lib  # noqa: E402
from t2i_jax.train.checkpoint import Checkpointer  # noqa: E402


def quick_config(**train):
    """clip_shapes with eval, export and the progress bar off, for loop mechanics tests."""
    c = clip_shapes.get_config()
    c.batch_size = 16
    c.progress = False
    c.export = False
    c.eval.enabled = False
    c.train.log_every = 1
    c.mesh.num_devices = 1  # 8 fake devices share 2 cores: sharded runs are tested on their own
    c.train.update(train)
    return c


pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: one persistent cache per module


# ---------------------------------------------------------------------------
# Retrieval metrics against direct numpy.
# ---------------------------------------------------------------------------


def test_recall_on_hand_made_similarity():
    # 3 texts x 4 images; text j belongs to image j.
    sim = np.array([[0.9, 0.1, 0.2, 0.3],    # own image first
                    [0.5, 0.4, 0.6, 0.1],    # own image (1) third
                    [0.2, 0.3, 0.1, 0.0]])   # own image (2) third
    relevant = np.zeros((3, 4), bool)
    relevant[[0, 1, 2], [0, 1, 2]] = True
    r = retrieval.recall_at_k(sim, relevant, ks=(1, 2, 3))
    assert r == {"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 1.0}
    # Ties count against the model: a collapsed scorer is not perfect.
    assert retrieval.recall_at_k(np.zeros((4, 4)), np.eye(4, dtype=bool), ks=(1, 4)) == {"R@1": 0.0, "R@4": 1.0}


def test_retrieval_metrics_match_argsort():
    rng = np.random.default_rng(0)
    n_img, per = 20, 3
    img = rng.normal(size=(n_img, 8))
    owner = np.repeat(np.arange(n_img), per)
    txt = img[owner] + 1.5 * rng.normal(size=(n_img * per, 8))
    out = retrieval.retrieval_metrics(txt, img, owner, ks=(1, 5, 10))
    tn = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    vn = img / np.linalg.norm(img, axis=1, keepdims=True)
    sim = tn @ vn.T
    order_t2i = np.argsort(-sim, axis=1)
    order_i2t = np.argsort(-sim.T, axis=1)
    for k in (1, 5, 10):
        t2i = np.mean([owner[j] in order_t2i[j, :k] for j in range(len(txt))])
        i2t = np.mean([np.any(owner[order_i2t[i, :k]] == i) for i in range(n_img)])
        assert out[f"t2i_R@{k}"] == pytest.approx(t2i)
        assert out[f"i2t_R@{k}"] == pytest.approx(i2t)
    assert 0 < out["t2i_R@1"] < 1  # the check above is not vacuous
    assert out["cosine"] == pytest.approx(np.mean(np.sum(tn * vn[owner], axis=1)))


def test_relevance_from_identical_captions():
    rel = retrieval.relevance_from_captions(["a", "b", "a", "c"], np.array([0, 0, 1, 2]), 3)
    np.testing.assert_array_equal(rel, [[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]])


# ---------------------------------------------------------------------------
# TensorBoard event files.
# ---------------------------------------------------------------------------


def test_event_file_roundtrip_and_protobuf(tmp_path):
    w = metrics_lib.EventWriter(tmp_path)
    other = metrics_lib.EventWriter(tmp_path)  # opened in the same second (a resumed run): its own file, so
    assert other.path != w.path  # tensorboardX's "wb" open cannot truncate the first one
    other.close()
    w.scalars(3, {"loss": 1.25, "lr": 1e-4})
    w.scalars(-1, {"loss": float("nan")})
    w.close()
    events = metrics_lib.read_events(w.path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[1]["step"] == 3 and events[1]["scalars"] == {"loss": 1.25, "lr": pytest.approx(1e-4)}
    assert events[2]["step"] == -1 and np.isnan(events[2]["scalars"]["loss"])

    # Decode with real protobuf classes built from tensorflow's field numbers.
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    fdp = descriptor_pb2.FileDescriptorProto(name="ev.proto", package="tf", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    value = fdp.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summ = fdp.message_type.add(name="Summary")
    summ.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".tf.Value", label=F.LABEL_REPEATED)
    ev = fdp.message_type.add(name="Event")
    ev.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    ev.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    ev.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    ev.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".tf.Summary", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Event = message_factory.GetMessageClass(pool.FindMessageTypeByName("tf.Event"))
    data = w.path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    first = data[12:12 + n]
    assert Event.FromString(first).file_version == "brain.Event:2"
    off = 16 + n
    (n2,) = struct.unpack("<Q", data[off:off + 8])
    e = Event.FromString(data[off + 12:off + 12 + n2])
    assert e.step == 3 and {v.tag: v.simple_value for v in e.summary.value}["loss"] == 1.25

    bad = bytearray(data)
    bad[off + 14] ^= 1  # flip a bit inside the second record
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="CRC"):
        metrics_lib.read_events(tmp_path / "bad")


# ---------------------------------------------------------------------------
# A real run: learning, eval, metrics, export.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip_shapes")
    c = clip_shapes.get_config()
    c.train.steps = 160
    c.train.log_every = 1
    c.train.checkpoint_every = 80
    c.optim.lr = 3e-3
    c.progress = False
    c.mesh.num_devices = 1
    result = clip_train.train_and_evaluate(c, workdir)
    return workdir, result


def test_loss_falls_and_recall_rises(shapes_run):
    workdir, result = shapes_run
    rows = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    losses = np.array([r["loss"] for r in rows])
    assert len(losses) == 160
    assert losses[0] > 0.95 * np.log(64)  # about chance level for a batch of 64
    ratio = losses[-10:].mean() / losses[0]
    assert ratio < 0.5, ratio
    before, after = result["eval_before"], result["eval_after"]
    assert json.loads((workdir / "eval_before.json").read_text()) == before
    assert json.loads((workdir / "eval_after.json").read_text()) == after
    assert before["num_images"] == 128 and before["num_texts"] == 384
    assert before["t2i_R@1"] < 0.05 and before["i2t_R@1"] < 0.05
    assert after["t2i_R@1"] > before["t2i_R@1"] + 0.2, (before, after)
    assert after["i2t_R@1"] > before["i2t_R@1"] + 0.2, (before, after)
    assert after["t2i_R@10"] > after["t2i_R@1"]


def test_metrics_jsonl_and_tensorboard(shapes_run):
    workdir, _ = shapes_run
    rows = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    fields = {"step", "loss", "lr", "grad_norm", "steps_per_sec", "samples_per_sec_per_device", "temperature",
              "accuracy"}
    assert [r["step"] for r in rows] == list(range(1, 161))
    assert all(fields <= set(r) for r in rows)
    # Warm-up: lr at step s (schedule of the step's starting count s - 1) rises linearly to 3e-3 at 20.
    assert rows[10]["lr"] == pytest.approx(3e-3 * 10 / 20)
    assert rows[-1]["samples_per_sec_per_device"] == pytest.approx(rows[-1]["steps_per_sec"] * 64 / 1)
    (event_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    events = [e for e in metrics_lib.read_events(event_file) if e["scalars"]]
    assert [e["step"] for e in events] == list(range(1, 161))
    np.testing.assert_allclose([e["scalars"]["loss"] for e in events], [r["loss"] for r in rows], rtol=1e-6)


def test_export_loads_in_transformers(shapes_run):
    import torch
    import transformers

    from t2i_jax.convert.clip import load_clip

    workdir, result = shapes_run
    export_dir = workdir / "export"
    hf = transformers.CLIPModel.from_pretrained(export_dir).eval()
    model, params = load_clip(export_dir)
    trained = jax.device_get(result["state"].params)
    np.testing.assert_array_equal(params["visual_projection"]["kernel"], trained["visual_projection"]["kernel"])
    rng = np.random.default_rng(0)
    ids = np.asarray(transformers.AutoTokenizer.from_pretrained(export_dir)(
        ["a small red circle on a blue background", "a large white square on a black background"],
        padding="max_length", max_length=16)["input_ids"])
    px = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    out = model.apply({"params": params}, ids, px)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)))
    for ours, theirs in [(out.text_embeds, ref.text_embeds), (out.image_embeds, ref.image_embeds),
                         (out.logits_per_text, ref.logits_per_text)]:
        theirs = theirs.numpy()
        assert np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs) < 1e-5


# Behind --slow (~25 s): the export loading in transformers stays fast (test_export_loads_in_transformers).
@pytest.mark.slow
def test_finetune_from_exported_folder(shapes_run, tmp_path):
    """A run starting from a transformers folder (init_from) begins with exactly those weights,
    and resumes (module rebuilt from config.json alone) after a stop."""
    workdir, result = shapes_run
    c = clip_shapes.get_config()
    c.model.init_from = str(workdir / "export")
    c.train.steps = 2
    c.train.preempt_at_step = 1
    c.progress = False
    c.export = False
    c.mesh.num_devices = 1
    r = clip_train.train_and_evaluate(c, tmp_path)
    for k in ("t2i_R@1", "i2t_R@5", "cosine"):
        assert r["eval_before"][k] == pytest.approx(result["eval_after"][k], abs=1e-6)
    assert r["stopped"] == "preempt_at_step" and r["eval_after"] is None
    c.train.preempt_at_step = 0
    r2 = clip_train.train_and_evaluate(c, tmp_path)
    assert r2["step"] == 2 and r2["eval_before"] == r["eval_before"] and r2["eval_after"] is not None


# ---------------------------------------------------------------------------
# Loop mechanics.
# ---------------------------------------------------------------------------


def _params(state):
    return jax.tree_util.tree_leaves(jax.device_get(state.params))


def test_resume_equals_uninterrupted(tmp_path):
    full = clip_train.train_and_evaluate(quick_config(steps=6), tmp_path / "full")
    first = clip_train.train_and_evaluate(quick_config(steps=6, preempt_at_step=3), tmp_path / "split")
    assert first["stopped"] == "preempt_at_step" and first["step"] == 3
    assert Checkpointer(tmp_path / "split" / "checkpoints").all_steps() == [3]
    second = clip_train.train_and_evaluate(quick_config(steps=6), tmp_path / "split")
    assert second["step"] == 6 and second["stopped"] is None
    for a, b in zip(_params(full["state"]), _params(second["state"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # Same data order: identical per-step losses after the resume.
    loss = lambda d: [r["loss"] for r in metrics_lib.read_jsonl(d / "metrics.jsonl")]  # noqa: E731
    np.testing.assert_allclose(loss(tmp_path / "split"), loss(tmp_path / "full"), rtol=1e-6)
    assert len(loss(tmp_path / "split")) == 6


def test_fsdp_on_8_devices_matches_one_device(tmp_path):
    assert jax.device_count() == 8
    one = quick_config(steps=3)
    eight = quick_config(steps=3)
    eight.mesh.num_devices = 0  # all 8
    eight.mesh.data, eight.mesh.fsdp = 2, 4
    eight.mesh.fsdp_min_size = 1024  # shard the tiny model's matrices too
    r1 = clip_train.train_and_evaluate(one, tmp_path / "one")
    r8 = clip_train.train_and_evaluate(eight, tmp_path / "eight")
    kernel = r8["state"].params["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # [64, 128]: 128 sharded
    assert len(kernel.sharding.device_set) == 8
    mu = r8["state"].opt_state[1][0].mu["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    l1 = [r["loss"] for r in metrics_lib.read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    l8 = [r["loss"] for r in metrics_lib.read_jsonl(tmp_path / "eight" / "metrics.jsonl")]
    assert len(l1) == 3 and l1[0] != l1[2]
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
    for a, b in zip(_params(r1["state"]), _params(r8["state"])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


# Behind --slow (~22 s): the one train loop's non-finite stop is checked fast in
# test_train_loop.test_huge_learning_rate_stops_with_only_finite_checkpoints.
@pytest.mark.slow
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = quick_config(steps=8, checkpoint_every=2, debug_nan_step=5)
    with pytest.raises(FloatingPointError, match=r"step 5: loss is nan.*last good checkpoint \(step 4\)"):
        clip_train.train_and_evaluate(c, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    raw = ckpt.manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert int(raw["step"]) == 4
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(raw["params"]))
    assert ckpt.restore_config(4)["train"]["debug_nan_step"] == 5
    # The run resumes from it (here with the poison removed) and finishes.
    c.train.debug_nan_step = 0
    assert clip_train.train_and_evaluate(c, tmp_path)["step"] == 8


# Behind --slow (~18 s): accumulation through the one loop is checked fast in test_train_loop.
@pytest.mark.slow
def test_grad_accum_and_bf16(tmp_path):
    c = quick_config(steps=2, grad_accum=2)
    c.model.dtype = "bfloat16"
    r = clip_train.train_and_evaluate(c, tmp_path)
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    kernel = r["state"].params["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.dtype == np.float32  # bf16 compute, fp32 params
    assert rows[1]["loss"] != rows[0]["loss"] and np.isfinite(rows[1]["grad_norm"])
    # The loss is the mean over micro-batches of 8: near log 8 = 2.08 at the start, not log 16 = 2.77.
    assert 0.95 * np.log(8) < rows[0]["loss"] < np.log(12)
    assert r["step"] == 2


# ---------------------------------------------------------------------------
# CLI, SIGTERM.
# ---------------------------------------------------------------------------


# slow (28 s): the train CLI runs fast in test_train_faults.py (subprocess runs, signals) and test_cli_help.py.
@pytest.mark.slow
def test_cli_run_with_overrides(tmp_path):
    from t2i_jax.train import __main__ as cli

    # run() parses argv even if flags were parsed before, and applies `--config.x=v` overrides
    # though sys.argv (pytest's) holds none of them.
    def argv(workdir, steps, devices):
        return ["prog", "--config", str(REPO / "configs" / "clip_shapes.py"), "--workdir", str(workdir),
                f"--config.train.steps={steps}", "--config.batch_size=16", "--config.eval.enabled=False",
                "--config.export=False", "--config.progress=False", "--config.train.log_every=1",
                f"--config.mesh.num_devices={devices}"]

    argv_before = list(sys.argv)
    cli.run(argv(tmp_path / "a", 1, 2))
    cli.run(argv(tmp_path / "b", 2, 1))  # parsed again, with other values
    assert sys.argv == argv_before
    for name, steps, devices in (("a", 1, 2), ("b", 2, 1)):
        rows = metrics_lib.read_jsonl(tmp_path / name / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["train"]["steps"] == steps and saved["batch_size"] == 16
        assert saved["mesh"]["num_devices"] == devices
        assert Checkpointer(tmp_path / name / "checkpoints").all_steps() == [steps]


# Behind --slow (~31 s): signals in the one train loop are checked fast by test_train_faults.py.
@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    cmd = [sys.executable, "-m", "t2i_jax.train", "--config", "configs/clip_shapes.py", "--workdir", str(tmp_path),
           "--config.train.steps=100000", "--config.batch_size=16", "--config.train.log_every=1",
           "--config.train.checkpoint_every=100000", "--config.eval.enabled=False", "--config.export=False",
           "--config.progress=False"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics_path = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 5:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the trainer made no 5 steps in 120 s")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out.decode()[-3000:]  # EXIT_STOPPED: saved, resumable
    assert "stopped: signal" in out.decode()
    rows = metrics_lib.read_jsonl(metrics_path)
    last = rows[-1]["step"]
    assert last >= 5
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [last]
    # Resume in this process: it continues from the saved step.
    c = quick_config(steps=last + 2, checkpoint_every=100000)
    c.batch_size = 16
    r = clip_train.train_and_evaluate(c, tmp_path)
    assert r["step"] == last + 2
    steps = [row["step"] for row in metrics_lib.read_jsonl(metrics_path)]
    assert steps == list(range(1, last + 3))


# ---------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------


def test_flickr_configs():
    c8 = clip_flickr8k.get_config("/data/flickr8k")
    assert (c8.batch_size, c8.optim.lr, c8.train.epochs) == (8, 1e-5, 5.0)
    assert c8.model.init_from == "openai/clip-vit-base-patch32" and c8.data.path == "/data/flickr8k"
    c30 = clip_flickr30k.get_config()
    assert c30.data.name == "flickr30k" and c30.data.path == ""
    with pytest.raises(ValueError, match="needs 'path'"):
        clip_train.make_data(c30, tokenizer=None)
