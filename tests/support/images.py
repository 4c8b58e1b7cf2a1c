"""Images in and out of the tests, and the OpenAI error shape."""

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def decode_b64(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# Batched float math rounds differently at different batch positions (and on AVX2 vs AVX-512 CPUs): the same
# image at another position may be a level or so off in PNG. A different seed is off by far more.
SAME_IMAGE_LEVELS = 3


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The same image, up to batch-position rounding (compare PNG pixels: JPEG amplifies a level into ten)."""
    assert np.abs(a - b).max() <= SAME_IMAGE_LEVELS, f"max difference {np.abs(a - b).max()} levels"


def assert_other_image(a: np.ndarray, b: np.ndarray) -> None:
    """Not the same image: further apart than batch-position rounding can take it."""
    assert np.abs(a - b).max() > SAME_IMAGE_LEVELS


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2 % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def mask_png(size=(256, 256), hole=(64, 64, 192, 192)) -> bytes:
    """OpenAI's mask: opaque, with a fully transparent hole where the image is repainted."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), hole)
    return png_bytes(mask)


def assert_openai_shape(body: dict) -> dict:
    """An OpenAI error body: {"error": {"message", "type", "param", "code"}} and nothing else; returns the error."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header over a tiny IDAT: decoding would allocate width*height*4 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
