"""The server's peak memory (VmHWM) under a decompression-bomb attempt and under the largest edit it admits.

A bomb is a PNG whose header claims 11000x11000 RGBA pixels (484 MB decoded) in a few hundred bytes; four of
them in one multipart edit are what the hardening issue measured (+1.9 GB before). The largest admitted edit
is one real image of MAX_INPUT_PIXELS pixels. Each figure is the peak resident memory of the server and its
decode processes (each process's VmHWM, reset before the request, summed) after the request, against before.

    python bench/memory.py [--out DIR]
"""

import argparse
import io
import struct
import sys
import zlib
from pathlib import Path

import harness
import httpx
import numpy as np
from PIL import Image


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def largest_png(pixels: int) -> bytes:
    """A real RGB image of about `pixels` pixels (a gradient: it compresses, as photos do not quite)."""
    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.broadcast_to(x[None, :, None], (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


def edit(server, files: list, fields: dict) -> int:
    response = httpx.post(server.url + "/v1/images/edits", files=files, data=fields, timeout=600)
    return response.status_code


def measure(server, name: str, files: list, fields: dict) -> dict:
    harness.reset_peak_rss(server.proc.pid)
    before = harness.peak_rss_mib(server.proc.pid)
    status = edit(server, files, fields)
    after = harness.peak_rss_mib(server.proc.pid)
    return {"case": name, "status": status, "peak_before_mib": round(before), "peak_after_mib": round(after),
            "added_mib": round(after - before)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for memory.json (default out/memory/<time>)")
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    budget = 50_000_000
    with harness.ServerProcess({"MODEL_PATH": "demo", "MAX_INPUT_PIXELS": str(budget)}) as server:
        edit(server, [("image", ("warm.png", largest_png(256 * 256), "image/png"))], {"prompt": "p", "size": "256x256"})
        bomb = bomb_png(11_000, 11_000)
        rows = [
            measure(server, "4 bomb PNGs of 11000x11000 (multipart)",
                    [("image[]", (f"{i}.png", bomb, "image/png")) for i in range(4)], {"prompt": "p"}),
            measure(server, f"largest admitted edit: one {budget / 1e6:g} MP PNG",
                    [("image", ("big.png", largest_png(budget), "image/png"))],
                    {"prompt": "p", "size": "512x512", "num_inference_steps": "2"}),
        ]  # fmt: skip
    result = {"machine": harness.machine(), "max_input_pixels": budget, "rows": rows}
    harness.write_json((args.out or harness.default_out("memory")) / "memory.json", result)
    print(harness.table(rows, ["case", "status", "peak_before_mib", "peak_after_mib", "added_mib"]))


if __name__ == "__main__":
    sys.exit(main())
