"""server/images.py: headers before pixels, so a decompression bomb costs nothing."""

import io
import resource

import pytest
from PIL import Image

from server.errors import APIError
from server.images import check_pixels, decode, probe
from tests.support.images import bomb_png, gradient, png_bytes


def test_probe_reads_the_header_without_decoding():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = probe(bomb_png(30_000, 30_000), "image")  # 3.6 GB as RGBA
    assert (image.width, image.height, image.has_alpha) == (30_000, 30_000, True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: nothing was decoded


def test_the_pixel_budget_counts_every_input():
    images = [probe(bomb_png(11_000, 11_000), f"image[{i}]") for i in range(4)]
    with pytest.raises(APIError) as err:
        check_pixels(images, 50_000_000)
    assert err.value.status == 400 and err.value.code == "image_too_large" and err.value.param == "image[0]"
    check_pixels([probe(png_bytes(gradient(64, 64)), "image")], 50_000_000)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", b"GIF89a" + bytes(20), b"\x89PNG\r\n\x1a\n" + bytes(30), bomb_png(0, 5)],
    ids=["empty", "text", "gif", "truncated-png", "no-pixels"],
)
def test_what_is_not_a_png_jpeg_or_webp_is_a_400(data):
    with pytest.raises(APIError) as err:
        probe(data, "image")
    assert err.value.status == 400 and err.value.param == "image"


def test_a_file_whose_header_is_fine_but_pixels_are_not_is_a_400_at_decode():
    with pytest.raises(APIError) as err:
        decode(probe(bomb_png(64, 64), "image"))
    assert err.value.status == 400


def test_gif_is_refused_even_though_pillow_reads_it():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "GIF")
    with pytest.raises(APIError):
        probe(out.getvalue(), "image")
