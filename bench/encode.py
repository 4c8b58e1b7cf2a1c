"""JPEG encoding of one 1024x1024 image: Pillow (what the server uses) against simplejpeg.

Both wrap libjpeg-turbo; the question is what the bindings cost around it. simplejpeg needs a numpy array, so
its timing includes the conversion from the PIL image the pipeline returns. Pillow subsamples chroma 4:2:0 by
default; simplejpeg is run at 4:2:0 (the fair comparison) and at its own default 4:4:4. Two contents: noise (what
the demo model draws, the worst case for JPEG) and a smooth picture (closer to a real model's output).

    python bench/encode.py --repeat 50
"""

import argparse
import io
import sys
import time
from pathlib import Path

import harness
import numpy as np
from PIL import Image, features


def images(size: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    smooth = np.stack([x, y, (x + y) / 2], -1) * 200 + 20 * np.sin(x * 40)[..., None] * np.cos(y * 30)[..., None]
    smooth += rng.normal(0, 3, smooth.shape)  # a little grain, as photographs have
    return {
        "noise": Image.fromarray(noise, "RGB"),
        "smooth": Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8), "RGB"),
    }


def encoders(quality: int) -> dict:
    from server.images import encode_image

    out = {"pillow (server)": lambda image: encode_image(image, "jpeg", quality)}
    try:
        import simplejpeg
    except ImportError:
        print("simplejpeg is not installed (pip install -e '.[bench]'); measuring Pillow only")
        return out

    def simple(subsampling: str):
        return lambda image: simplejpeg.encode_jpeg(
            np.asarray(image), quality=quality, colorspace="RGB", colorsubsampling=subsampling
        )

    out["simplejpeg 4:2:0"] = simple("420")
    out["simplejpeg 4:4:4"] = simple("444")
    return out


def time_one(encode, image: Image.Image, repeat: int) -> dict:
    encode(image)  # warm-up
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = len(encode(image))
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return {"median_ms": median * 1000, "p95_ms": float(np.percentile(times, 95)) * 1000, "bytes": size}


def check_decodes(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="side of the square image")
    p.add_argument("--quality", type=int, default=65, help="JPEG quality (the server's default is 65)")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--out", type=Path, help="folder for encode.json (default out/encode/<time>)")
    args = p.parse_args(argv)
    machine = harness.machine()
    turbo = features.version("libjpeg_turbo")
    libjpeg = f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version('jpg')}"
    print(f"encode: {args.size}x{args.size} JPEG q{args.quality}, {args.repeat} runs; Pillow with {libjpeg}")
    rows = []
    for content, image in images(args.size).items():
        for name, encode in encoders(args.quality).items():
            check_decodes(encode(image))
            row = {"content": content, "encoder": name, **time_one(encode, image, args.repeat)}
            rows.append(row)
    print(harness.table(rows, ["content", "encoder", "median_ms", "p95_ms", "bytes"]))
    out = args.out or harness.default_out("encode")
    config = harness.config(args)
    harness.write_json(
        out / "encode.json",
        {
            "config": config,
            "machine": machine,
            "load_average_after": harness.load_average(),
            "libjpeg": libjpeg,
            "rows": rows,
        },
    )
    print(f"wrote {out / 'encode.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
