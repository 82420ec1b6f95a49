import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from sail_megatron.data.image_io import ImageError, decode_rgb, read_image_size


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, chunks = 8, []
    while pos < len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        chunks.append((ctype, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p)) for t, p in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def reason(fn, *args, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        fn(*args, **kwargs)
    return info.value.reason


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_valid_sizes(fmt):
    data = encode(noise(37, 23), fmt)
    assert read_image_size(data) == (37, 23)
    out = decode_rgb(data)
    assert out.mode == "RGB" and out.size == (37, 23)


def test_lossless_png_roundtrip():
    im = noise(31, 17)
    assert np.array_equal(np.asarray(decode_rgb(encode(im, "PNG"))), np.asarray(im))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_half(fmt):
    data = encode(noise(64, 64), fmt)
    half = data[: len(data) // 2]
    assert reason(read_image_size, half) == "truncated"
    assert reason(decode_rgb, half) == "truncated"


def test_jpeg_zero_padding_is_fine():
    data = encode(noise(16, 16), "JPEG") + b"\x00" * 700
    assert read_image_size(data) == (16, 16)
    assert decode_rgb(data).size == (16, 16)


def test_png_with_corrupt_pixel_data_fails_decode():
    # IEND is present (the header check passes) but the IDAT stream is cut: load() must raise.
    chunks = png_chunks(encode(noise(64, 64), "PNG"))
    data = png_build([(t, p[: len(p) // 2] if t == b"IDAT" else p) for t, p in chunks])
    assert read_image_size(data) == (64, 64)
    assert reason(decode_rgb, data) == "truncated"


def test_empty():
    assert reason(read_image_size, b"") == "empty"
    assert reason(decode_rgb, b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"The quick brown fox jumps over the lazy dog.\n" * 50,
    ],
    ids=["random", "text"],
)
def test_not_an_image(data):
    assert reason(read_image_size, data) == "not_an_image"
    assert reason(decode_rgb, data) == "not_an_image"


def test_unsupported_format():
    data = encode(noise(8, 8), "PPM")  # PIL reads it, but it is not on our allow-list
    assert reason(read_image_size, data) == "unsupported"
    assert reason(decode_rgb, data) == "unsupported"


def test_grayscale_jpeg():
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)), mode="L")
    out = np.asarray(decode_rgb(encode(gray, "JPEG")))
    assert out.shape == (16, 64, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red
    out = np.asarray(decode_rgb(encode(cmyk, "JPEG", quality=95))).astype(int)
    assert np.abs(out - np.array([255, 0, 0])).max() <= 8


def test_png_alpha_composites_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # transparent black everywhere ...
    rgba[:, 4:] = (10, 120, 200, 255)  # ... except an opaque right half
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = np.asarray(decode_rgb(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))).astype(int)
    assert (out[1:, :4] == 255).all()
    assert (out[:, 4:] == (10, 120, 200)).all()
    assert np.abs(out[0, 0] - 127).max() <= 1


def test_la_png():
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[:, 2:] = (50, 255)
    out = np.asarray(decode_rgb(encode(Image.fromarray(la, mode="LA"), "PNG")))
    assert (out[:, :2] == 255).all() and (out[:, 2:] == 50).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    pal.paste(1, (2, 0, 4, 4))
    out = np.asarray(decode_rgb(encode(pal, fmt, transparency=0)))
    assert (out[:, :2] == 255).all() and (out[:, 2:] == (200, 30, 40)).all()


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 65535, 32768, 257, 1000]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    out = np.asarray(decode_rgb(encode(im, "PNG"))).astype(int)
    assert out.shape == (1, 5, 3) and (out == out[..., :1]).all()
    gray = out[0, :, 0]
    assert gray[0] == 0 and gray[1] == 255 and abs(gray[2] - 128) <= 1 and gray[3] == 1 and gray[4] == 4


def test_exif_orientation_6_jpeg():
    data = encode(noise(40, 20), "JPEG", exif=exif_orientation(6))
    assert read_image_size(data) == (20, 40)
    assert decode_rgb(data).size == (20, 40)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_matches_pil(fmt, orientation):
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(noise(40, 20), fmt, exif=exif_orientation(orientation), **kwargs)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    out = decode_rgb(data)
    assert read_image_size(data) == out.size == expected.size
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_exif_orientation_png_after_pixel_data():
    # An eXIf chunk after IDAT is invisible to a header-only PIL open; both functions must agree.
    chunks = png_chunks(encode(noise(40, 20), "PNG", exif=exif_orientation(8)))
    exif = [c for c in chunks if c[0] == b"eXIf"]
    rest = [c for c in chunks if c[0] not in (b"eXIf", b"IEND")]
    data = png_build(rest + exif + [(b"IEND", b"")])
    assert [c[0] for c in png_chunks(data)][-2:] == [b"eXIf", b"IEND"]
    assert read_image_size(data) == (20, 40)
    assert decode_rgb(data).size == (20, 40)


def test_extreme_aspect():
    data = encode(noise(1, 4000), "JPEG")
    assert read_image_size(data) == (1, 4000)
    assert decode_rgb(data).size == (1, 4000)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload starts after signature + len + type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("side", [30000, 10000], ids=["past_pil_bomb_error", "past_our_limit_only"])
def test_too_large_header(side):
    data = png_claiming(side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak out
        assert reason(read_image_size, data) == "too_large"
        assert reason(decode_rgb, data) == "too_large"


def test_max_pixels_argument():
    data = encode(noise(100, 100), "PNG")
    assert reason(read_image_size, data, max_pixels=9999) == "too_large"
    assert read_image_size(data, max_pixels=10000) == (100, 100)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image_size(data, max_pixels=0)


def test_image_error_is_value_error():
    err = ImageError("truncated", "cut short")
    assert isinstance(err, ValueError) and err.reason == "truncated" and "cut short" in str(err)
