"""Reading untrusted image bytes: header-only size, and a strict full decode to 8-bit RGB.

Every failure is an `ImageError` with a machine-readable `reason`, so a loader can count and skip
bad samples instead of crashing or, worse, training on half-decoded pixels.

A JPEG cut short and then closed with an EOI marker is the subtle case: libjpeg only warns ("premature
end of data segment") and fills the rest of the image with grey, and PIL drops that warning. The full
decode therefore checks that the scan data really ends where the file says it does (`_decode_jpeg`).
"""

import io
import struct
import warnings
import zlib
from typing import Literal

import numpy as np
from PIL import Image, ImageFile

from sail_megatron.config.data import DEFAULT_MAX_PIXELS

Reason = Literal["empty", "not_an_image", "truncated", "too_large", "unsupported"]

# Formats whose pixel decoders we let untrusted bytes reach (e.g. EPS would shell out to Ghostscript).
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(ValueError):
    """An image that cannot be used; `reason` is one of `Reason`, the message is for humans."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: Reason = reason


def _png_exif_if_complete(data: bytes) -> bytes | None:
    """Walk the PNG chunk headers (nothing inflated): 'truncated' unless IEND is reached.

    Returns the eXIf payload, which PIL only sees at open() when it precedes the pixel data.
    """
    pos, exif = 8, None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length  # length, type, payload, CRC
        if end > len(data):
            break
        if ctype == b"IEND":
            return exif
        if ctype == b"eXIf":
            exif = data[pos + 8 : pos + 8 + length]
        pos = end
    raise ImageError("truncated", "PNG ends before its IEND chunk")


def _orientation(im: Image.Image, png_exif: bytes | None) -> int:
    """EXIF orientation (1..8) from what the header holds; malformed EXIF counts as upright."""
    try:
        if png_exif is not None and "exif" not in im.info:
            im.info["exif"] = png_exif
        # The base-class reader: PngImageFile.getexif() would decode every pixel to look for eXIf.
        value = Image.Image.getexif(im).get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open(data: bytes, max_pixels: int) -> tuple[ImageFile.ImageFile, int]:
    """Open lazily (header only) and run every check that needs no decode.

    Returns the unloaded image (caller closes it) and its EXIF orientation.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Our max_pixels decides, not PIL's warning threshold. PIL's hard error (2x
            # Image.MAX_IMAGE_PIXELS, ~179 MP) still fires first for headers above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from None
    except (OSError, EOFError, ValueError, SyntaxError, struct.error) as e:
        # UnidentifiedImageError, or a plugin choking on a garbled header.
        raise ImageError("not_an_image", f"no readable image header ({e})") from None
    try:
        if im.format not in ALLOWED_FORMATS:
            raise ImageError("unsupported", f"format {im.format} is not decoded from untrusted bytes")
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageError("not_an_image", f"header claims size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
        png_exif = None
        if im.format == "PNG":
            png_exif = _png_exif_if_complete(data)
        elif im.format in ("JPEG", "MPO") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ImageError("truncated", "JPEG does not end with the EOI marker")
        # PIL's TIFF plugin already reports the upright size and rotates inside load().
        return im, 1 if im.format == "TIFF" else _orientation(im, png_exif)
    except BaseException:
        im.close()
        raise


def read_image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    im, orientation = _open(data, max_pixels)
    width, height = im.size
    im.close()
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    # PIL's convert() clips 16-bit values at 255; scale 0..65535 -> 0..255 with rounding instead.
    # Mode 'I' (32-bit) is what some PNG paths yield for 16-bit grey, so it is read as 16-bit too.
    v = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new 8-bit RGB image; transparency is composited onto white.

    White, not InternVL's `.convert('RGB')`: that keeps whatever colour sits under transparent
    pixels (often black), so logos and stickers would arrive as black blobs.
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(im).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    return im.copy() if im.mode == "RGB" else im.convert("RGB")


# Bytes that stand in for data libjpeg might still want; never 0xFF, so they cannot form a marker.
_FILLER = bytes((i * 73 + 41) % 255 for i in range(64))
_EOI = b"\xff\xd9"
_SOF_HUFFMAN_SEQUENTIAL = frozenset({0xC0, 0xC1})
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # 0xC4 DHT, 0xC8 JPG, 0xCC DAC


def _single_huffman_scan(data: bytes) -> bool:
    """True for a sequential Huffman JPEG whose first scan holds every component (one scan in all).

    Walks the marker segments up to the first SOS; anything unexpected answers False, which only
    selects the slower check.
    """
    pos, components = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if marker not in _SOF_HUFFMAN_SEQUENTIAL or pos + 10 > len(data):
                return False
            components = data[pos + 9]
        elif marker == 0xDA:  # SOS
            return components is not None and pos + 5 <= len(data) and data[pos + 4] == components
        pos += 2 + length
    return False


def _load_jpeg(data: bytes) -> Image.Image:
    with warnings.catch_warnings():  # the size was already checked against max_pixels in _open
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    try:
        im.load()
    except (OSError, EOFError, SyntaxError, ValueError, struct.error) as e:
        im.close()
        raise ImageError("truncated", f"pixel data is truncated or corrupt ({e})") from None
    return im


def _decode_jpeg(data: bytes) -> Image.Image:
    """Decode a JPEG, failing when its scan data stops before the image is complete.

    One scan: decode with the final EOI swapped for a few filler bytes. A complete scan only uses
    them as libjpeg's bit lookahead, so the pixels are those of the plain decode; a short scan runs
    out of data with rows missing and PIL reports a truncated file (the first suspicion is confirmed
    below). Several scans (progressive): libjpeg needs the EOI, so decode twice, once with filler
    bytes before the EOI; filler that changes the pixels was read as scan data, so the scan was short.
    """
    body = data.rstrip(b"\x00")[: -len(_EOI)]
    if _single_huffman_scan(data):
        try:
            return _load_jpeg(body + _FILLER[:16])
        except ImageError:
            pass  # truncated, or a layout this check does not cover: the two-decode check decides
    full = _load_jpeg(data)
    with _load_jpeg(body + _FILLER + _EOI) as padded:
        if padded.tobytes() != full.tobytes():
            full.close()
            raise ImageError(
                "truncated",
                "JPEG scan data ends before the image is complete "
                "(the file was cut short and closed with an EOI marker)",
            )
    return full


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode to an upright 8-bit RGB image; truncated or corrupt pixel data raises.

    Relies on ImageFile.LOAD_TRUNCATED_IMAGES being False (PIL's default), so a short file
    fails in load() instead of being padded with grey.
    """
    im, orientation = _open(data, max_pixels)
    if im.format == "JPEG":  # MPO's first frame ends inside the file: the plain path below
        im.close()
        im = _decode_jpeg(data)
    with im:
        try:
            im.load()
        except (OSError, EOFError, SyntaxError, ValueError, struct.error, zlib.error) as e:
            raise ImageError("truncated", f"pixel data is truncated or corrupt ({e})") from None
        try:
            rgb = _to_rgb(im)
        except ValueError as e:
            raise ImageError("unsupported", f"cannot convert mode {im.mode} to RGB ({e})") from None
    method = _TRANSPOSE.get(orientation)
    return rgb if method is None else rgb.transpose(method)
