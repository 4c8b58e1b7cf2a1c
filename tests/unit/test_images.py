"""server/images.py: structure before pixels, so a decompression bomb costs nothing, and the inspect and decode
frames of a decode process, each reading its input from a file."""

import base64
import io
import os
import resource

import pytest
from PIL import Image

from server.errors import APIError
from server.images import (
    InputImage,
    check_pixels,
    decode_data_url,
    decode_frame,
    decode_job,
    inspect_frame,
    inspect_job,
)
from tests.support.images import bomb_png, gradient, mask_png, png_bytes

SCANS = 100
MAX_PIXELS = 2048 * 2048  # the server's default: what an input is decoded to at most


@pytest.fixture
def inspect(tmp_path):
    """An inspect as a decode process does it: the bytes written to a file, the job's header through
    `inspect_frame`, its answer through the job's own `finish`."""
    count = 0

    def inspect(data: bytes, param: str, max_scans: int = SCANS) -> InputImage:
        nonlocal count
        count += 1
        path = tmp_path / f"input.{count}"
        path.write_bytes(data)
        job = inspect_job(path, param, max_scans)
        assert job.header == {"op": "inspect", "path": str(path), "param": param, "max_scans": max_scans}
        reply, blobs = inspect_frame(job.header, [])
        assert blobs == []
        return job.finish(reply, [])

    return inspect


def test_inspect_reads_the_structure_without_decoding(inspect):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    image = inspect(bomb_png(30_000, 30_000), "image")  # 3.6 GB as RGBA
    assert (image.width, image.height, image.has_alpha) == (30_000, 30_000, True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: nothing was decoded


def test_inspect_gives_the_file_its_path_param_and_header(inspect, tmp_path):
    image = inspect(png_bytes(gradient(64, 48)), "image[1]")
    assert image == InputImage(tmp_path / "input.1", "image[1]", "PNG", 64, 48, False)
    assert image.pixels == 64 * 48
    rgba = inspect(mask_png((32, 16), (0, 0, 8, 8)), "mask")
    assert (rgba.path, rgba.param, rgba.format, rgba.width, rgba.height, rgba.has_alpha) == (
        tmp_path / "input.2",
        "mask",
        "PNG",
        32,
        16,
        True,
    )
    jpeg = io.BytesIO()
    gradient(40, 24).save(jpeg, "JPEG")
    assert inspect(jpeg.getvalue(), "image").format == "JPEG"


def test_the_pixel_budget_counts_every_input(inspect):
    images = [inspect(bomb_png(11_000, 11_000), f"image[{i}]") for i in range(4)]
    with pytest.raises(APIError) as err:
        check_pixels(images, 50_000_000)
    assert err.value.status == 400 and err.value.code == "image_too_large" and err.value.param == "image[0]"
    check_pixels([inspect(png_bytes(gradient(64, 64)), "image")], 50_000_000)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", b"GIF89a" + bytes(20), b"\x89PNG\r\n\x1a\n" + bytes(30), bomb_png(0, 5)],
    ids=["empty", "text", "gif", "truncated-png", "no-pixels"],
)
def test_what_is_not_a_png_jpeg_or_webp_is_a_400(inspect, data):
    with pytest.raises(APIError) as err:
        inspect(data, "image")
    assert err.value.status == 400 and err.value.param == "image"


def test_a_progressive_jpeg_with_more_scans_than_allowed_is_too_costly(inspect):
    from bench.attacks import many_scan_jpeg

    with pytest.raises(APIError) as err:
        inspect(many_scan_jpeg(128, 50), "image[0]", max_scans=10)
    assert err.value.status == 400 and err.value.code == "image_too_costly" and err.value.param == "image[0]"
    assert inspect(many_scan_jpeg(128, 5), "image[0]", max_scans=10).format == "JPEG"


