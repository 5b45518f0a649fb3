"""Safe image decoding: every accepted image decodes to 8-bit RGB, every bad one raises.

Converters run ``normalize_image_bytes`` on every input so that shards only hold
PNG/JPEG bytes that ``decode_image`` turns into RGB without surprises.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)


class InvalidImageError(ValueError):
    """Bytes that do not decode to a usable image; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str | None = None):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, str | None, str, bool]:
    """Decode ``data`` fully; returns (image, format, original mode, has_alpha)."""
    if data is None or len(data) == 0:
        raise InvalidImageError("empty file")
    with warnings.catch_warnings():
        # We enforce our own pixel limit below; PIL's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise InvalidImageError("too large", str(e)) from e
        except UnidentifiedImageError as e:
            if _has_image_signature(data):
                # Starts like an image but PIL cannot parse its header: cut off early.
                raise InvalidImageError("truncated", "image header is incomplete") from e
            raise InvalidImageError("not an image", "unrecognized image data") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InvalidImageError(_classify(e), str(e)) from e
        width, height = im.size
        if width <= 0 or height <= 0:
            raise InvalidImageError("corrupt", f"image size {width}x{height}")
        if width * height > max_pixels:
            raise InvalidImageError(
                "too large", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}"
            )
        fmt = im.format
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise InvalidImageError("too large", str(e)) from e
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            raise InvalidImageError(_classify(e), str(e)) from e
    mode = im.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    return im, fmt, mode, has_alpha


_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(data: bytes) -> bool:
    head = bytes(data[:12])
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _classify(error: BaseException) -> str:
    text = str(error).lower()
    if "truncated" in text or isinstance(error, EOFError):
        return "truncated"
    return "corrupt"


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float gray images into 0..255."""
    a = np.asarray(im)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    a = a.astype(np.int64)
    if im.mode.startswith("I;16") or a.max(initial=0) > 255:
        # 16-bit data (PNG/TIFF) in an I;16 or I image: map 0..65535 onto 0..255.
        a = np.clip(a, 0, 65535) // 257
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image) -> Image.Image:
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF must not reject an otherwise fine image
        pass
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit_gray(im).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        # Transparent pixels become white, not black: a neutral background for embeddings.
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise InvalidImageError("unsupported mode", f"cannot convert mode {mode} to RGB ({e})") from e


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image; raise InvalidImageError if unusable."""
    im, _, _, _ = _open(data, max_pixels)
    return _to_rgb(im)


def normalize_image_bytes(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> bytes:
    """Validate ``data`` by decoding it and return bytes that decode cleanly to RGB.

    Already-clean inputs (8-bit RGB JPEG or PNG, no alpha, single frame, upright,
    longest side within ``max_side``) come back unchanged; anything else is
    converted to RGB, downscaled to ``max_side`` if needed, and re-encoded as PNG.
    """
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be > 0, got {max_side}")
    im, fmt, mode, has_alpha = _open(data, max_pixels)
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: decode_image ignores it too
        orientation = 1
    too_big = max_side is not None and max(im.size) > max_side
    if (
        fmt in ("JPEG", "PNG")
        and mode == "RGB"
        and not has_alpha
        and getattr(im, "n_frames", 1) == 1
        and orientation in (None, 1)
        and not too_big
    ):
        return data if isinstance(data, bytes) else bytes(data)
    rgb = _to_rgb(im)
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()
