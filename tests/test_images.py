"""Image fetching: sources, limits, decompression bombs, content checks and the SSRF guard.

A local ``http.server`` on 127.0.0.1 stands in for Label Studio and for image hosts; private
addresses other than loopback are only ever refused (never contacted).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from PIL import Image

from backend.images import ImageError, ImageFetcher
from backend.settings import Settings
from model.inference.image_input import encode_image


def png_bytes(size=(40, 30), color=(200, 30, 30), mode="RGB") -> bytes:
    return encode_image(Image.new(mode, size, color if mode == "RGB" else 0), "PNG")


SMALL_PNG = png_bytes()
BOMB_PNG = png_bytes((4000, 4000), mode="1")  # 16 Mpx, a few KiB on disk
BIG_BYTES = os.urandom(64 * 1024)


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    auth: list[str | None] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, body: bytes, ctype: str = "image/png", length: bool = True, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def do_GET(self) -> None:
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        Handler.auth.append(self.headers.get("Authorization"))
        path = self.path.split("?")[0]
        if path in ("/img.png", "/data/upload/1/img.png", "/counted.png"):
            self._send(SMALL_PNG)
        elif path == "/bomb.png":
            self._send(BOMB_PNG)
        elif path == "/page.html":
            self._send(b"<html>not an image</html>", "text/html")
        elif path == "/truncated.png":
            self._send(SMALL_PNG[: len(SMALL_PNG) // 2])
        elif path == "/big.bin":
            self._send(BIG_BYTES, "image/png")
        elif path == "/big-nolength.bin":
            self.close_connection = True
            self._send(BIG_BYTES, "image/png", length=False)
        elif path == "/odd-length.png":  # "²".isdigit() is True, int("²") raises
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "\xb2")
            self.end_headers()
            self.wfile.write(SMALL_PNG)
        elif path == "/slow.png":
            time.sleep(1.5)
            self._send(SMALL_PNG)
        elif path == "/data/upload/1/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/x.png")
            self.end_headers()
        elif path == "/data/upload/1/redirect-ok":
            self.send_response(302)
            self.send_header("Location", "/data/upload/1/img.png")
            self.end_headers()
        else:
            self._send(b"missing", "text/plain", status=404)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.rstrip("/") == "/api/token/refresh" and body.get("refresh"):
            self._send(json.dumps({"access": "short-lived"}).encode(), "application/json")
        else:
            self._send(b"{}", "application/json", status=400)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def fetcher(**overrides) -> ImageFetcher:
    base = Settings(image_timeout=0.8, max_image_pixels=4_000_000)
    return ImageFetcher(replace(base, **overrides))


def test_http_url_allowed_when_private_urls_allowed(server):
    image = fetcher(allow_private_urls=True).fetch(f"{server}/img.png")
    assert image.size == (40, 30) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (200, 30, 30)


def test_loopback_refused_without_allow_list(server):
    with pytest.raises(ImageError) as info:
        fetcher().fetch(f"{server}/img.png")
    assert info.value.status == 403 and "private" in info.value.message


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3/x.png", "http://169.254.169.254/latest", "http://[::1]/x.png"]
)
def test_private_addresses_refused_before_connecting(url):
    with pytest.raises(ImageError) as info:
        fetcher().fetch(url)
    assert info.value.status == 403


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://x/1", "img.png"])
def test_other_schemes_refused(url):
    with pytest.raises(ImageError) as info:
        fetcher().fetch(url)
    assert info.value.status == 400


def test_label_studio_upload_uses_token_and_ls_host_is_allowed(server):
    Handler.auth.clear()
    f = fetcher(label_studio_url=server, label_studio_api_key="legacy-token-123")
    assert f.fetch("/data/upload/1/img.png").size == (40, 30)
    assert Handler.auth[-1] == "Token legacy-token-123"


def test_personal_access_token_is_exchanged_for_bearer(server):
    Handler.auth.clear()
    f = fetcher(label_studio_url=server, label_studio_api_key="aaa.bbb.ccc")
    f.fetch("/data/upload/1/img.png?pat")
    assert Handler.auth[-1] == "Bearer short-lived"


def test_api_key_not_sent_to_other_hosts(server):
    Handler.auth.clear()
    f = fetcher(
        label_studio_url="http://ls.invalid:8080", label_studio_api_key="secret", allow_private_urls=True
    )
    f.fetch(f"{server}/img.png?other")
    assert Handler.auth[-1] is None


def test_redirects_are_checked_hop_by_hop(server):
    """Label Studio's origin (its media routes only, see tests/test_ssrf.py) redirects; each hop is
    checked on its own."""
    f = fetcher(label_studio_url=server)
    with pytest.raises(ImageError) as info:
        f.fetch(f"{server}/data/upload/1/redirect-private")
    assert info.value.status == 403 and "10.0.0.1" in info.value.message
    assert f.fetch(f"{server}/data/upload/1/redirect-ok").size == (40, 30)


def test_relative_path_needs_label_studio_url():
    with pytest.raises(ImageError) as info:
        fetcher().fetch("/data/upload/1/img.png")
    assert info.value.status == 400 and "LABEL_STUDIO_URL" in info.value.message


def test_decompression_bomb_refused(server):
    with pytest.raises(ImageError) as info:
        fetcher(allow_private_urls=True).fetch(f"{server}/bomb.png")
    assert info.value.status == 413 and "pixels" in info.value.message


@pytest.mark.parametrize(
    "path, status", [("/page.html", 415), ("/truncated.png", 422), ("/missing.png", 422)]
)
def test_bad_content_gives_clear_errors(server, path, status):
    with pytest.raises(ImageError) as info:
        fetcher(allow_private_urls=True).fetch(f"{server}{path}", task_id=7)
    assert info.value.status == status and "task 7" in info.value.message


@pytest.mark.parametrize("path", ["/big.bin", "/big-nolength.bin"])
def test_byte_limit_stops_download(server, path):
    with pytest.raises(ImageError) as info:
        fetcher(allow_private_urls=True, max_image_mb=0.01).fetch(f"{server}{path}")
    assert info.value.status == 413


def test_timeout(server):
    started = time.monotonic()
    with pytest.raises(ImageError) as info:
        fetcher(allow_private_urls=True, image_timeout=0.3).fetch(f"{server}/slow.png")
    assert info.value.status == 504
    assert time.monotonic() - started < 1.4


def test_unreachable_host_is_a_clear_error():
    with pytest.raises(ImageError) as info:
        fetcher(allow_private_urls=True).fetch("http://127.0.0.1:9/x.png")  # discard port: refused
    assert info.value.status == 502


def test_bytes_are_cached_by_url(server):
    f = fetcher(allow_private_urls=True)
    before = Handler.hits.get("/counted.png", 0)
    f.fetch(f"{server}/counted.png")
    f.fetch(f"{server}/counted.png")
    assert Handler.hits["/counted.png"] == before + 1
    assert f.cache.hits == 1


def test_cache_is_bounded():
    f = fetcher(image_cache_mb=len(SMALL_PNG) * 2.5 / 2**20)
    for i in range(5):
        f.cache.put(f"k{i}", SMALL_PNG)
    assert len(f.cache) == 2 and f.cache.get("k4") is not None and f.cache.get("k0") is None


def test_a_hostile_content_length_is_read_past_not_a_crash(server):
    assert fetcher(allow_private_urls=True).fetch(f"{server}/odd-length.png").size == (40, 30)


def test_data_urls():
    url = "data:image/png;base64," + base64.b64encode(SMALL_PNG).decode()
    assert fetcher().fetch(url).size == (40, 30)
    # percent-encoded (not base64): %89 is the byte 0x89 of the PNG signature
    assert fetcher().fetch("data:image/png," + quote_from_bytes(SMALL_PNG)).size == (40, 30)
    with pytest.raises(ImageError) as info:
        fetcher().fetch("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    assert info.value.status == 415
    with pytest.raises(ImageError) as info:
        fetcher().fetch("data:image/png;base64")
    assert info.value.status == 400


def test_local_files_inside_root_only(tmp_path: Path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(SMALL_PNG)
    outside = tmp_path / "secret.png"
    outside.write_bytes(SMALL_PNG)
    (root / "link.png").symlink_to(outside)
    f = fetcher(local_files_root=str(root))
    assert f.fetch("/data/local-files/?d=sub/a.png").size == (40, 30)
    assert f.fetch("/data/local-files/?d=sub%2Fa.png").size == (40, 30)
    for escape in ("../secret.png", "sub/../../secret.png", "link.png"):
        with pytest.raises(ImageError) as info:
            f.fetch(f"/data/local-files/?d={escape}")
        assert info.value.status == 403, escape
    with pytest.raises(ImageError) as info:
        f.fetch("/data/local-files/?d=/etc/passwd")
    assert info.value.status == 404


def exif_rotated(fmt: str, size=(40, 30), orientation=6) -> bytes:
    """An image stored ``size`` whose EXIF says to show it turned by 90 degrees."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(Image.new("RGB", size, (10, 200, 10)), fmt, exif=exif.tobytes())


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_encoded_fetch_reads_the_displayed_size_from_the_header_and_decodes_once(fmt):
    f = fetcher()
    url = data_url(exif_rotated(fmt), f"image/{fmt.lower()}")
    image = f.fetch_encoded(url, task_id=3)
    assert image.size == (30, 40) and image.decodes == 0  # turned, as browsers show it
    assert image.decode().size == (30, 40) and image.decodes == 1
    image.decode()
    assert image.decodes == 1
    assert f.fetch(url).size == (30, 40)


def test_encoded_fetch_checks_the_header_now_and_reports_corrupt_pixels_at_decode():
    f = fetcher()
    with pytest.raises(ImageError) as bomb:
        f.fetch_encoded(data_url(BOMB_PNG), task_id=5)
    assert bomb.value.status == 413 and "(task 5)" in bomb.value.message
    with pytest.raises(ImageError) as html:
        f.fetch_encoded(data_url(b"<html>not an image</html>", "text/html"), task_id=5)
    assert html.value.status == 415
    truncated = f.fetch_encoded(data_url(SMALL_PNG[: len(SMALL_PNG) // 2]), task_id=7)
    assert truncated.size == (40, 30)  # the header is intact
    with pytest.raises(ImageError) as corrupt:
        truncated.decode()
    assert corrupt.value.status == 422 and "(task 7)" in corrupt.value.message
