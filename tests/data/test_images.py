import io

import numpy as np
import pytest
from PIL import Image

from idml.data import InvalidImageError, decode_image, normalize_image_bytes

from support import image_bytes


def _decode_reason(data, **kwargs):
    with pytest.raises(InvalidImageError) as e:
        decode_image(data, **kwargs)
    return e.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = image_bytes(fmt, size=(32, 32))
    assert _decode_reason(data[: len(data) // 2]) == "truncated"
    with pytest.raises(InvalidImageError):
        normalize_image_bytes(data[: len(data) // 2])


def test_zero_bytes_and_text():
    assert _decode_reason(b"") == "empty file"
    assert _decode_reason(b"this is a text file named photo.jpg\n") == "not an image"
    assert isinstance(InvalidImageError("x"), ValueError)


def test_rgb_passthrough():
    for fmt in ("PNG", "JPEG"):
        data = image_bytes(fmt)
        im = decode_image(data)
        assert im.mode == "RGB" and im.size == (12, 10)
        assert normalize_image_bytes(data) is data


def test_cmyk_jpeg():
    data = image_bytes("JPEG", mode="CMYK", color=(0, 255, 255, 0))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    im = decode_image(data)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red
    out = normalize_image_bytes(data)
    assert out != data and Image.open(io.BytesIO(out)).format == "PNG"
    assert Image.open(io.BytesIO(out)).mode == "RGB"


def test_palette_with_transparency_on_white():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0] + [255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))
    out = io.BytesIO()
    im.save(out, format="PNG", transparency=0)
    data = out.getvalue()
    rgb = decode_image(data)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 0, 0)
    assert rgb.getpixel((6, 6)) == (255, 255, 255)  # transparent black -> white
    norm = Image.open(io.BytesIO(normalize_image_bytes(data)))
    assert norm.mode == "RGB" and norm.getpixel((6, 6)) == (255, 255, 255)


def test_16bit_png():
    a = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    data = out.getvalue()
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    rgb = decode_image(data)
    assert rgb.mode == "RGB"
    px = np.asarray(rgb)
    assert px[0, 0, 0] == 0 and px[-1, -1, 0] == 255  # full range, not clipped to white
    assert 100 < px[4, 0, 0] < 160


def test_32bit_int_and_float_modes():
    i32 = Image.fromarray(np.full((4, 4), 40000, np.int32))
    assert decode_image(_tiff(i32)).getpixel((0, 0)) == (155, 155, 155)
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert decode_image(_tiff(f)).getpixel((0, 0)) == (127, 127, 127)


def _tiff(im):
    out = io.BytesIO()
    im.save(out, format="TIFF")
    return out.getvalue()


def test_grayscale_and_la():
    gray = decode_image(image_bytes("PNG", mode="L", color=77))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    la = decode_image(image_bytes("PNG", mode="LA", color=(0, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)


def test_rgba_transparent_pixel_becomes_white():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 255, 255))
    im.putpixel((2, 2), (0, 0, 0, 128))
    out = io.BytesIO()
    im.save(out, format="PNG")
    rgb = decode_image(out.getvalue())
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (0, 0, 255)
    assert 120 <= rgb.getpixel((2, 2))[0] <= 135  # half-transparent black on white is grey


def test_bomb_guard():
    data = image_bytes("PNG", size=(100, 100))
    assert _decode_reason(data, max_pixels=5000) == "too large"
    with pytest.raises(InvalidImageError, match="max_pixels"):
        normalize_image_bytes(data, max_pixels=9999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


def test_bomb_beyond_pil_limit_is_invalid_image_error():
    # Header claims 30000x30000 (> 2x PIL's own limit): must not surface as PIL's error type.
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    assert _decode_reason(png, max_pixels=10**12) == "too large"
    assert _decode_reason(png) == "too large"


def test_normalize_downscales_and_reencodes():
    data = image_bytes("JPEG", size=(40, 20))
    assert normalize_image_bytes(data, max_side=40) is data
    small = Image.open(io.BytesIO(normalize_image_bytes(data, max_side=10)))
    assert small.format == "PNG" and small.size == (10, 5) and small.mode == "RGB"
    gif = image_bytes("GIF", size=(6, 6), color=3, mode="P")
    out = Image.open(io.BytesIO(normalize_image_bytes(gif)))
    assert out.format == "PNG" and out.mode == "RGB"
    for fmt in ("BMP", "WEBP", "TIFF"):
        out = Image.open(io.BytesIO(normalize_image_bytes(image_bytes(fmt))))
        assert out.format == "PNG" and out.mode == "RGB"


def test_exif_orientation_applied():
    im = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = io.BytesIO()
    im.save(out, format="JPEG", exif=exif.tobytes())
    data = out.getvalue()
    assert decode_image(data).size == (10, 20)
    norm = Image.open(io.BytesIO(normalize_image_bytes(data)))
    assert norm.size == (10, 20)
