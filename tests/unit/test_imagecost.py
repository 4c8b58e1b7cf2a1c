"""server/imagecost.py: the structure walk reads what Pillow reads, and refuses what costs more than it is worth
before any decoder sees it."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from bench.attacks import _jpeg_segment, many_scan_jpeg, padded_png
from server.imagecost import MAX_SEGMENTS, CostlyImage, UnreadableImage, structure

SCANS = 100


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(mode: str, size=(67, 45)) -> Image.Image:
    array = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(array, "RGBA").convert(mode)


def palette_with_transparency() -> Image.Image:
    image = noise("P")
    image.info["transparency"] = 3
    return image


FILES = {
    "png-rgb": lambda: saved(noise("RGB"), "PNG"),
    "png-rgba": lambda: saved(noise("RGBA"), "PNG"),
    "png-gray": lambda: saved(noise("L"), "PNG"),
    "png-gray-alpha": lambda: saved(noise("LA"), "PNG"),
    "png-palette-trns": lambda: saved(palette_with_transparency(), "PNG"),
    "png-16bit": lambda: saved(noise("I;16"), "PNG"),
    "png-animated": lambda: saved(noise("RGB"), "PNG", save_all=True, append_images=[noise("RGB")] * 3),
    "jpeg": lambda: saved(noise("RGB"), "JPEG"),
    "jpeg-progressive": lambda: saved(noise("RGB"), "JPEG", progressive=True),
    "jpeg-gray": lambda: saved(noise("L"), "JPEG"),
    "jpeg-cmyk": lambda: saved(noise("CMYK"), "JPEG"),
    "jpeg-exif": lambda: saved(noise("RGB"), "JPEG", exif=Image.Exif() or b"Exif\x00\x00" + bytes(5000)),
    "mpo": lambda: saved(noise("RGB"), "MPO", save_all=True, append_images=[noise("RGB")]),
    "webp-lossy": lambda: saved(noise("RGB"), "WEBP"),
    "webp-lossless": lambda: saved(noise("RGB"), "WEBP", lossless=True),
    "webp-alpha": lambda: saved(noise("RGBA"), "WEBP"),
    "webp-lossless-alpha": lambda: saved(noise("RGBA"), "WEBP", lossless=True),
    "webp-animated": lambda: saved(noise("RGBA"), "WEBP", save_all=True, append_images=[noise("RGBA")] * 2),
    "webp-exif": lambda: saved(noise("RGB"), "WEBP", exif=b"Exif\x00\x00" + bytes(100)),
}


@pytest.mark.parametrize("name", list(FILES))
def test_the_walk_reads_what_pillow_reads(name):
    data = FILES[name]()
    found = structure(data, SCANS)
    with Image.open(io.BytesIO(data)) as image:
        alpha = "A" in image.getbands() or "transparency" in image.info
        assert (found.width, found.height, found.has_alpha) == (*image.size, alpha)
        assert found.format == {"MPO": "JPEG"}.get(image.format, image.format)


def test_a_png_padded_with_empty_chunks_is_refused_and_a_normal_one_of_many_chunks_is_not():
    with pytest.raises(CostlyImage, match="chunks"):
        structure(padded_png(64, 2000), SCANS)
    big = saved(noise("RGB", (1500, 1500)), "PNG", compress_level=0)  # 6.75 MB in Pillow's 64 KiB chunks
    assert structure(big, SCANS).width == 1500


def test_a_jpeg_of_more_scans_than_allowed_is_refused():
    assert structure(many_scan_jpeg(256, SCANS - 2), SCANS).width == 256  # its DC scan, SCANS - 2 AC scans
    with pytest.raises(CostlyImage, match="scans"):
        structure(many_scan_jpeg(256, SCANS), SCANS)


def test_a_jpeg_flooding_pillow_with_segments_before_its_first_scan_is_refused():
    data = saved(noise("RGB"), "JPEG")
    comments = _jpeg_segment(0xFE, b"") * MAX_SEGMENTS
    with pytest.raises(CostlyImage, match="segments"):
        structure(data[:2] + comments + data[2:], SCANS)
    with pytest.raises(CostlyImage, match="segments"):
        structure(data[:2] + b"\xff" * 10_000_000 + data[2:], SCANS)  # fill bytes: each a step of the walk


def test_a_webp_of_a_chunk_per_few_bytes_is_refused():
    data = saved(noise("RGB"), "WEBP")
    padding = b"JUNK" + struct.pack("<I", 0) * 1  # an empty unknown chunk, 8 bytes
    padded = data[:12] + padding * 5000 + data[12:]
    padded = padded[:4] + struct.pack("<I", len(padded) - 8) + padded[8:]
    with pytest.raises(CostlyImage, match="chunks"):
        structure(padded, SCANS)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"\xff\xd8\xff\xda\x00\x08",
        b"RIFF\x04\x00\x00\x00WEBP",
        b"RIFF\x0c\x00\x00\x00WEBPVP8 \x00\x00\x00\x00",
        b"BM" + bytes(60),
    ],
    ids=["png-no-header", "jpeg-truncated", "jpeg-no-frame", "webp-empty", "webp-empty-vp8", "bmp"],
)
def test_what_cannot_be_read_is_said_so(data):
    with pytest.raises(UnreadableImage):
        structure(data, SCANS)
