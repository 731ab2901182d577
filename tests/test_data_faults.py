"""Bad data in t2i_jax.data: 16-bit and other image modes, the skip limit (an all-bad or
mostly-bad dataset stops with a message instead of spinning), the skip count, caption files
that are not UTF-8, tfds records that cannot be read."""

import codecs
import io
import json
import os
import re
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from t2i_jax import data
from t2i_jax.data.tfds_source import ADAPTERS

# The runs below take well under a second; the guard only has to be finite (the old loader
# never returned on an all-bad dataset) and generous for a loaded CI machine.
WATCHDOG_S = 120


def _within(fn, seconds=WATCHDOG_S):
    """fn()'s result (or its exception, re-raised), failing the test if it is still running
    after `seconds`: a hang becomes a failure instead of a stuck suite."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds} s: the loader spins instead of stopping")
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---------------------------------------------------------------------------
# Image modes.
# ---------------------------------------------------------------------------


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 [H, W] (gray), [H, W, 3] (RGB) or [H, W, 4] (RGBA), written by hand:
    PIL itself only writes 16-bit grayscale."""
    h, w = arr.shape[:2]
    color_type = {1: 0, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _rounded(v):
    return np.round(np.asarray(v, np.float64) * 255 / 65535).astype(np.uint8)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
    path = str(tmp_path / "ramp16.png")
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"  # what the decoder sees
    want = _rounded(ramp)
    assert want[0, 128] == 0 and want[0, 129] == 1 and want[-1, -1] == 255  # 128/257 rounds down, 129/257 up
    out = data.decode_image(path)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], want)  # the old decoder: 255 for every v >= 255
    # The same values as PIL mode "I" (32-bit; 16-bit PNGs open so in older Pillow), as bytes, as an array.
    tif = io.BytesIO()
    Image.fromarray(ramp.astype(np.int32)).save(tif, format="TIFF")
    assert Image.open(io.BytesIO(tif.getvalue())).mode == "I"
    np.testing.assert_array_equal(data.decode_image(tif.getvalue())[..., 0], want)
    np.testing.assert_array_equal(data.decode_image(ramp)[..., 1], want)
    # Resized: a ramp's mean stays mid-grey (the clipped decode gave 254).
    assert abs(data.decode_image(path, 64).mean() - 127.5) < 1


def test_16bit_rgb_png_within_one_of_rounding():
    # PIL reads 16-bit RGB(A) PNGs as 8-bit itself (the high byte): at most 1 from round(v/257).
    v = np.random.default_rng(0).integers(0, 65536, (6, 5, 3)).astype(np.uint16)
    out = data.decode_image(_png16(v)).astype(int)
    assert np.abs(out - _rounded(v)).max() <= 1
    np.testing.assert_array_equal(out, v >> 8)
    rgba = np.concatenate([v, np.full((6, 5, 1), 65535, np.uint16)], axis=-1)
    np.testing.assert_array_equal(data.decode_image(_png16(rgba)), v >> 8)  # opaque: alpha changes nothing


