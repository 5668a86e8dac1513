"""Fetch and decode task images safely.

Accepted image references (``task.data[<image var>]``):

* Label Studio media paths (:data:`backend.urls.MEDIA_ROUTES`: ``/data/upload/<project>/<file>``,
  ``/data/local-files/?d=<path>``, ``/storage-data/uploaded/?filepath=…``,
  ``/tasks/<id>/presign/?fileuri=…``), normalised first (``..``, ``%2e%2e``, ``//``) — fetched from
  ``LABEL_STUDIO_URL`` with the API key (legacy token as ``Token``; a personal access token is
  exchanged for an access token and sent as ``Bearer``).  Local files are read from
  ``LOCAL_FILES_DOCUMENT_ROOT`` when it is set; the path must stay inside that root.
* absolute ``http://`` / ``https://`` URLs (redirects followed by hand, at most
  :data:`MAX_REDIRECTS`, each hop checked);
* ``data:image/...;base64,...`` URLs.

Protections: download timeout, byte limit while streaming, pixel limit checked before decoding
(decompression bombs), content check (not an image -> 415; the bytes are never quoted back), and
the SSRF guard of :mod:`backend.urls`: every hop's URL is parsed once with urllib3's parser
(ambiguous authorities refused), its host resolved once, every address checked (private,
loopback, link-local, reserved, and IPv6 forms embedding such IPv4 addresses are refused unless
the hop is on the Label Studio origin or ``ALLOW_PRIVATE_URLS`` is on), and the connection opened
to a checked address (Host header, TLS SNI and certificate name stay the URL's host).  The API
key goes only to Label Studio's origin, on its media routes.  Downloaded bytes are kept in a
bounded LRU keyed by reference.  Every failure is an :class:`ImageError` carrying an HTTP status
and a clear message.

Predictions use :meth:`ImageFetcher.fetch_encoded`: the header is checked at once, the pixels are
decoded only if the inference engine's cache lacks the file (see :mod:`model.inference.image_input`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote_to_bytes, urljoin

import requests
import urllib3
from PIL import Image, UnidentifiedImageError
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from backend.errors import ClientError
from backend.settings import Settings, SettingsError
from backend.urls import (
    DEFAULT_PORTS,
    URLRefused,
    address_problem,
    bare_host,
    is_localhost_name,
    label_studio_media_path,
    origin,
    parse_http_url,
    resolve,
)
from model.inference.cache import SizedLRU
from model.inference.image_input import EncodedImage, decode_rgb, displayed_size

__all__ = ["MAX_REDIRECTS", "ImageError", "ImageFetcher"]

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
    except UnidentifiedImageError:  # the bytes are not quoted: they may be a secret a redirect found
        raise ImageError(f"content ({len(data)} bytes) is not an image this server can read", 415) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image data is truncated or corrupt: {exc}", 422) from None


def _ca_bundle() -> str:
    """The CA bundle requests would use: ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``, else certifi's."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or requests.certs.where()


@dataclass(frozen=True)
class _Hop:
    """One checked request of a download: the addresses to connect to and what to send."""

    url: str  # as parsed by urllib3, for messages and for resolving a redirect's Location
    scheme: str
    host: str  # resolver form: no brackets, lower case
    port: int
    host_header: str  # the URL's host[:port]; also the TLS SNI / certificate name (host part)
    target: str  # path?query sent on the request line
    addresses: tuple[str, ...]  # resolved once, checked; the only places the request may go
    to_label_studio: bool  # Label Studio's origin and a media route: the API key is sent

    @property
    def tls_names(self) -> dict[str, str] | None:
        """Pool arguments keeping SNI and the certificate check on the name, not the address."""
        if self.scheme != "https" or self.host in self.addresses:
            return None
        return {"server_hostname": self.host, "assert_hostname": self.host}


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts)


