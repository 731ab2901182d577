"""Bad data in t2i_jax.data: 16-bit and other image modes."""

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from t2i_jax import data

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