def decoded(image: InputImage, mask: bool = False, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decode as a decode process does it: the job's header through `decode_frame` (which reads the file), its
    answer through the job's own check."""
    job = decode_job(image, mask, max_pixels)
    assert job.header["path"] == str(image.path) and job.blobs == []
    reply, blobs = decode_frame(job.header, [])
    return job.finish({**reply, "blobs": [len(b) for b in blobs]}, [bytearray(b) for b in blobs])


def test_a_file_whose_structure_is_fine_but_pixels_are_not_is_a_400_at_decode(inspect):
    with pytest.raises(APIError) as err:
        decoded(inspect(bomb_png(64, 64), "image"))
    assert err.value.status == 400 and err.value.param == "image"


def test_decoding_gives_rgb_pixels_and_the_diffusers_mask(inspect):
    image = decoded(inspect(png_bytes(gradient(64, 32)), "image"))
    assert image.mode == "RGB" and image.size == (64, 32)
    assert image.tobytes() == gradient(64, 32).tobytes()
    mask = decoded(inspect(mask_png((64, 64), (16, 16, 48, 48)), "mask"), mask=True)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 0 and mask.getpixel((32, 32)) == 255


def test_the_file_is_read_at_decode_not_at_inspect(inspect):
    """The server holds a path: what is decoded is what the file holds when the decode process reads it."""
    image = inspect(png_bytes(gradient(16, 16)), "image")
    image.path.write_bytes(png_bytes(Image.new("RGB", (16, 16), (1, 2, 3))))
    assert decoded(image).getpixel((5, 5)) == (1, 2, 3)
    image.path.unlink()
    with pytest.raises(APIError) as err:
        decoded(image)
    assert err.value.status == 400 and err.value.param == "image"


def test_a_file_whose_header_disagrees_with_its_structure_is_not_decoded(inspect):
    image = inspect(png_bytes(gradient(64, 64)), "image")
    with pytest.raises(APIError) as err:
        decoded(InputImage(image.path, "image", "PNG", 8000, 8000, False))  # as if the walk were fooled
    assert err.value.status == 400 and err.value.param == "image"


def test_gif_is_refused_even_though_pillow_reads_it(inspect, tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "GIF")
    with pytest.raises(APIError):
        inspect(out.getvalue(), "image")
    gif = tmp_path / "a.gif"
    gif.write_bytes(out.getvalue())
    with pytest.raises(APIError):  # nor is one decoded whose walk was fooled
        decoded(InputImage(gif, "image", "PNG", 8, 8, False))


def test_data_urls_decode_in_pieces_exactly():
    data = os.urandom(3 * 2**20 + 7)
    assert decode_data_url("data:image/png;base64," + base64.b64encode(data).decode(), "p", 2**23) == data
    with pytest.raises(APIError):
        decode_data_url("data:image/png;base64,@@@@", "p", 2**23)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_input_larger_than_max_pixels_is_decoded_to_it_its_aspect_kept(inspect, fmt):
    """No engine uses more of an input than the largest image it makes: what comes back (and what the server holds)
    is at most MAX_PIXELS; a JPEG is decoded at a fraction of its size first."""
    source = gradient(1200, 600)
    out = io.BytesIO()
    source.save(out, fmt)
    image = decoded(inspect(out.getvalue(), "image"), max_pixels=100_000)
    assert image.size == (447, 223) and 447 * 223 <= 100_000  # 1200x600 scaled by sqrt(100000 / 720000)
    expected = source.resize((447, 223), Image.Resampling.LANCZOS)
    difference = sum(abs(a - b) for a, b in zip(image.tobytes(), expected.tobytes(), strict=True)) / (447 * 223 * 3)
    assert difference < 3  # the same picture (a JPEG's own loss apart)
    assert decoded(inspect(png_bytes(gradient(300, 300)), "image"), max_pixels=100_000).size == (300, 300)


def test_a_mask_is_reduced_as_its_image_is_and_stays_black_and_white(inspect):
    mask = decoded(inspect(mask_png((1200, 600), (300, 150, 900, 450)), "mask"), mask=True, max_pixels=100_000)
    assert mask.size == (447, 223) and set(mask.tobytes()) == {0, 255}
    assert mask.getpixel((223, 111)) == 255 and mask.getpixel((10, 10)) == 0
