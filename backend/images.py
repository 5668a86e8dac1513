"""Fetch and decode task images safely.

Accepted image references (``task.data[<image var>]``):

* Label Studio paths: ``/data/upload/<project>/<file>`` and ``/data/local-files/?d=<path>`` — fetched
  from ``LABEL_STUDIO_URL`` with the API key (legacy token as ``Token``; a personal access token is
  exchanged for an access token and sent as ``Bearer``).  Local files are read from
  ``LOCAL_FILES_DOCUMENT_ROOT`` when it is set; the path must stay inside that root.
* absolute ``http://`` / ``https://`` URLs (redirects followed by hand, each hop checked);
* ``data:image/...;base64,...`` URLs.

Protections: download timeout, byte limit while streaming, pixel limit checked before decoding
(decompression bombs), content check (not an image -> 415), SSRF guard (no other schemes; hosts
resolving to private, loopback, link-local or reserved addresses are refused unless they are the
Label Studio host or ``ALLOW_PRIVATE_URLS`` is on).  Downloaded bytes are kept in a bounded LRU
keyed by URL.  Every failure is an :class:`ImageError` carrying an HTTP status and a clear message.

Predictions use :meth:`ImageFetcher.fetch_encoded`: the header is checked at once, the pixels are
decoded only if the inference engine's cache lacks the file (see :mod:`model.inference.image_input`).
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import requests
from PIL import Image, UnidentifiedImageError

from backend.errors import ClientError
from backend.settings import Settings
from model.inference.image_input import EncodedImage, decode_rgb, displayed_size

MAX_REDIRECTS = 3
CHUNK = 64 * 1024


class ImageError(ClientError):
    """An image that cannot be used; ``status`` is the HTTP status to answer with."""


@contextmanager
def _image_errors(data: bytes) -> Iterator[None]:
    """PIL's exceptions for unreadable, bomb or corrupt ``data`` -> :class:`ImageError`."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}", 413) from None
    except UnidentifiedImageError:
        head = data[:16]
        raise ImageError(
            f"content is not an image this server can read (starts with {head!r})", 415
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image data is truncated or corrupt: {exc}", 422) from None


class BytesLRU:
    """Thread-safe LRU of ``url -> bytes`` bounded by total size."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            if key in self._items:
                self._used -= len(self._items.pop(key))
            self._items[key] = data
            self._used += len(data)
            while self._used > self.capacity:
                _, old = self._items.popitem(last=False)
                self._used -= len(old)

    def __len__(self) -> int:
        return len(self._items)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port or _default_port(pa.scheme)) == (
        pb.scheme,
        pb.hostname,
        pb.port or _default_port(pb.scheme),
    )


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts)


class ImageFetcher:
    """Resolves image references to decoded RGB images (see the module docstring)."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or requests.Session()
        self.cache = BytesLRU(int(settings.image_cache_mb * 2**20))
        self.max_bytes = int(settings.max_image_mb * 2**20)
        self.ls_url = settings.label_studio_url.rstrip("/")
        self._access_token: str | None = None
        self._token_lock = threading.Lock()
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    # ------------------------------------------------------------------ public
    def fetch(self, ref: object, task_id: object = None) -> Image.Image:
        """Image reference -> RGB image with EXIF orientation applied (as browsers show it)."""
        return self.fetch_encoded(ref, task_id).decode()

    def fetch_encoded(self, ref: object, task_id: object = None) -> EncodedImage:
        """Image reference -> :class:`EncodedImage`: the bytes fetched and the header checked
        (content, pixel limit, displayed size) now, the pixels decoded when first needed - by the
        inference engine only when its cache lacks the image.  Errors name the task either way."""
        where = f" (task {task_id})" if task_id is not None else ""
        if not isinstance(ref, str) or not ref.strip():
            raise ImageError(f"image reference{where} must be a non-empty string URL, got {ref!r}", 400)
        ref = ref.strip()

        def decode(data: bytes) -> Image.Image:  # the header was checked below
            try:
                with _image_errors(data):
                    return decode_rgb(data)
            except ImageError as exc:
                raise ImageError(f"{exc.message}{where}", exc.status) from None

        try:
            data = self._cached_bytes(ref)
            return EncodedImage(data, decode, size=self.header(data))
        except ImageError as exc:
            raise ImageError(f"{exc.message}{where}", exc.status) from None

    def fetch_bytes(self, ref: str) -> bytes:
        """Raw bytes for a reference (no decoding), with the same checks as :meth:`fetch`."""
        return self._cached_bytes(ref)

    def header(self, data: bytes) -> tuple[int, int]:
        """Displayed ``(width, height)`` of encoded image bytes (EXIF orientation applied), after
        checking the content and the pixel count - from the header, without decoding pixels."""
        with _image_errors(data):
            image = Image.open(io.BytesIO(data))  # reads the header only
            w, h = image.size
            if w * h > self.settings.max_image_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, more than the limit of "
                    f"{self.settings.max_image_pixels} (MAX_IMAGE_PIXELS); refusing to decode",
                    413,
                )
            if w <= 0 or h <= 0:
                raise ImageError(f"image has an empty size {w}x{h}", 422)
            return displayed_size(image)

    # ------------------------------------------------------------------ sources
    def _cached_bytes(self, ref: str) -> bytes:
        cached = self.cache.get(ref)
        if cached is not None:
            return cached
        data = self._load(ref)
        self.cache.put(ref, data)
        return data

    def _load(self, ref: str) -> bytes:
        low = ref[:16].lower()
        if low.startswith("data:"):
            return self._data_url(ref)
        if low.startswith(("http://", "https://")):
            return self._download(ref)
        if "://" in ref[:16] or low.startswith("file:"):
            scheme = ref.split(":", 1)[0]
            raise ImageError(f"image URL scheme {scheme!r} is not allowed (only http, https, data)", 400)
        if ref.startswith("/data/local-files") and self.settings.local_files_root:
            return self._local_file(ref)
        if ref.startswith("/"):
            if not self.ls_url:
                raise ImageError(
                    f"image {ref!r} is a Label Studio path but LABEL_STUDIO_URL is not set on the backend",
                    400,
                )
            return self._download(self.ls_url + ref)
        raise ImageError(f"image reference {ref[:100]!r} is not an http(s), data or Label Studio URL", 400)

    def _data_url(self, ref: str) -> bytes:
        header, sep, payload = ref.partition(",")
        if not sep:
            raise ImageError("data URL has no ',' separating header and data", 400)
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageError(f"data URL image is larger than {self.settings.max_image_mb} MiB", 413)
        if header.lower().endswith(";base64"):
            try:
                return base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError) as exc:
                raise ImageError(f"data URL is not valid base64: {exc}", 400) from None
        return unquote(payload).encode("latin-1", errors="replace")

    def _local_file(self, ref: str) -> bytes:
        query = parse_qs(urlsplit(ref).query)
        rel = (query.get("d") or [""])[0]
        if not rel:
            raise ImageError(f"local-files URL {ref!r} has no ?d=<path>", 400)
        root = Path(self.settings.local_files_root).resolve()
        path = (root / rel.lstrip("/")).resolve()
        if not path.is_relative_to(root):
            raise ImageError(f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT", 403)
        if not path.is_file():
            raise ImageError(f"local file {rel!r} not found under LOCAL_FILES_DOCUMENT_ROOT", 404)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise ImageError(
                f"local file {rel!r} is {size} bytes, over {self.settings.max_image_mb} MiB", 413
            )
        return path.read_bytes()

    # ------------------------------------------------------------------ http
    def _check_host(self, url: str) -> bool:
        """SSRF guard; returns True when the URL is on the Label Studio host (send the API key)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"image URL {url[:200]!r} must be http(s) with a host", 400)
        if self.ls_url and _same_origin(url, self.ls_url):
            return True
        if self.settings.allow_private_urls:
            return False
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or _default_port(parts.scheme))
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageError(f"image host {parts.hostname!r} cannot be resolved: {exc}", 422) from None
        blocked = sorted({str(info[4][0]) for info in infos if not _is_public(str(info[4][0]))})
        if blocked:
            raise ImageError(
                f"image host {parts.hostname!r} resolves to a private/loopback address ({blocked[0]}); "
                "refused (set ALLOW_PRIVATE_URLS=true to allow)",
                403,
            )
        return False

    def auth_header(self, refresh: bool = False) -> dict[str, str]:
        """``Authorization`` header for Label Studio API calls (``{}`` when no key is set)."""
        key = self.settings.label_studio_api_key
        if not key:
            return {}
        if not _looks_like_jwt(key):
            return {"Authorization": f"Token {key}"}
        with self._token_lock:
            if self._access_token is None or refresh:
                self._access_token = self._exchange_pat(key)
            return {"Authorization": f"Bearer {self._access_token}"}

    def _exchange_pat(self, refresh_token: str) -> str:
        """Personal access token (a JWT refresh token) -> short-lived access token."""
        try:
            resp = self.session.post(
                f"{self.ls_url}/api/token/refresh",
                json={"refresh": refresh_token},
                timeout=self.settings.image_timeout,
            )
            resp.raise_for_status()
            return str(resp.json()["access"])
        except (requests.RequestException, KeyError, ValueError) as exc:
            raise ImageError(
                f"cannot exchange LABEL_STUDIO_API_KEY for an access token: {exc}", 502
            ) from None

    def _download(self, url: str) -> bytes:
        deadline = time.monotonic() + self.settings.image_timeout
        for _ in range(MAX_REDIRECTS + 1):
            on_ls = self._check_host(url)
            resp = self._get(url, on_ls)
            if resp.status_code == 401 and on_ls and _looks_like_jwt(self.settings.label_studio_api_key):
                resp.close()
                self.auth_header(refresh=True)
                resp = self._get(url, on_ls)
            if resp.is_redirect and resp.headers.get("location"):
                url = urljoin(url, resp.headers["location"])
                resp.close()
                continue
            with resp:
                return self._read_body(url, resp, deadline)
        raise ImageError(f"image URL redirected more than {MAX_REDIRECTS} times", 422)

    def _get(self, url: str, on_ls: bool) -> requests.Response:
        headers = self.auth_header() if on_ls else {}
        try:
            return self.session.get(
                url, headers=headers, stream=True, allow_redirects=False, timeout=self.settings.image_timeout
            )
        except requests.Timeout:
            raise ImageError(
                f"timed out after {self.settings.image_timeout} s fetching image {url[:200]}", 504
            ) from None
        except requests.RequestException as exc:
            raise ImageError(f"cannot fetch image {url[:200]}: {type(exc).__name__}", 502) from None

    def _read_body(self, url: str, resp: requests.Response, deadline: float) -> bytes:
        if resp.status_code >= 400:
            hint = " (check LABEL_STUDIO_API_KEY)" if resp.status_code in (401, 403) else ""
            raise ImageError(f"image URL {url[:200]} answered HTTP {resp.status_code}{hint}", 422)
        length = resp.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise ImageError(f"image is {length} bytes, over the {self.settings.max_image_mb} MiB limit", 413)
        buf = bytearray()
        try:
            for chunk in resp.iter_content(CHUNK):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError(f"image is larger than the {self.settings.max_image_mb} MiB limit", 413)
                if time.monotonic() > deadline:
                    raise ImageError(f"image download took longer than {self.settings.image_timeout} s", 504)
        except requests.RequestException as exc:
            raise ImageError(f"image download from {url[:200]} failed: {type(exc).__name__}", 502) from None
        return bytes(buf)
