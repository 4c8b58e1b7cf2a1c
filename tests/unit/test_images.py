"""server/images.py: structure before pixels, so a decompression bomb costs nothing, and the decode frame of a
decode process."""

import io
import resource

import pytest
from PIL import Image

from server.errors import APIError
from server.images import InputImage, check_pixels, decode_data_url, decode_frame, decode_job, inspect
from tests.support.images import bomb_png, gradient, mask_png, png_bytes

SCANS = 100


def test_inspect_reads_the_structure_without_decoding():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = inspect(bomb_png(30_000, 30_000), "image", SCANS)  # 3.6 GB as RGBA
    assert (image.width, image.height, image.has_alpha) == (30_000, 30_000, True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: nothing was decoded


def test_the_pixel_budget_counts_every_input():
    images = [inspect(bomb_png(11_000, 11_000), f"image[{i}]", SCANS) for i in range(4)]
    with pytest.raises(APIError) as err:
        check_pixels(images, 50_000_000)
    assert err.value.status == 400 and err.value.code == "image_too_large" and err.value.param == "image[0]"
    check_pixels([inspect(png_bytes(gradient(64, 64)), "image", SCANS)], 50_000_000)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", b"GIF89a" + bytes(20), b"\x89PNG\r\n\x1a\n" + bytes(30), bomb_png(0, 5)],
    ids=["empty", "text", "gif", "truncated-png", "no-pixels"],
)
def test_what_is_not_a_png_jpeg_or_webp_is_a_400(data):
    with pytest.raises(APIError) as err:
        inspect(data, "image", SCANS)
    assert err.value.status == 400 and err.value.param == "image"


def decoded(image: InputImage, mask: bool = False) -> Image.Image:
    """A decode as a decode process does it: the job's header and bytes through `decode_frame`, its answer
    through the job's own check."""
    job = decode_job(image, mask)
    reply, blobs = decode_frame(job.header, [bytearray(b) for b in job.blobs])
    return job.finish({**reply, "blobs": [len(b) for b in blobs]}, [bytearray(b) for b in blobs])


def test_a_file_whose_structure_is_fine_but_pixels_are_not_is_a_400_at_decode():
    with pytest.raises(APIError) as err:
        decoded(inspect(bomb_png(64, 64), "image", SCANS))
    assert err.value.status == 400 and err.value.param == "image"


def test_decoding_gives_rgb_pixels_and_the_diffusers_mask():
    image = decoded(inspect(png_bytes(gradient(64, 32)), "image", SCANS))
    assert image.mode == "RGB" and image.size == (64, 32)
    assert image.tobytes() == gradient(64, 32).tobytes()
    mask = decoded(inspect(mask_png((64, 64), (16, 16, 48, 48)), "mask", SCANS), mask=True)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 0 and mask.getpixel((32, 32)) == 255


def test_a_file_whose_header_disagrees_with_its_structure_is_not_decoded():
    image = inspect(png_bytes(gradient(64, 64)), "image", SCANS)
    with pytest.raises(APIError) as err:
        decoded(InputImage(image.data, "image", "PNG", 8000, 8000, False))  # as if the walk were fooled
    assert err.value.status == 400 and err.value.param == "image"


def test_gif_is_refused_even_though_pillow_reads_it():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "GIF")
    with pytest.raises(APIError):
        inspect(out.getvalue(), "image", SCANS)


def test_data_urls_decode_in_pieces_exactly():
    import base64
    import os

    data = os.urandom(3 * 2**20 + 7)
    assert decode_data_url("data:image/png;base64," + base64.b64encode(data).decode(), "p", 2**23) == data
    with pytest.raises(APIError):
        decode_data_url("data:image/png;base64,@@@@", "p", 2**23)
