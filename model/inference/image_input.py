"""Images as the inference engine takes them: decoded, or encoded files it decodes only on a miss.

The engine caches per-image work under a content hash.  For a decoded image that hash is a pass
over its pixels; for an :class:`EncodedImage` (the bytes of a PNG / JPEG file, what a server
receives) it is a hash of the file, and the pixels are decoded only when the engine's cache does
not hold the image.  A new box on an image already seen then costs neither the decode nor the
pixel hash, which on a photo-sized file outweigh the engine's own work for the box
(docs/design-notes.md).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from functools import cached_property
from typing import Any

from PIL import Image, ImageOps

__all__ = [
    "EncodedImage",
    "ImageLike",
    "cache_key",
    "decode_rgb",
    "displayed_size",
    "encode_image",
    "image_key",
    "pixels",
]

# EXIF orientations that turn the stored picture by 90 degrees (width and height swap).
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image -> RGB image with its EXIF orientation applied (as browsers show it)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image).convert("RGB")


def encode_image(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    """``image`` as the bytes of a ``fmt`` file (``options`` go to ``Image.save``, e.g. JPEG's
    ``quality``); the inverse of :func:`decode_rgb`, lossless for PNG."""
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def displayed_size(header: Image.Image) -> tuple[int, int]:
    """``(width, height)`` an opened, not decoded, image has once its EXIF orientation is applied.

    PIL's ``getexif()`` on a PNG decodes the pixels to look for an eXIf chunk after them, so for
    PNG only the EXIF ahead of the pixel data (what ``open`` parsed) is read; a PNG whose eXIf
    chunk follows its pixels is taken as unrotated here (such files are rare; JPEG, WebP and TIFF
    keep EXIF in the header)."""
    w, h = header.size
    if header.format == "PNG":
        exif = Image.Exif()
        raw = header.info.get("exif")
        if raw:
            exif.load(raw)
    else:
        exif = header.getexif()
    if exif.get(_ORIENTATION_TAG) in _TRANSPOSED_ORIENTATIONS:
        return h, w
    return w, h


class EncodedImage:
    """The bytes of an image file; decoded (once, on first use) only when pixels are needed.

    ``decoder`` turns the bytes into the RGB image (default :func:`decode_rgb`; a server passes
    its own, which checks limits and raises its own errors).  ``size``: ``(width, height)`` as
    displayed, read from the header unless the caller already did.
    """

    def __init__(
        self,
        data: bytes,
        decoder: Callable[[bytes], Image.Image] = decode_rgb,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.data = data
        self.size = size or displayed_size(Image.open(io.BytesIO(data)))
        self._decoder = decoder
        self._image: Image.Image | None = None
        self._lock = threading.Lock()
        self.decodes = 0  # how often the pixels were decoded (0 or 1; for tests and stats)

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @cached_property
    def key(self) -> str:
        """Content hash of the file (a different encoding of the same pixels is another key)."""
        return "file:" + hashlib.sha256(self.data).hexdigest()

    def decode(self) -> Image.Image:
        """The RGB image, decoded on the first call."""
        with self._lock:
            if self._image is None:
                self._image = self._decoder(self.data)
                self.decodes += 1
            return self._image


ImageLike = Image.Image | EncodedImage


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image (size + mode + pixels)."""
    h = hashlib.sha256(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def cache_key(image: ImageLike) -> str:
    """The engine's cache key of ``image``: the file hash of an encoded image, else the pixel hash."""
    return image.key if isinstance(image, EncodedImage) else image_key(image)


def pixels(image: ImageLike) -> Image.Image:
    """The decoded image (decoding an :class:`EncodedImage` if it was not yet)."""
    return image.decode() if isinstance(image, EncodedImage) else image