def _encoded(img, fmt="PNG", **kw):
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def test_alpha_palette_cmyk_and_bilevel():
    def px(img, fmt="PNG"):
        return data.decode_image(_encoded(img, fmt))[0, 0].astype(int).tolist()

    # Alpha is composited over white.
    assert px(Image.new("RGBA", (4, 4), (200, 40, 40, 0))) == [255, 255, 255]
    assert px(Image.new("RGBA", (4, 4), (200, 40, 40, 255))) == [200, 40, 40]
    half = px(Image.new("RGBA", (4, 4), (200, 40, 40, 128)))
    np.testing.assert_allclose(half, [200 * 128 / 255 + 127, 40 * 128 / 255 + 127, 40 * 128 / 255 + 127], atol=1)
    assert px(Image.new("LA", (4, 4), (0, 0))) == [255, 255, 255]
    assert px(Image.new("LA", (4, 4), (0, 255))) == [0, 0, 0]
    # Palette: the entry's colour; a transparent entry is white.
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([10, 20, 30, 90, 150, 210] + [0] * 762)
    assert px(pal) == [90, 150, 210]
    assert data.decode_image(_encoded(pal, transparency=1))[0, 0].tolist() == [255, 255, 255]
    # CMYK (pure cyan + magenta ink = blue) and bilevel.
    cmyk = px(Image.new("CMYK", (16, 16), (255, 255, 0, 0)), "JPEG")
    np.testing.assert_allclose(cmyk, [0, 0, 255], atol=8)
    assert px(Image.new("1", (4, 4), 1)) == [255, 255, 255]
    # Arrays: 4 channels are composited too (the old decoder dropped alpha: [200, 40, 40]).
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (200, 40, 40, 0)
    assert data.decode_image(rgba)[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="image array has dtype float32; expected uint8 .or uint16"):
        data.decode_image(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------------------
# The skip limit and the skip count.
# ---------------------------------------------------------------------------


def _dataset(root, good: int, bad: int, order=None):
    """A JSONL dataset of `good` 8x8 PNGs and `bad` broken files (random bytes, text, a missing
    file, in turn); returns (jsonl path, bad paths). `order`: a string of "g"/"b", the records' order."""
    os.makedirs(root, exist_ok=True)
    order = order or "g" * good + "b" * bad
    assert order.count("g") == good and order.count("b") == bad
    rows, bad_paths, rng = [], [], np.random.default_rng(0)
    for i, kind in enumerate(order):
        name = f"{i:03d}.png"
        path = os.path.join(root, name)
        if kind == "g":
            Image.new("RGB", (8, 8), (10 * i % 250, 100, 50)).save(path)
        else:
            which = len(bad_paths) % 3
            if which == 0:
                with open(path, "wb") as f:
                    f.write(rng.bytes(200))
            elif which == 1:
                with open(path, "w") as f:
                    f.write("not an image\n")
            bad_paths.append(path)
        rows.append({"image": name, "caption": f"record {i}"})
    jsonl = os.path.join(root, "captions.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return jsonl, bad_paths


def _loader(source, **kw):
    kw = {"global_batch_size": 2, "seed": 0, "resolution": 8, "shard_index": 0, "shard_count": 1,
          "read_threads": 2, "read_buffer": 8, **kw}
    return data.make_loader(source, **kw)


def test_all_bad_dataset_stops_with_a_message(tmp_path):
    jsonl, bad = _dataset(tmp_path / "ds", good=0, bad=6)
    loader = _loader(data.jsonl_source(jsonl))  # endless epochs: the old loader never returned
    with pytest.raises(data.TooManyBadImages) as e:
        _within(lambda: next(iter(loader)))
    msg = str(e.value)
    # The first-records check, capped at the 6 records there are.
    assert "none of the first 6 records read by this process has an image that loads" in msg
    assert "6 skipped in all so far" in msg and loader.skipped_count() == 6
    # Five of the six named (the most recent distinct ones), each with its reason: 4 of the 6
    # are not images, 2 are missing, so both reasons appear.
    named = [p for p in bad if p in msg]
    assert len(named) == 5 and all(re.search(rf"{re.escape(p)} \((UnidentifiedImageError|FileNotFoundError): ", msg)
                                   for p in named)
    assert "(UnidentifiedImageError: cannot identify image file" in msg and "(FileNotFoundError: " in msg
    assert "data.first_good_within=0" in msg

    # The window check alone, set through the data config.
    loader = data.from_config({"name": "jsonl", "path": jsonl, "resolution": 8, "global_batch_size": 2,
                               "first_good_within": 0, "bad_window": 4, "max_bad_fraction": 0.5},
                              shard_index=0, shard_count=1)
    with pytest.raises(data.TooManyBadImages, match=r"3 of the last 3 records read by this process have images "
                                                    r"that do not load, more than data.max_bad_fraction=0.5 of "
                                                    r"data.bad_window=4; 3 skipped in all so far"):
        _within(lambda: next(iter(loader)))


def test_mostly_bad_dataset_stops_a_few_bad_ones_are_counted(tmp_path):
    # 6 bad in 10 (some good ones first, so the first-records check passes): the window
    # (10 records, more than half bad) stops it at the 6th bad record, within the first epoch.
    jsonl, _ = _dataset(tmp_path / "mostly", good=4, bad=6, order="gbbgbgbbgb")
    loader = _loader(data.jsonl_source(jsonl), shuffle=False, bad_window=10)
    it = iter(loader)
    with pytest.raises(data.TooManyBadImages, match="6 of the last 10 records"):
        _within(lambda: [next(it) for _ in range(100)])
    assert loader.skipped_count() == 6

    # 2 bad in 20, three epochs, default limits: every good record arrives, each bad one is
    # counted once per epoch, and the count is readable between batches.
    jsonl, bad = _dataset(tmp_path / "few", good=18, bad=2, order="g" * 5 + "b" + "g" * 9 + "b" + "g" * 4)
    loader = _loader(data.jsonl_source(jsonl), num_epochs=3)
    it = iter(loader)
    first = next(it)
    assert first["image"].shape == (2, 8, 8, 3) and 0 <= loader.skipped_count() <= 2
    batches = [first, *_within(lambda: list(it))]
    assert len(batches) == 27  # 54 good records
    assert loader.skipped_count() == 6
    assert sorted({k for k, _ in loader.skips.skipped}) == sorted(bad)


def test_skip_limit_config_errors():
    with pytest.raises(ValueError, match=r"bad_window 0 must be an int >= 1; the default is 1000"):
        data.SkipLimit(bad_window=0)
    with pytest.raises(ValueError, match=r"first_good_within -1 must be an int >= 0"):
        data.SkipLimit(first_good_within=-1)
    with pytest.raises(ValueError, match=r"max_bad_fraction -0.1 must be a fraction in \[0, 1\)"):
        data.SkipLimit(max_bad_fraction=-0.1)


def test_file_backed_skip_count_reads_only_whole_new_lines(tmp_path):
    import pickle

    path = tmp_path / "skipped.tsv"
    log = data.SkipLog(path)
    worker = pickle.loads(pickle.dumps(log))  # a grain worker's copy
    assert log.count == 0
    log.add("/x/a.png", "OSError: bad")
    worker.add("/x/b.png", "missing")
    assert log.count == 2 and worker.count == 2
    with open(path, "a") as f:  # a line another process is still writing
        f.write("/x/c.png\tpart")
    assert log.count == 2
    with open(path, "a") as f:
        f.write("ial\n")
    assert log.count == 3 and log.skipped[-1] == ("/x/c.png", "partial")


def test_worker_processes_stop_and_count(tmp_path):
    # grain worker processes: each checks its own records; the error reaches this process, and
    # the counts of all processes add up (file-backed SkipLog).
    jsonl, bad = _dataset(tmp_path / "bad", good=0, bad=4)
    loader = _loader(data.jsonl_source(jsonl), worker_count=1)
    with pytest.raises(data.TooManyBadImages, match=r"none of the first 4 records read by this process"):
        _within(lambda: next(iter(loader)))
    jsonl, bad = _dataset(tmp_path / "few", good=7, bad=1, order="ggbggggg")
    loader = _loader(data.jsonl_source(jsonl), num_epochs=2, worker_count=1)
    batches = _within(lambda: list(iter(loader)))
    assert len(batches) == 7 and loader.skipped_count() == 2
    assert [k for k, _ in loader.skips.skipped] == bad * 2  # written by the worker, read here


# ---------------------------------------------------------------------------
# tfds records that cannot be read.
# ---------------------------------------------------------------------------


def test_tfds_record_that_cannot_be_read_is_skipped():
    src = data.TfdsSource.__new__(data.TfdsSource)  # a prepared dataset's stand-in (no tfds build)
    src.name, src.split, src.data_dir, src._adapter = "tiny", "train", None, ADAPTERS["coco_captions"]
    png = _encoded(Image.new("RGB", (8, 8), (1, 2, 3)))
    src._source = [{"image": png, "captions": {"text": [b"a cat", b"a dog"]}},
                   {"image": png, "captions": {"text": [b"caf\xe9"]}},  # not UTF-8
                   {"image": png}]  # no captions
    assert src[0]["captions"] == ["a cat", "a dog"]
    bad = src[1]
    assert bad["key"] == "tiny/train/1" and bad["error"].startswith("UnicodeDecodeError")
    assert src[2]["error"].startswith("KeyError")
    batches = list(iter(_loader(src, global_batch_size=1, num_epochs=1, first_good_within=0)))
    assert len(batches) == 1 and batches[0]["key"].tolist() == ["tiny/train/0"]


# ---------------------------------------------------------------------------
# Caption files that are not UTF-8.
# ---------------------------------------------------------------------------

LATIN1 = "Un caf\xe9 au lait".encode("latin-1")  # b"\xe9": not UTF-8


def _caption_file(tmp_path, fmt):
    """(the function that reads it, the file with a Latin-1 byte on line 3)."""
    img = tmp_path / "images"
    img.mkdir()
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_bytes(b'{"image": "a.jpg", "caption": "ok"}\n\n{"image": "b.jpg", "caption": "' + LATIN1 + b'"}\n')
        return lambda: data.jsonl_source(path, images=img), path
    if fmt == "csv":
        path = tmp_path / "c.csv"
        path.write_bytes(b"image,caption\na.jpg,ok\nb.jpg," + LATIN1 + b"\n")
        return lambda: data.csv_source(path, images=img), path
    if fmt == "flickr8k":
        (tmp_path / "Images").mkdir()
        path = tmp_path / "captions.txt"
        path.write_bytes(b"image,caption\na.jpg,ok\nb.jpg," + LATIN1 + b"\n")
        return lambda: data.flickr8k(tmp_path), path
    if fmt == "flickr30k":
        (tmp_path / "flickr30k_images").mkdir()
        path = tmp_path / "results.csv"
        path.write_bytes(b"image_name| comment_number| comment\na.jpg| 0| ok\nb.jpg| 0| " + LATIN1 + b"\n")
        return lambda: data.flickr30k(tmp_path), path
    assert fmt == "coco"
    path = tmp_path / "captions_val.json"
    path.write_bytes(b'{"images": [{"id": 1, "file_name": "a.jpg"}],\n "annotations": [\n  {"image_id": 1, '
                     b'"caption": "' + LATIN1 + b'"}]}\n')
    return lambda: data.coco_captions(path, img), path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "flickr8k", "flickr30k", "coco"])
