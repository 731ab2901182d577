"""The shared conversion machinery: readers, writer, rules, key mapping."""

import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from t2i_jax import files
from t2i_jax.convert import core


def test_safetensors_round_trip_checked_by_the_reference_library(tmp_path):
    state = {
        "a.weight": np.random.RandomState(0).randn(3, 4).astype(np.float32),
        "b": np.arange(5, dtype=np.int64),
        "half": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
        "bf16": np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16),
        "scalar": np.array(2.5, np.float32),
    }
    core.write_safetensors(state, tmp_path / "x.safetensors", metadata={"format": "pt"})
    ref = safetensors.torch.load_file(tmp_path / "x.safetensors")
    assert ref["scalar"].shape == () and float(ref["scalar"]) == 2.5
    assert ref["bf16"].dtype == torch.bfloat16 and ref["bf16"].float().tolist() == [1.5, -2.25, 3.0]
    np.testing.assert_array_equal(ref["a.weight"].numpy(), state["a.weight"])
    np.testing.assert_array_equal(ref["half"].numpy(), state["half"])
    ours = core.read_safetensors(tmp_path / "x.safetensors")
    for k, v in state.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
        np.testing.assert_array_equal(np.asarray(ours[k]), v)
    # A file written by the reference library reads the same.
    safetensors.numpy.save_file({"w": state["a.weight"]}, tmp_path / "y.safetensors")
    np.testing.assert_array_equal(core.read_safetensors(tmp_path / "y.safetensors")["w"], state["a.weight"])


def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "z.safetensors"
    core.write_safetensors({"old": np.zeros(2, np.float32)}, target)
    before = target.read_bytes()

    def half_then_disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # the header went out, the data did not
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_disk_full)
    with pytest.raises(OSError, match="disk full"):
        core.write_safetensors({"new": np.ones(3, np.float32)}, target)
    assert os.listdir(tmp_path) == ["z.safetensors"]  # no temporary file left
    assert target.read_bytes() == before


def test_unwritable_dtype_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'c' of dtype complex128"):
        core.write_safetensors({"ok": np.zeros(2, np.float32), "c": np.zeros(2, np.complex128)},
                               tmp_path / "c.safetensors")
    assert os.listdir(tmp_path) == []


def test_bf16_file_written_by_torch_reads_as_ml_dtypes_bfloat16(tmp_path):
    t = torch.tensor([[1.5, -2.25], [3.0, 1e-3]]).bfloat16()
    safetensors.torch.save_file({"w": t}, tmp_path / "bf16.safetensors", metadata={"format": "pt"})
    ours = core.read_safetensors(tmp_path / "bf16.safetensors")["w"]
    assert ours.dtype == np.dtype(ml_dtypes.bfloat16) and ours.shape == (2, 2)
    np.testing.assert_array_equal(ours.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))


def test_pickle_reader_unwraps_state_dict_and_bf16(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.tensor([1.0, 2.0]).bfloat16()}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "m.ckpt")
    out = core.read_checkpoint(tmp_path / "m.ckpt")
    assert set(out) == {"w", "h"}
    np.testing.assert_array_equal(out["w"], sd["w"].numpy())
    assert out["h"].dtype == ml_dtypes.bfloat16 and out["h"].astype(np.float32).tolist() == [1.0, 2.0]


def test_weights_dir_variant_and_error(tmp_path):
    core.write_safetensors({"x": np.ones(2, np.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    out = core.read_weights_dir(tmp_path, ["diffusion_pytorch_model"], variant="fp16")
    assert out["x"].dtype == np.float16
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors.*holds "
                                                 r"\['diffusion_pytorch_model\.fp16\.safetensors'\]"):
        core.read_weights_dir(tmp_path, ["diffusion_pytorch_model"])


def test_unknown_suffix(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(core.ConversionError, match=r"unknown checkpoint suffix '\.npz'"):
        core.read_checkpoint(tmp_path / "w.npz")


@pytest.mark.parametrize("path,ndim,key,kind", [
    (("text_model", "encoder", "layers_11", "mlp", "fc1", "kernel"), 2, "text_model.encoder.layers.11.mlp.fc1.weight",
     "linear"),
    (("time_embedding", "linear_1", "kernel"), 2, "time_embedding.linear_1.weight", "linear"),
    (("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "bias"), 1,
     "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.bias", "copy"),
    (("conv_in", "kernel"), 4, "conv_in.weight", "conv"),
    (("norm", "scale"), 1, "norm.weight", "copy"),
    (("embeddings", "class_embedding"), 1, "embeddings.class_embedding", "copy"),
])
def test_key_mapping(path, ndim, key, kind):
    assert core.flax_path_to_torch_key(path, ndim) == (key, kind)


def test_layout_transforms_match_torch_layers():
    rng = np.random.RandomState(0)
    lin = torch.nn.Linear(3, 5)
    x = rng.randn(2, 3).astype(np.float32)
    k = core.torch_to_flax("linear", lin.weight.detach().numpy())
    np.testing.assert_allclose(x @ k + lin.bias.detach().numpy(), lin(torch.tensor(x)).detach().numpy(), rtol=1e-5)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    img = rng.randn(1, 3, 5, 5).astype(np.float32)
    kernel = core.torch_to_flax("conv", conv.weight.detach().numpy())  # HWIO
    patch = img[0, :, :3, :3].transpose(1, 2, 0)  # top-left 3x3 patch, HWC
    np.testing.assert_allclose(np.einsum("hwc,hwco->o", patch, kernel),
                               conv(torch.tensor(img))[0, :, 0, 0].detach().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(core.flax_to_torch("conv", kernel), conv.weight.detach().numpy())


def test_rules_rename_and_transform():
    rules = [
        core.Rule(r"old\.(\d+)\.w", r"new.\1.weight"),
        core.Rule(r"qkv", "attn", transform=lambda k, v: {f"{k}.{n}": p for n, p in zip("qkv", np.split(v, 3))}),
    ]
    out, origin = core.apply_rules({"old.3.w": np.ones(1), "qkv": np.arange(6), "keep": np.zeros(1)}, rules)
    assert sorted(out) == ["attn.k", "attn.q", "attn.v", "keep", "new.3.weight"]
    assert out["attn.v"].tolist() == [4, 5] and origin["attn.k"] == "qkv"
    with pytest.raises(core.ConversionError, match="both map to"):
        core.apply_rules({"old.1.w": np.ones(1), "new.1.weight": np.ones(1)}, rules)


def test_truncated_safetensors_names_file_and_key(tmp_path):
    path = tmp_path / "model.safetensors"
    core.write_safetensors({"a": np.zeros((4, 4), np.float32), "b": np.ones((8, 8), np.float32)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])  # a download cut short
    with pytest.raises(core.ConversionError, match=r"model\.safetensors is truncated: tensor 'b'"):
        core.read_safetensors(path)
    path.write_bytes(raw[:20])  # cut inside the header
    with pytest.raises(core.ConversionError, match=r"model\.safetensors is not a safetensors file"):
        core.read_safetensors(path)


def test_atomic_write_uses_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
