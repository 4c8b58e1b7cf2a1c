"""Videos as a player sees them: PyAV (FFmpeg) opens the MP4 and decodes every frame."""

import io
from dataclasses import dataclass

import av
from PIL import Image


@dataclass
class Decoded:
    codec: str
    fps: float
    frames: list[Image.Image]

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size


def decode_mp4(data: bytes) -> Decoded:
    with av.open(io.BytesIO(data), format="mp4") as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        return Decoded(stream.codec_context.name, float(stream.average_rate), frames)


def image_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
