"""A finished video's files: an H.264 MP4 that players open, its thumbnail and its spritesheet.

PyAV's wheels carry FFmpeg with libx264, so nothing is downloaded or installed at run time. Encoding runs on
a worker thread, never the event loop. yuv420p and `+faststart` (the index before the frames) are what
browsers and phones play; every family's sizes are multiples of 16, so 4:2:0's even sides always hold.
"""

import io
import math
import tempfile
from pathlib import Path

import av
from PIL import Image

CRF = "18"  # x264's quality: visually lossless at a fraction of the frames' size
SPRITES = 16  # frames in a spritesheet at most, evenly spaced
SPRITE_SIDE = 256  # a spritesheet tile's longest side at most


def video_files(frames: list[Image.Image], fps: int) -> dict[str, bytes]:
    """Worker thread: the files of the `ASSETS` variants (server/video_store.py)."""
    return {"video": mp4(frames, fps), "thumbnail": _image(frames[0], "WEBP"), "spritesheet": _spritesheet(frames)}


def mp4(frames: list[Image.Image], fps: int) -> bytes:
    """Through a temporary file: `+faststart` moves the index by reading the file back, which a stream cannot."""
    with tempfile.TemporaryDirectory(prefix="video-") as folder:
        path = Path(folder) / "video.mp4"
        _encode(frames, fps, path)
        return path.read_bytes()


def _encode(frames: list[Image.Image], fps: int, path: Path) -> None:
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": CRF, "preset": "medium"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame.convert("RGB"))))
        container.mux(stream.encode())  # what the encoder still holds


def frames_of(data: bytes) -> list[Image.Image]:
    """An MP4's frames as RGB images (a video the SGLang engine made)."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def _spritesheet(frames: list[Image.Image]) -> bytes:
    count = min(SPRITES, len(frames))
    picked = [frames[round(i * (len(frames) - 1) / max(1, count - 1))] for i in range(count)]
    scale = min(1.0, SPRITE_SIDE / max(frames[0].size))
    tile = (max(1, round(frames[0].width * scale)), max(1, round(frames[0].height * scale)))
    columns = math.ceil(math.sqrt(count))
    sheet = Image.new("RGB", (tile[0] * columns, tile[1] * math.ceil(count / columns)))
    for i, frame in enumerate(picked):
        sheet.paste(frame.convert("RGB").resize(tile), ((i % columns) * tile[0], (i // columns) * tile[1]))
    return _image(sheet, "JPEG")


def _image(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, fmt, quality=90)
    return out.getvalue()
