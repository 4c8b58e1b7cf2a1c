"""The scripts in examples/ run unchanged against the real server (curl and the openai SDK)."""

import os
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT
from tests.support.images import gradient, mask_png


def run(server, *args: str, cwd) -> str:
    env = {**os.environ, "BASE_URL": server.url, "OPENAI_API_KEY": "none"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_curl_generate(server, tmp_path):
    run(server, "bash", str(ROOT / "examples/generate.sh"), "out.jpeg", cwd=tmp_path)
    image = Image.open(tmp_path / "out.jpeg")
    assert (image.format, image.size) == ("JPEG", (512, 512))


def test_curl_edit_with_and_without_mask(server, tmp_path):
    gradient(256, 256).save(tmp_path / "in.png")
    (tmp_path / "mask.png").write_bytes(mask_png())
    run(server, "bash", str(ROOT / "examples/edit.sh"), "in.png", "", "plain.png", cwd=tmp_path)
    run(server, "bash", str(ROOT / "examples/edit.sh"), "in.png", "mask.png", "masked.png", cwd=tmp_path)
    for name in ("plain.png", "masked.png"):
        image = Image.open(tmp_path / name)
        assert (image.format, image.size) == ("PNG", (256, 256))


def test_sdk_generate(server, tmp_path):
    out = run(server, sys.executable, str(ROOT / "examples/generate.py"), "fox", cwd=tmp_path)
    assert "seed 42" in out and "seed 43" in out
    for i in (0, 1):
        assert Image.open(tmp_path / f"fox-{i}.png").size == (512, 512)


def test_sdk_edit(server, tmp_path):
    gradient(320, 256).save(tmp_path / "in.png")
    (tmp_path / "mask.png").write_bytes(mask_png((320, 256)))
    run(server, sys.executable, str(ROOT / "examples/edit.py"), "in.png", "mask.png", "out.png", cwd=tmp_path)
    assert Image.open(tmp_path / "out.png").size == (320, 256)


def test_curl_stream(server, tmp_path):
    out = run(server, "bash", str(ROOT / "examples/stream.sh"), "lighthouse", cwd=tmp_path)
    assert out.splitlines() == [
        "image_generation.partial_image lighthouse-partial-0.jpeg",
        "image_generation.partial_image lighthouse-partial-1.jpeg",
        "image_generation.completed lighthouse.jpeg",
    ]
    sizes = {Image.open(tmp_path / name).size for name in os.listdir(tmp_path)}
    assert sizes == {(512, 512)}
