"""t2i_jax.data: sources on tiny fixtures built here, transforms, loader determinism,
sharding, checkpoint round trips, bad-image skipping and config errors."""

import json
import logging
import os

import grain
import numpy as np
import pytest
from PIL import Image

from t2i_jax import data
from t2i_jax.data import shapes as shapes_lib
from t2i_jax.data.tfds_source import ADAPTERS

# ---------------------------------------------------------------------------
# Fixture helpers: every image is one flat colour, so a decoded batch says
# which file it came from.
# ---------------------------------------------------------------------------

COLOR_OF = {  # file -> RGB
    "a.jpg": (200, 40, 40),
    "b.png": (40, 200, 40),
    "c.png": (40, 40, 200),
    "d.jpg": (200, 200, 40),
    "e.png": (40, 200, 200),
    "f.png": (200, 40, 200),
}


def _write_image(path, rgb, size=(24, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.new("RGB", size, rgb)
    img.save(path, format="JPEG" if path.endswith(".jpg") else "PNG", quality=95)


def _write_images(folder, names=COLOR_OF):
    for name in names:
        _write_image(os.path.join(folder, name), COLOR_OF[name])


def _color_name(image):
    """The fixture file whose colour is closest to a decoded [-1, 1] image."""
    rgb = (np.asarray(image).reshape(-1, 3).mean(0) + 1) * 127.5
    return min(COLOR_OF, key=lambda n: np.abs(np.array(COLOR_OF[n]) - rgb).sum())


FLICKR8K_ROWS = [
    ("a.jpg", "A dog runs ."),
    ("a.jpg", "A brown dog is running"),
    ("b.png", "Two kids, one ball"),  # quoted by the csv writer
    ("b.png", "Kids play"),
    ("c.png", "A red car"),
    ("d.jpg", "A man on a bench"),
    ("e.png", "A cat"),
    ("e.png", "A sleeping cat"),
    ("e.png", "A cat on a sofa"),
    ("f.png", "Mountains"),
]


def _flickr8k(root, rows=FLICKR8K_ROWS, images=COLOR_OF):
    import csv

    _write_images(os.path.join(root, "Images"), images)
    with open(os.path.join(root, "captions.txt"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return str(root)


def _expected(rows):
    out = {}
    for img, cap in rows:
        out.setdefault(img, []).append(cap)
    return out


def _epoch(loader, n_batches):
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]


def _loader(source, **kw):
    kw = {"global_batch_size": 2, "seed": 0, "resolution": 8, "shard_index": 0, "shard_count": 1,
          "read_threads": 2, "read_buffer": 8, **kw}
    return data.make_loader(source, **kw)


# ---------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------


def test_flickr8k_source_and_loader(tmp_path):
    root = _flickr8k(tmp_path / "flickr8k")
    # An unquoted caption with a comma, as in some copies of the file.
    with open(os.path.join(root, "captions.txt"), "a") as f:
        f.write("f.png,Snowy mountains, blue sky\n")
    src = data.flickr8k(root)
    want = _expected(FLICKR8K_ROWS + [("f.png", "Snowy mountains, blue sky")])
    assert len(src) == 6 and src.num_captions == 11
    assert {src[i]["key"]: src[i]["captions"] for i in range(len(src))} == want
    assert src[0]["image"] == os.path.join(root, "Images", "a.jpg")

    # Through the loader: float32 [-1, 1] NHWC, and each caption belongs to its image.
    batches = _epoch(_loader(src, num_epochs=1, global_batch_size=3, resolution=8), 2)
    for b in batches:
        assert b["image"].shape == (3, 8, 8, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        for img, cap, key in zip(b["image"], b["caption"], b["key"]):
            assert cap in want[key] and _color_name(img) == key
    assert sorted(k for b in batches for k in b["key"]) == sorted(COLOR_OF)


def test_flickr30k_source(tmp_path):
    root = tmp_path / "flickr30k"
    _write_images(root / "flickr30k_images", ["a.jpg", "b.png"])
    (root / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "a.jpg| 0| A dog runs across the grass .\n"
        "a.jpg| 1| A  dog | with a stick\n"  # a '|' inside the comment stays
        "b.png| 0| Two people\n"
        "b.png| 4 A broken row without the second separator .\n"  # as in the Kaggle file
    )
    src = data.flickr30k(root)
    assert len(src) == 2
    assert {src[i]["key"]: src[i]["captions"] for i in range(2)} == {
        "a.jpg": ["A dog runs across the grass .", "A dog | with a stick"],
        "b.png": ["Two people", "A broken row without the second separator ."],
    }
    assert src[1]["image"] == os.path.join(root, "flickr30k_images", "b.png")


def test_coco_source(tmp_path):
    _write_images(tmp_path / "train2017", ["a.jpg", "b.png", "c.png"])
    ann = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.png"}, {"id": 9, "file_name": "c.png"}],
        "annotations": [{"id": 1, "image_id": 3, "caption": "Kids play."}, {"id": 2, "image_id": 7, "caption": "A dog"},
                        {"id": 5, "image_id": 3, "caption": " Two kids\n"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(ann))
    src = data.source_from_config({"name": "coco", "path": str(tmp_path), "resolution": 8})
    # c.png has no caption: left out. Order follows `images`.
    assert len(src) == 2
    assert [src[i]["key"] for i in range(2)] == ["a.jpg", "b.png"]
    assert src[1]["captions"] == ["Kids play.", "Two kids"]
    assert src[0]["image"] == os.path.join(tmp_path, "train2017", "a.jpg")


def test_jsonl_and_csv_sources(tmp_path):
    _write_images(tmp_path / "imgs", ["a.jpg", "b.png"])
    _write_images(tmp_path / "elsewhere", ["c.png"])
    abs_c = str(tmp_path / "elsewhere" / "c.png")
    lines = [{"image": "imgs/a.jpg", "caption": "one"}, {"image": "imgs/b.png", "caption": ["two", "deux"]},
             {"image": abs_c, "caption": "three"}, {"image": "imgs/a.jpg", "caption": "uno"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = data.jsonl_source(tmp_path / "d.jsonl")
    assert len(src) == 3
    assert [src[i]["captions"] for i in range(3)] == [["one", "uno"], ["two", "deux"], ["three"]]
    assert src[0]["image"] == str(tmp_path / "imgs" / "a.jpg") and src[2]["image"] == abs_c

    (tmp_path / "d.csv").write_text("file,text,extra\nimgs/a.jpg,hello,x\nimgs/b.png,\"hi, there\",y\n")
    src = data.csv_source(tmp_path / "d.csv", image_column="file", caption_column="text")
    assert [(src[i]["key"], src[i]["captions"]) for i in range(2)] == [("imgs/a.jpg", ["hello"]),
                                                                        ("imgs/b.png", ["hi, there"])]
    batch = next(iter(_loader(src, num_epochs=1, shuffle=False)))
    assert [_color_name(x) for x in batch["image"]] == ["a.jpg", "b.png"]


TFDS_BUILDER = '''
import io
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds


def _png(value):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((6, 10, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class T2iTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Four images with coco-style captions and celeb_a-style attributes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
            "attributes": {"Smiling": np.bool_, "Male": np.bool_, "Eyeglasses": np.bool_},
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            # PNG bytes: encoding numpy images would need TensorFlow.
            yield i, {"image": _png(40 * i), "captions": [{"id": 10 * i + j, "text": f"cap {i} {j}"} for j in range(2)],
                      "attributes": {"Smiling": i % 2 == 1, "Male": i >= 2, "Eyeglasses": i == 3}}
'''


def test_tfds_source(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg" / "t2i_tiny_captions"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .builder import T2iTinyCaptions\n")
    (pkg / "builder.py").write_text(TFDS_BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    import t2i_tiny_captions

    data_dir = str(tmp_path / "tfds")
    t2i_tiny_captions.T2iTinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()

    src = data.TfdsSource("t2i_tiny_captions", split="train", data_dir=data_dir, adapter=ADAPTERS["coco_captions"])
    assert len(src) == 4
    records = [src[i] for i in range(4)]
    assert all(isinstance(r["image"], bytes) for r in records)  # decoded by the pipeline, not tfds
    by_i = {int(r["captions"][0].split()[1]): r for r in records}
    assert sorted(by_i) == [0, 1, 2, 3]
    for i, r in by_i.items():
        assert r["captions"] == [f"cap {i} 0", f"cap {i} 1"]
        assert np.all(data.decode_image(r["image"]) == 40 * i)

    # The same data through the config path, the loader, and the celeb_a adapter.
    loader = data.from_config({"name": "tfds", "dataset": "t2i_tiny_captions", "data_dir": data_dir, "resolution": 6,
                               "global_batch_size": 4, "num_epochs": 1}, shard_index=0, shard_count=1)
    (batch,) = _epoch(loader, 1)
    for img, cap in zip(batch["image"], batch["caption"]):
        i = int(cap.split()[1])
        np.testing.assert_allclose(img, 40 * i / 127.5 - 1, atol=1e-6)
    celeb = data.TfdsSource("t2i_tiny_captions", split="train", data_dir=data_dir, adapter=ADAPTERS["celeb_a"])
    assert sorted(celeb[i]["captions"][0] for i in range(4)) == [
        "a photo of a man", "a photo of a smiling man with eyeglasses", "a photo of a smiling woman",
        "a photo of a woman"]

    with pytest.raises(FileNotFoundError, match="tfds dataset 'no_such_dataset_xyz'.*array_record"):
        data.TfdsSource("no_such_dataset_xyz", data_dir=data_dir)


def test_celeba_caption():
    assert data.celeba_caption({"Smiling": True, "Male": False, "Blond_Hair": True, "Eyeglasses": True}) == (
        "a photo of a smiling woman with blond hair and eyeglasses")
    # CelebA's raw +1/-1 values, hair style + colour, a beard from No_Beard = -1.
    assert data.celeba_caption({"Male": 1, "Young": 1, "Smiling": -1, "Wavy_Hair": 1, "Brown_Hair": 1,
                                "No_Beard": -1, "Wearing_Hat": 1, "Eyeglasses": -1}) == (
        "a photo of a young man with wavy brown hair, a hat and a beard")
    assert data.celeba_caption({"Male": np.bool_(False), "No_Beard": True}) == "a photo of a woman"


# ---------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------


def test_shapes_caption_matches_pixels():
    src = data.ShapesSource(48, seed=3, length=300)
    seen = set()
    for i in range(300):
        r, a = src[i], src.attributes(i)
        img = r["image"]
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert r["captions"][0] == f"a {a['size']} {a['color']} {a['shape']} on a {a['background']} background"
        bg, fg = np.array(data.COLORS[a["background"]]), np.array(data.COLORS[a["color"]])
        for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            np.testing.assert_array_equal(corner, bg)
        cy, cx = a["center"]
        np.testing.assert_array_equal(img[int(cy), int(cx)], fg)
        # Only the two colours appear, and the shape covers its analytic area (size = extent / side).
        assert np.all(np.all(img == fg, -1) | np.all(img == bg, -1))
        frac = np.all(img == fg, axis=-1).mean()
        area = data.SIZES[a["size"]] ** 2 * {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[a["shape"]]
        assert abs(frac / area - 1) < 0.15, (a, frac, area)
        seen.add((a["shape"], a["size"]))
    assert len(seen) == 9  # every shape at every size was drawn


def test_shapes_splits_and_determinism():
    holdout = set(shapes_lib.DEFAULT_HOLDOUT)
    train = data.ShapesSource(32, split="train", seed=0)
    assert len(train) == 2**31 - 1  # endless
    pairs = {(train.attributes(i)["shape"], train.attributes(i)["color"]) for i in range(600)}
    assert not pairs & holdout and len(pairs) == 3 * 8 - 4
    held = data.ShapesSource(32, split="holdout", seed=0, length=50)
    assert {(held.attributes(i)["shape"], held.attributes(i)["color"]) for i in range(50)} == holdout
    # Deterministic per (seed, split, index); different seeds / splits give other images.
    again = data.ShapesSource(32, split="train", seed=0, length=10)
    np.testing.assert_array_equal(train[5]["image"], again[5]["image"])
    other_seed = data.ShapesSource(32, split="train", seed=1)
    evals = data.ShapesSource(32, split="eval", seed=0)
    assert sum(np.array_equal(train[i]["image"], other_seed[i]["image"]) for i in range(20)) < 3
    assert sum(np.array_equal(train[i]["image"], evals[i]["image"]) for i in range(20)) < 3
    # Any resolution; the same attributes scale with it.
    big = data.ShapesSource(96, split="train", seed=0)
    assert big[5]["image"].shape == (96, 96, 3) and big[5]["captions"] == train[5]["captions"]
    with pytest.raises(ValueError, match=r"unknown shapes split 'test'; choose from \['train', 'eval', 'holdout'\]"):
        data.ShapesSource(32, split="test")


# ---------------------------------------------------------------------------
# Loader: determinism, sharding, checkpoints.
# ---------------------------------------------------------------------------


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_loader_determinism_and_sharding():
    src = data.ShapesSource(16, length=24)
    run = lambda **kw: _epoch(_loader(src, global_batch_size=4, resolution=16, random_flip=True, **kw), 12)
    a, b, c = run(seed=5), run(seed=5), run(seed=6)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert _keys(a) != _keys(c)
    # Each epoch is a permutation of all records, reshuffled every epoch.
    assert sorted(_keys(a)[:24]) == sorted(_keys(a)[24:]) == sorted(f"shapes/train/{i}" for i in range(24))
    assert _keys(a)[:24] != _keys(a)[24:]

    shards = [_epoch(_loader(src, global_batch_size=4, resolution=16, seed=5, num_epochs=1, shard_index=i,
                             shard_count=2), 6) for i in range(2)]
    assert all(b["image"].shape[0] == 2 for s in shards for b in s)  # per-host batch = 4 // 2
    k0, k1 = set(_keys(shards[0])), set(_keys(shards[1]))
    assert len(k0) == len(k1) == 12 and not k0 & k1 and k0 | k1 == {f"shapes/train/{i}" for i in range(24)}
    it = iter(_loader(src, global_batch_size=10, resolution=16, num_epochs=1))
    next(it), next(it)
    with pytest.raises(StopIteration):  # num_epochs=1 ends (the last 4 records do not fill a batch)
        next(it)


def test_random_caption_crop_and_flip(tmp_path):
    rows = [("e.png", f"cat {j}") for j in range(5)] + [("a.jpg", f"dog {j}") for j in range(5)]
    root = _flickr8k(tmp_path / "f8k", rows, images=["a.jpg", "e.png"])
    # A left/right asymmetric image for the flip check.
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, :12] = 255
    Image.fromarray(img).save(os.path.join(root, "Images", "a.jpg"), format="PNG")
    src = data.flickr8k(root)
    loader = _loader(src, global_batch_size=2, resolution=12, random_crop=True, random_flip=True)
    batches = _epoch(loader, 8)
    caps = {}
    for b in batches:
        for cap, key in zip(b["caption"], b["key"]):
            caps.setdefault(key, []).append(str(cap))
    # One caption per image per epoch, drawn anew each epoch.
    assert len(set(caps["a.jpg"])) > 1 and set(caps["a.jpg"]) <= {f"dog {j}" for j in range(5)}
    assert np.array_equal(_epoch(loader, 8)[7]["image"], batches[7]["image"])
    # Random crop (shorter side 12 -> 12x18, crop 12x12) + flip: the white half moves around.
    cols = [tuple((im.mean(axis=(0, 2)) > 0).tolist()) for b in batches for im, k in zip(b["image"], b["key"])
            if k == "a.jpg"]
    assert len(cols) == 8 and len(set(cols)) > 2
    assert any(c[0] for c in cols) and any(not c[0] for c in cols)  # white on the left, and on the right


def test_iterator_state_round_trip():
    src = data.ShapesSource(16, length=20)
    make = lambda: _loader(src, global_batch_size=3, resolution=16, seed=11, random_flip=True, random_crop=True)
    it = iter(make())
    assert "PyGrainDatasetIterator" in str(it)
    for _ in range(4):
        next(it)
    state, state_dict = it.get_state(), data.iterator_state(it)
    assert state_dict["last_seen_indices"] == {"0": 11}  # 4 batches of 3 read
    rest = [next(it) for _ in range(9)]  # crosses an epoch boundary
    for restored in (make().restore(state), make().restore(json.dumps(state_dict)), make().restore(state_dict)):
        for want in rest:
            got = next(restored)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


def test_orbax_checkpoint_of_iterator(tmp_path):
    import orbax.checkpoint as ocp

    src = data.ShapesSource(16, length=20)
    make = lambda: _loader(src, global_batch_size=2, resolution=16, seed=2)
    it = iter(make())
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                                 item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it)["key"] for _ in range(4)]
    fresh = iter(make())
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert [list(next(fresh)["key"]) for _ in range(4)] == [list(w) for w in want]
    mngr.close()


# ---------------------------------------------------------------------------
# Bad images, tokenization, config.
# ---------------------------------------------------------------------------


def test_corrupt_and_missing_images_are_skipped(tmp_path, caplog):
    rows = FLICKR8K_ROWS + [("broken.jpg", "random bytes"), ("gone.png", "not on disk")]
    root = _flickr8k(tmp_path / "f8k", rows)
    broken = os.path.join(root, "Images", "broken.jpg")
    with open(broken, "wb") as f:
        f.write(np.random.default_rng(0).bytes(300))
    gone = os.path.join(root, "Images", "gone.png")
    src = data.flickr8k(root)
    assert len(src) == 8
    loader = _loader(src, global_batch_size=2, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="t2i_jax.data.transforms"):
        batches = list(iter(loader))
    assert sorted(_keys(batches)) == sorted(COLOR_OF)  # the 6 good ones, 3 full batches
    assert loader.skips.count == 2
    assert sorted(p for p, _ in loader.skips.skipped) == sorted([broken, gone])
    text = caplog.text
    assert f"skipping image {broken}" in text and f"skipping image {gone}" in text
    assert "FileNotFoundError" in dict(loader.skips.skipped)[gone]


def test_skip_log_file_backed(tmp_path):
    import pickle

    log = data.SkipLog(tmp_path / "skipped.tsv")
    clone = pickle.loads(pickle.dumps(log))  # what a grain worker process gets
    log.add("/x/a.jpg", "OSError: bad\nfile")
    clone.add("/x/b.jpg", "missing")
    assert log.count == clone.count == 2
    assert log.skipped == [("/x/a.jpg", "OSError: bad file"), ("/x/b.jpg", "missing")]


def test_tokenized_batches():
    from t2i_jax.tokenizer import Tokenizer

    tok = Tokenizer.bundled()
    src = data.ShapesSource(16, length=8)
    (batch,) = _epoch(_loader(src, global_batch_size=4, resolution=16, tokenizer=tok), 1)
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], tok([str(c) for c in batch["caption"]]))
    assert batch["input_ids"][0, 0] == 49406


def test_from_config_shapes_and_resize():
    import ml_collections

    cfg = ml_collections.ConfigDict({"name": "shapes", "resolution": 16, "global_batch_size": 4, "seed": 1,
                                     "split": "holdout", "length": 12, "holdout": [("square", "red")]})
    loader = data.from_config(cfg, shard_index=0, shard_count=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert set(batch["shape"]) == {"square"} and set(batch["color"]) == {"red"}
    # Shapes drawn at 32 and resized to 16: the corner keeps the background colour.
    src = data.ShapesSource(32, length=4)
    (b,) = _epoch(_loader(src, global_batch_size=4, resolution=16, shuffle=False), 1)
    for img, bg in zip(b["image"], b["background"]):
        np.testing.assert_allclose((img[0, 0] + 1) * 127.5, data.COLORS[bg], atol=1)


def test_config_and_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data source name 'imagenet'; choose one of \['shapes', 'flickr8k', "
                                         r"'flickr30k', 'coco', 'jsonl', 'csv', 'tfds'\]"):
        data.from_config({"name": "imagenet", "resolution": 8, "global_batch_size": 2})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['resolutoin'\] in the 'shapes' data config"):
        data.from_config({"name": "shapes", "resolutoin": 8, "global_batch_size": 2})

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"Flickr8k folder {missing} does not exist.*captions.txt and Images/"):
        data.from_config({"name": "flickr8k", "path": str(missing), "resolution": 8, "global_batch_size": 2})
    (tmp_path / "f8k" / "Images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Flickr8k captions file .*captions.txt does not exist"):
        data.flickr8k(tmp_path / "f8k")
    (tmp_path / "f8k" / "captions.txt").write_text("filename,text\na.jpg,hi\n")
    with pytest.raises(ValueError) as e:
        data.flickr8k(tmp_path / "f8k")
    assert str(e.value).startswith(f"captions file {tmp_path / 'f8k' / 'captions.txt'} has columns "
                                   "['filename', 'text']; expected columns ['image', 'caption']")

    (tmp_path / "f30k" / "flickr30k_images").mkdir(parents=True)
    (tmp_path / "f30k" / "results.csv").write_text("image,caption\na.jpg,hi\n")
    with pytest.raises(ValueError, match=r"results.csv has columns \['image,caption'\]; expected columns "
                                         r"\['image_name', 'comment_number', 'comment'\]"):
        data.flickr30k(tmp_path / "f30k")

    (tmp_path / "bad.jsonl").write_text('{"img": "a.jpg", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 1 has keys \['caption', 'img'\]; expected keys "
                                         r"\['image', 'caption'\]"):
        data.jsonl_source(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="COCO captions file .*captions_val2017.json does not exist"):
        data.from_config({"name": "coco", "path": str(tmp_path), "split": "val2017", "resolution": 8,
                          "global_batch_size": 2})
    with pytest.raises(ValueError, match="global_batch_size 6 is not a positive multiple of the 4 hosts; use 4"):
        _loader(data.ShapesSource(16, length=40), global_batch_size=6, shard_count=4)
