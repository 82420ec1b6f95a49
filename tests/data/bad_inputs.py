"""The bad and unusual images of the data-pipeline tests, made in code (nothing shipped)."""

import numpy as np
from PIL import Image

from tests.data.test_image_io import encode, exif_orientation, noise, png_claiming

# name -> (bytes, extension, expected skip reason or None when the image must be converted and kept)


def cases() -> dict:
    good = encode(noise(300, 200), "JPEG", quality=90)
    sixteen = Image.fromarray((np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 30).astype(np.uint16))
    rgba = noise(60, 40).convert("RGBA")
    rgba.putalpha(Image.new("L", (60, 40), 0))
    return {
        "good": (good, "jpg", None),
        "good_png": (encode(noise(120, 90, seed=1), "PNG"), "png", None),
        "grayscale": (encode(noise(80, 60).convert("L"), "JPEG"), "jpg", None),
        "cmyk": (encode(noise(80, 60).convert("CMYK"), "JPEG"), "jpg", None),
        "alpha": (encode(rgba, "PNG"), "png", None),
        "sixteen_bit": (encode(sixteen, "PNG"), "png", None),
        "exif_rotated": (encode(noise(40, 20), "JPEG", exif=exif_orientation(6)), "jpg", None),
        "extreme_aspect": (encode(noise(1, 4000), "PNG"), "png", None),
        "truncated": (good[: len(good) // 2], "jpg", "image_truncated"),
        "zero_bytes": (b"", "jpg", "image_empty"),
        "not_an_image": (b"this is not an image at all\n" * 10, "jpg", "image_not_an_image"),
        "bomb_header": (png_claiming(30000, 30000), "png", "image_too_large"),
    }
