"""What an input image is and what decoding it would cost, read from its structure before any decoder sees it.

Pixels are not a file's whole cost: a decoder also walks each of its parts. A PNG padded with a million empty
chunks costs Pillow seconds before the first pixel; a progressive JPEG of twenty thousand scans costs
libjpeg-turbo half a minute for 573 KB, because every scan walks every block of the image. So the file is
walked here first, in a bounded number of steps, and refused past these bounds:

- PNG and WebP: at most one chunk per KiB of file, and 1024 in any file (an encoder writes chunks of 8 KiB
  or more; an animation a few per frame).
- JPEG: at most 1024 marker segments before its first scan (Pillow reads each in Python) and at most
  `max_scans` scans (MAX_JPEG_SCANS, as libjpeg-turbo's -maxscans; a progressive JPEG has about ten). After
  the first scan, libjpeg-turbo reads markers in C, at a cost bounded by the file's size.

The walk also gives the format, the size and whether there is alpha, so no decoder parses a header on the
server's side: Pillow sees only files that passed, and only in the decode processes (server/decoders.py),
which check that Pillow reads the same size. It imports nothing but the standard library.
"""

import struct
from dataclasses import dataclass

MIN_CHUNKS = 1024
MAX_SEGMENTS = 1024  # JPEG marker segments before the first scan
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length
_SCAN = b"\xff\xda"


class UnreadableImage(ValueError):
    """Not a PNG, JPEG or WebP file this server can read."""


class CostlyImage(ValueError):
    """Readable, but decoding it would cost more than any image is worth."""


@dataclass(frozen=True)
class Structure:
    format: str  # PNG, JPEG or WEBP
    width: int
    height: int
    has_alpha: bool


def structure(data: bytes, max_scans: int) -> Structure:
    """The file's format, size and alpha; UnreadableImage or CostlyImage."""
    if data.startswith(_PNG):
        return _png(data)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg(data, max_scans)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    raise UnreadableImage("it is not a PNG, JPEG or WebP file")


def max_chunks(size: int) -> int:
    return max(MIN_CHUNKS, size // 1024)


def _count(chunks: int, limit: int) -> int:
    if chunks > limit:
        raise CostlyImage(f"it has more than {limit} chunks (at most one per KiB of file, or {MIN_CHUNKS})")
    return chunks


def _png(data: bytes) -> Structure:
    limit, pos, chunks = max_chunks(len(data)), len(_PNG), 0
    header, alpha = None, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks = _count(chunks + 1, limit)
        if kind == b"IHDR" and header is None and length >= 13:
            header = struct.unpack_from(">IIBB", data, pos + 8)
        alpha = alpha or kind == b"tRNS"
        if kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise UnreadableImage("it is a PNG file without a header (IHDR)")
    width, height, _, color_type = header
    return Structure("PNG", width, height, alpha or color_type in (4, 6))  # 4: gray + alpha, 6: RGBA


def _jpeg(data: bytes, max_scans: int) -> Structure:
    pos, steps, size = 2, 0, None
    while True:
        steps += 1
        if steps > MAX_SEGMENTS:
            raise CostlyImage(f"it has more than {MAX_SEGMENTS} marker segments before its first scan")
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise UnreadableImage("it is a JPEG file that ends or breaks before its first scan")
        marker = data[pos + 1]
        if marker == 0xFF or marker in _JPEG_STANDALONE:  # a fill byte, or a marker without a length
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:
            break
        if marker in _JPEG_FRAMES and size is None and pos + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    if size is None:
        raise UnreadableImage("it is a JPEG file without a frame header")
    scans = data.count(_SCAN, pos)  # every scan starts so; entropy-coded data cannot hold these two bytes
    if scans > max_scans:
        raise CostlyImage(f"it has {scans} scans; at most {max_scans} are decoded (MAX_JPEG_SCANS)")
    return Structure("JPEG", size[0], size[1], False)


def _webp(data: bytes) -> Structure:
    limit, pos, chunks = max_chunks(len(data)), 12, 0
    canvas, alpha = None, False
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        chunks = _count(chunks + 1, limit)
        body = data[pos + 8 : pos + 8 + min(length, 10)]
        if canvas is None:
            canvas, alpha = _webp_canvas(kind, body) or (None, False)
        pos += 8 + length + (length & 1)
    if canvas is None:
        raise UnreadableImage("it is a WebP file without an image header")
    return Structure("WEBP", canvas[0], canvas[1], alpha)


def _webp_canvas(kind: bytes, body: bytes) -> tuple[tuple[int, int], bool] | None:
    """The canvas size and alpha from the first chunk that gives them: VP8X (extended), VP8L (lossless) or
    VP8 (lossy)."""
    if kind == b"VP8X" and len(body) >= 10:
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return (width, height), bool(body[0] & 0x10)
    if kind == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        return ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1), bool(bits >> 28 & 1)
    if kind == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", body, 6)
        return (width & 0x3FFF, height & 0x3FFF), False
    return None