class ImageFetcher:
    """Resolves image references to decoded RGB images (see the module docstring)."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.session = session or requests.Session()
        self.cache: SizedLRU[str, bytes] = SizedLRU(int(settings.image_cache_mb * 2**20), len)
        self.max_bytes = int(settings.max_image_mb * 2**20)
        self.ls_url = settings.label_studio_url.rstrip("/")
        try:
            ls = parse_http_url(self.ls_url) if self.ls_url else None
        except URLRefused as exc:
            raise SettingsError(f"LABEL_STUDIO_URL cannot be used: {exc.message}") from None
        self._ls_origin = origin(ls) if ls else None
        self._ls_base = (ls.path or "").rstrip("/") if ls else ""  # Label Studio under a path prefix
        self._pools = urllib3.PoolManager(num_pools=32, retries=False, ca_certs=_ca_bundle())
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
        try:
            return self._load_unchecked(ref)
        except URLRefused as exc:
            raise ImageError(exc.message, exc.status) from None

    def _load_unchecked(self, ref: str) -> bytes:
        low = ref[:16].lower()
        if low.startswith("data:"):
            return self._data_url(ref)
        if low.startswith(("http://", "https://")):
            return self._download(ref)
        if "://" in ref[:16] or low.startswith("file:"):
            scheme = ref.split(":", 1)[0]
            raise ImageError(f"image URL scheme {scheme!r} is not allowed (only http, https, data)", 400)
        if ref.startswith("/"):
            path, _, query = ref.split("#", 1)[0].partition("?")
            media = label_studio_media_path(path, query)
            suffix = f"?{query}" if query else ""
            if media.startswith("/data/local-files") and self.settings.local_files_root:
                return self._local_file(query)
            if not self.ls_url:
                raise ImageError(
                    f"image {ref[:200]!r} is a Label Studio path but LABEL_STUDIO_URL is not set "
                    "on the backend",
                    400,
                )
            return self._download(self.ls_url + media + suffix)
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
        return unquote_to_bytes(payload)  # %89PNG is the byte 0x89, not a character

    def _local_file(self, query: str) -> bytes:
        """``?d=<path>`` under ``LOCAL_FILES_DOCUMENT_ROOT`` (control characters were refused)."""
        rel = (parse_qs(query).get("d") or [""])[0]
        if not rel:
            raise ImageError(f"local-files URL ?{query[:200]} has no d=<path>", 400)
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
    def _hop(self, url: str) -> _Hop:
        """Parse ``url`` once, resolve its host once and check every address (see the module
        docstring); Label Studio's origin must be asked for a media route."""
        parsed = parse_http_url(url)
        to_ls = self._ls_origin is not None and origin(parsed) == self._ls_origin
        target = parsed.request_uri
        if to_ls:
            target = self._label_studio_target(parsed.path or "/", parsed.query or "")
        scheme, host = parsed.scheme or "http", bare_host(parsed)
        port = parsed.port or DEFAULT_PORTS[scheme]
        private_ok = to_ls or self.settings.allow_private_urls
        refused = "refused (set ALLOW_PRIVATE_URLS=true to allow private addresses)"
        if not private_ok and is_localhost_name(host):
            raise ImageError(f"image host {host!r} is a private/loopback name; {refused}", 403)
        try:
            addresses = tuple(resolve(host, port))
        except (OSError, UnicodeError) as exc:
            raise ImageError(f"image host {host!r} cannot be resolved: {exc}", 422) from None
        if not addresses:
            raise ImageError(f"image host {host!r} resolves to no address", 422)
        for address in addresses if not private_ok else ():
            problem = address_problem(address)
            if problem:
                raise ImageError(
                    f"image host {host!r} resolves to {address}, a private/non-public address "
                    f"({problem}); {refused}",
                    403,
                )
        shown_port = f":{parsed.port}" if parsed.port and parsed.port != DEFAULT_PORTS[scheme] else ""
        return _Hop(str(parsed), scheme, host, port, f"{parsed.host}{shown_port}", target, addresses, to_ls)

    def _label_studio_target(self, path: str, query: str) -> str:
        """Request target on Label Studio's origin: a normalised media route, or refused (403)."""
        base = self._ls_base
        if base and path != base and not path.startswith(base + "/"):
            raise ImageError(f"Label Studio URL path {path[:200]!r} is outside {base!r}; refused", 403)
        media = label_studio_media_path(path[len(base) :], query)
        return base + media + (f"?{query}" if query else "")

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
            hop = self._hop(url)
            resp = self._send(hop, deadline)
            key = self.settings.label_studio_api_key
            if resp.status == 401 and hop.to_label_studio and _looks_like_jwt(key):
                _discard(resp)
                self.auth_header(refresh=True)
                resp = self._send(hop, deadline)
            location = resp.get_redirect_location()
            if location:
                _discard(resp)
                url = urljoin(hop.url, location)
                continue
            try:
                data = self._read_body(hop, resp, deadline)
            except BaseException:
                _discard(resp)
                raise
            resp.release_conn()
            return data
        raise ImageError(f"image URL redirected more than {MAX_REDIRECTS} times", 422)

    def _send(self, hop: _Hop, deadline: float) -> urllib3.BaseHTTPResponse:
        """GET ``hop`` from one of its checked addresses (the next one if a connection fails)."""
        headers = {"Host": hop.host_header, "User-Agent": "roi-ml-backend", "Accept": "image/*, */*;q=0.5"}
        if hop.to_label_studio:
            headers.update(self.auth_header())
        failure: Exception | None = None
        for address in hop.addresses:
            left = max(deadline - time.monotonic(), 0.01)
            pool = self._pools.connection_from_host(address, hop.port, hop.scheme, hop.tls_names)
            try:
                return pool.urlopen(
                    "GET",
                    hop.target,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    assert_same_host=False,
                    preload_content=False,
                    release_conn=False,
                    timeout=urllib3.Timeout(connect=left, read=min(left, self.settings.image_timeout)),
                )
            except NewConnectionError as exc:  # refused/unreachable: try the next checked address
                failure = exc
            except Urllib3Timeout:
                raise ImageError(
                    f"timed out after {self.settings.image_timeout} s fetching image {hop.url[:200]}", 504
                ) from None
            except HTTPError as exc:
                raise ImageError(f"cannot fetch image {hop.url[:200]}: {type(exc).__name__}", 502) from None
        raise ImageError(f"cannot fetch image {hop.url[:200]}: {type(failure).__name__}", 502)

    def _read_body(self, hop: _Hop, resp: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        if resp.status >= 400:
            hint = " (check LABEL_STUDIO_API_KEY)" if resp.status in (401, 403) else ""
            raise ImageError(f"image URL {hop.url[:200]} answered HTTP {resp.status}{hint}", 422)
        length = resp.headers.get("content-length")
        # isdigit() is also true of "²", which int() refuses: ASCII digits only
        if length and length.isascii() and length.isdigit() and int(length) > self.max_bytes:
            raise ImageError(f"image is {length} bytes, over the {self.settings.max_image_mb} MiB limit", 413)
        slow = f"image download took longer than {self.settings.image_timeout} s"
        buf = bytearray()
        try:
            for chunk in resp.stream(CHUNK, decode_content=True):
                buf += chunk
                if len(buf) > self.max_bytes:
                    raise ImageError(f"image is larger than the {self.settings.max_image_mb} MiB limit", 413)
                if time.monotonic() > deadline:
                    raise ImageError(slow, 504)
        except Urllib3Timeout:
            raise ImageError(slow, 504) from None
        except HTTPError as exc:
            failed = f"image download from {hop.url[:200]} failed: {type(exc).__name__}"
            raise ImageError(failed, 502) from None
        return bytes(buf)


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Drop a response whose body is not wanted (closing, not draining: the body may be endless)."""
    resp.close()
    resp.release_conn()