def test_caption_file_not_utf8_names_file_and_line(tmp_path, fmt):
    read, path = _caption_file(tmp_path, fmt)
    with pytest.raises(ValueError) as e:
        read()
    msg = str(e.value)
    # The old readers raised a bare UnicodeDecodeError naming neither.
    byte = path.read_bytes().split(b"\n")[2].index(b"\xe9") + 1
    assert f"captions file {path} line 3 is not UTF-8: byte {byte} of the line is b'\\xe9'" in msg, msg
    assert "Re-encode the file as UTF-8" in msg and "iconv -f latin1 -t utf-8" in msg
    assert not isinstance(e.value, UnicodeDecodeError)


def test_caption_files_with_a_bom(tmp_path):
    # A UTF-8 byte-order mark (Excel and Notepad write one) is not part of the first column's name.
    (tmp_path / "c.csv").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("utf-8-sig"))
    src = data.csv_source(tmp_path / "c.csv")
    assert src[0]["captions"] == ["caf\xe9"] and src[0]["key"] == "a.jpg"
    (tmp_path / "c.jsonl").write_bytes('{"image": "a.jpg", "caption": "ok"}\n'.encode("utf-8-sig"))
    assert data.jsonl_source(tmp_path / "c.jsonl")[0]["captions"] == ["ok"]
    # The byte named in an error counts the BOM too (it is in the file).
    (tmp_path / "c.json").write_bytes(codecs.BOM_UTF8 + b'{"x\xff": 1}')
    with pytest.raises(ValueError, match=r"c.json line 1 is not UTF-8: byte 7 of the line is b'\\xff'"):
        data.coco_captions(tmp_path / "c.json", tmp_path)
