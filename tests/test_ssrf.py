"""SSRF and key-leak regressions of the image fetcher (issue 14, "Image fetching").

Every server here listens on 127.0.0.1 or ::1.  ``network`` fakes the two things between the
fetcher and the internet: DNS (``socket.getaddrinfo``: scripted answers for ``*.test`` names, the
real resolver for everything else) and the route to public addresses
(``urllib3.util.connection.create_connection``: a public address is delivered to a loopback
server standing in for that host, any other public address is unreachable).  It records every
connection attempt, so a test can say "nothing was contacted".
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3.util.connection
from PIL import Image

from backend.images import ImageError, ImageFetcher
from backend.settings import Settings


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
SECRET_BODY = b"SECRET-BODY-0123456789-token-abcdef"
PUBLIC_A = "93.184.216.34"  # stand-ins for public hosts; never contacted for real (see `network`)
PUBLIC_B = "93.184.216.35"
IMAGE_PATHS = {"/img.png", "/data/upload/1/img.png", "/data/local-files/", "/tasks/1/presign/"}


@dataclass
class Seen:
    """What one loopback server received."""

    requests: list[dict] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]


class Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        seen = self.server.seen
        seen.requests.append(
            {"path": self.path, "host": self.headers.get("Host"), "auth": self.headers.get("Authorization")}
        )
        path = self.path.split("?")[0]
        if path in seen.redirects:
            self.send_response(302)
            self.send_header("Location", seen.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, ctype, status = (PNG, "image/png", 200) if path in IMAGE_PATHS else (b"nope", "text/plain", 404)
        if path == "/data/upload/1/secret.txt":
            body, ctype, status = SECRET_BODY, "text/plain", 200
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    seen: Seen


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class Running:
    seen: Seen
    port: int
    url: str


def _serve(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Running]:
    srv = (_Server6 if ":" in host else _Server)((host, 0), Handler)
    srv.seen = Seen()
    scheme = "http"
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = srv.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    try:
        yield Running(srv.seen, port, f"{scheme}://{shown}:{port}")
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def internal() -> Iterator[Running]:
    """A loopback service the fetcher must not reach (and must not send the API key to)."""
    yield from _serve()


@pytest.fixture()
def internal6() -> Iterator[Running]:
    yield from _serve("::1")


@pytest.fixture()
def public() -> Iterator[Running]:
    """Plays the public hosts PUBLIC_A / PUBLIC_B (see ``network``)."""
    yield from _serve()


class Network:
    """Scripted DNS for ``*.test`` names and a fake route to the public stand-in addresses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dns: dict[str, list[str]] = {}  # name -> answers, one per lookup (the last one repeats)
        self.routes: dict[str, int] = {}  # public address -> loopback port that plays it
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []
        real_getaddrinfo = socket.getaddrinfo
        real_connect = urllib3.util.connection.create_connection

        def getaddrinfo(host, port, *args, **kwargs):
            name = host.decode() if isinstance(host, bytes) else str(host)
            if name.rstrip(".").lower() not in self.dns:
                return real_getaddrinfo(host, port, *args, **kwargs)
            self.lookups.append(name)
            answers = self.dns[name.rstrip(".").lower()]
            address = answers.pop(0) if len(answers) > 1 else answers[0]
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (
                (address, int(port or 0), 0, 0) if family == socket.AF_INET6 else (address, int(port or 0))
            )
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]

        def create_connection(address, *args, **kwargs):
            host, port = address
            self.connects.append((host, port))
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:  # a name (as requests passes it): resolve, then route the answer
                ip = ipaddress.ip_address(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
            if ip.is_loopback:
                return real_connect((str(ip), port), *args, **kwargs)
            if str(ip) in self.routes:
                return real_connect(("127.0.0.1", self.routes[str(ip)]), *args, **kwargs)
            raise OSError(101, f"network unreachable in tests: {host}")

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)


@pytest.fixture()
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    return Network(monkeypatch)


def fetcher(**overrides) -> ImageFetcher:
    return ImageFetcher(replace(Settings(image_timeout=2.0), **overrides))


def refused(f: ImageFetcher, ref: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        f.fetch(ref)
    assert 400 <= info.value.status < 500, (ref, info.value.status, info.value.message)
    return info.value


# ---------------------------------------------------------------------------- authority confusion
def test_backslash_authority_is_not_fetched_and_gets_no_token(internal, network):
    """``urlsplit`` reads the host after ``\\@`` (1.1.1.1, "Label Studio"); urllib3 connects to
    the one before it.  The URL is refused, nothing is contacted, the token goes nowhere."""
    port = internal.port
    confusing = [
        f"http://127.0.0.1:{port}\\@1.1.1.1/img.png",
        f"http://127.0.0.1:{port}\\@1.1.1.1:80/img.png",
        f"http://127.0.0.1:{port}%5C@1.1.1.1/img.png",
        f"http://1.1.1.1@127.0.0.1:{port}/img.png",
        f"http://1.1.1.1:80@127.0.0.1:{port}/img.png",
        f"http://127.0.0.1:{port} @1.1.1.1/img.png",
        f"http://127.0.0.1:{port}\t@1.1.1.1/img.png",
        f"http://127.0.0.1:{port}/\\@1.1.1.1/img.png",
    ]
    for allow_private in (False, True):
        f = fetcher(
            label_studio_url="http://1.1.1.1",
            label_studio_api_key="tok-SECRET",
            allow_private_urls=allow_private,
        )
        for url in confusing:
            error = refused(f, url)
            assert error.status == 400, (url, error.message)
    assert internal.seen.requests == [] and network.connects == []


def test_redirect_to_a_confused_authority_is_refused(internal, public, network):
    """Label Studio (here: ``internal``) redirects to a URL whose authority hides another host."""
    ls_port = internal.port
    internal.seen.redirects["/data/upload/1/confuse.png"] = (
        f"http://127.0.0.1:{public.port}\\@127.0.0.1:{ls_port}/data/upload/1/img.png"
    )
    f = fetcher(label_studio_url=internal.url, label_studio_api_key="tok-SECRET")
    refused(f, "/data/upload/1/confuse.png")
    assert public.seen.requests == []
    assert internal.seen.paths() == ["/data/upload/1/confuse.png"]


# ---------------------------------------------------------------------------- DNS rebinding
def test_dns_rebinding_connects_to_the_checked_address(internal, public, network):
    """The name answers a public address when checked and 127.0.0.1 afterwards: the fetch goes to
    the checked address (the public stand-in), with the name kept in the Host header."""
    network.dns["rebind.test"] = [PUBLIC_A, "127.0.0.1"]
    network.routes[PUBLIC_A] = public.port
    url = f"http://rebind.test:{internal.port}/img.png"
    assert fetcher().fetch(url).size == (8, 6)
    assert internal.seen.requests == []
    assert public.seen.requests == [
        {"path": "/img.png", "host": f"rebind.test:{internal.port}", "auth": None}
    ]
    assert network.lookups == ["rebind.test"]  # resolved once
    assert network.connects == [(PUBLIC_A, internal.port)]


def test_dns_rebinding_is_checked_on_every_redirect_hop(internal, public, network):
    network.dns["first.test"] = [PUBLIC_A]
    network.dns["second.test"] = [PUBLIC_B, "127.0.0.1"]
    network.routes.update({PUBLIC_A: public.port, PUBLIC_B: public.port})
    public.seen.redirects["/hop"] = f"http://second.test:{internal.port}/img.png"
    assert fetcher().fetch(f"http://first.test:{public.port}/hop").size == (8, 6)
    assert internal.seen.requests == []
    assert public.seen.paths() == ["/hop", "/img.png"]
    assert [r["host"] for r in public.seen.requests] == [
        f"first.test:{public.port}",
        f"second.test:{internal.port}",
    ]
    # and a hop whose name answers a private address is refused outright
    network.dns["third.test"] = ["10.1.2.3"]
    public.seen.redirects["/hop-private"] = "http://third.test/img.png"
    error = refused(fetcher(), f"http://first.test:{public.port}/hop-private")
    assert error.status == 403 and "10.1.2.3" in error.message


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for ``img.test`` (key and certificate in one PEM file)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=img.test",
         "-addext", "subjectAltName=DNS:img.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    both = folder / "both.pem"
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    return both


def _tls(certificate: Path, sni: list[str | None]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certificate)
    ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    return ctx


def test_https_pins_the_address_and_keeps_sni_and_certificate_name(certificate, network, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    internal_sni: list[str | None] = []
    public_sni: list[str | None] = []
    with (
        contextlib.contextmanager(_serve)("127.0.0.1", _tls(certificate, internal_sni)) as inside,
        contextlib.contextmanager(_serve)("127.0.0.1", _tls(certificate, public_sni)) as outside,
    ):
        network.dns["img.test"] = [PUBLIC_A, "127.0.0.1"]
        network.dns["other.test"] = [PUBLIC_A]
        network.routes[PUBLIC_A] = outside.port
        assert fetcher().fetch(f"https://img.test:{inside.port}/img.png").size == (8, 6)
        assert inside.seen.requests == [] and internal_sni == []
        assert public_sni == ["img.test"]
        assert outside.seen.requests[0]["host"] == f"img.test:{inside.port}"
        # the certificate is checked against the name, not the pinned address
        with pytest.raises(ImageError) as info:
            fetcher().fetch(f"https://other.test:{inside.port}/img.png")
        assert info.value.status == 502 and len(outside.seen.requests) == 1


# ---------------------------------------------------------------------------- address encodings
ENCODINGS = [
    # loopback, as urllib3/requests hand them to the resolver ({p}: a live loopback server)
    "http://127.0.0.1:{p}/img.png",
    "http://2130706433:{p}/img.png",
    "http://0x7f.1:{p}/img.png",
    "http://0177.0.0.1:{p}/img.png",
    "http://0x7f000001:{p}/img.png",
    "http://017700000001:{p}/img.png",
    "http://127.1:{p}/img.png",
    "http://localhost:{p}/img.png",
    "http://localhost.:{p}/img.png",
    "http://LOCALHOST:{p}/img.png",
    "http://img.localhost:{p}/img.png",
    "http://0.0.0.0:{p}/img.png",
    "http://0:{p}/img.png",
    "http://[::1]:{p6}/img.png",
    "http://[::]:{p6}/img.png",
    "http://[0:0:0:0:0:0:0:1]:{p6}/img.png",
    "http://[::ffff:127.0.0.1]:{p}/img.png",
    "http://[::ffff:7f00:1]:{p}/img.png",
    "http://[::127.0.0.1]:{p}/img.png",
    # IPv6 forms embedding a private IPv4 address
    "http://[2002:7f00:1::]:{p}/img.png",
    "http://[2002:7f00:1:1::1]:{p}/img.png",
    "http://[2002:a00:1::]/img.png",
    "http://[2002:c0a8:101::]/img.png",
    "http://[2002:a9fe:a9fe::]/latest/meta-data/",
    "http://[64:ff9b::7f00:1]/img.png",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[64:ff9b:1::c0a8:101]/img.png",
    "http://[64:ff9b:1:2::]/img.png",
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/img.png",
    "http://[2001:0:4136:e378:8000:63bf:5601:5601]/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://[::10.0.0.1]/img.png",
    # private, link-local, metadata
    "http://10.0.0.1/img.png",
    "http://172.16.0.1/img.png",
    "http://192.168.1.1/img.png",
    "http://100.64.0.1/img.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/img.png",
    "http://[fec0::1]/img.png",
    "http://[fc00::1]/img.png",
    "http://224.0.0.1/img.png",
]


@pytest.mark.parametrize("template", ENCODINGS)
def test_loopback_private_and_metadata_encodings_are_refused(template, internal, internal6, network):
    url = template.format(p=internal.port, p6=internal6.port)
    error = refused(fetcher(), url)
    assert error.status == 403, (url, error.message)
    assert network.connects == [] and internal.seen.requests == [] and internal6.seen.requests == []


@pytest.mark.parametrize(
    "address, embedded",
    [
        ("2002:808:808::", "8.8.8.8"),
        ("64:ff9b::808:808", "8.8.8.8"),
        ("64:ff9b:1::808:808", "8.8.8.8"),
        ("::ffff:8.8.8.8", "8.8.8.8"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "8.8.8.8"),  # Teredo: client bits inverted
    ],
)
def test_embedded_public_ipv4_is_judged_by_the_ipv4_address(address, embedded):
    from backend.urls import address_problem, embedded_ipv4

    assert address_problem(address) is None
    assert embedded in [str(v4) for _, v4 in embedded_ipv4(ipaddress.IPv6Address(address))]
    private = {"2002:808:808::": "2002:a00:1::", "64:ff9b::808:808": "64:ff9b::a00:1"}.get(address)
    if private:
        assert "10.0.0.1" in (address_problem(private) or "")


# ---------------------------------------------------------------------------- Label Studio paths
OUTSIDE_MEDIA = [
    "/data/upload/../../etc/passwd",
    "/data/upload/../../api/current-user/token",
    "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
    "/data/upload/%2E%2E%2F%2E%2E%2Fapi/current-user/token",
    "/data/upload/1/..%2f..%2f..%2fapi/projects",
    "/data//upload/../../../api/current-user/token",
    "/data/upload/1/img.png/../../../../api/current-user/token",
    "/data/upload/..\\..\\api\\current-user\\token",
    "/data/local-files/../../api/current-user/token",
    "/storage-data/../api/current-user/token",
    "/tasks/1/presign/../../../api/current-user/token",
    "//1.1.1.1/img.png",
    "/api/current-user/token",
    "/data/upload",
    "/data/upload/",
    "/data/uploads/1/img.png",
    "/data/local-files/?x=1",
    "{ls}/api/current-user/token",
    "{ls}/data/upload/%2e%2e/%2e%2e/api/current-user/token",
]


@pytest.mark.parametrize("ref", OUTSIDE_MEDIA)
def test_label_studio_paths_outside_media_are_refused_before_any_request(ref, internal, network):
    f = fetcher(label_studio_url=internal.url, label_studio_api_key="tok-SECRET")
    refused(f, ref.format(ls=internal.url))
    assert internal.seen.requests == []


@pytest.mark.parametrize(
    "ref, path",
    [
        ("/data/upload/1/img.png", "/data/upload/1/img.png"),
        ("/data//upload/1/img.png", "/data/upload/1/img.png"),
        ("/data/upload/1/sub/../img.png", "/data/upload/1/img.png"),
        ("/data/upload/1/%2e/img.png", "/data/upload/1/img.png"),
        ("/data/local-files/?d=dir/img.png", "/data/local-files/?d=dir/img.png"),
        ("/tasks/1/presign/?fileuri=czM6Ly9iL2ltZy5wbmc=", "/tasks/1/presign/?fileuri=czM6Ly9iL2ltZy5wbmc="),
        ("{ls}/data/upload/1/img.png", "/data/upload/1/img.png"),
    ],
)
def test_label_studio_media_paths_are_fetched_normalised_with_the_token(ref, path, internal, network):
    f = fetcher(label_studio_url=internal.url, label_studio_api_key="tok-SECRET")
    assert f.fetch(ref.format(ls=internal.url)).size == (8, 6)
    assert internal.seen.requests == [
        {"path": path, "host": f"127.0.0.1:{internal.port}", "auth": "Token tok-SECRET"}
    ]


def test_label_studio_redirect_out_of_media_is_refused(internal, network):
    internal.seen.redirects["/data/upload/1/to-api.png"] = "/api/current-user/token"
    f = fetcher(label_studio_url=internal.url, label_studio_api_key="tok-SECRET")
    refused(f, "/data/upload/1/to-api.png")
    assert internal.seen.paths() == ["/data/upload/1/to-api.png"]


def test_errors_never_echo_fetched_bytes(internal, network):
    f = fetcher(label_studio_url=internal.url, label_studio_api_key="tok-SECRET")
    error = refused(f, "/data/upload/1/secret.txt")
    assert error.status == 415
    for start in range(len(SECRET_BODY) - 3):
        assert SECRET_BODY[start : start + 4].decode() not in error.message, error.message


# ---------------------------------------------------------------------------- NUL and controls
CONTROL_REFS = [
    "/data/local-files/?d=img.png%00.jpg",
    "/data/local-files/?d=img.png%0a",
    "/data/local-files/?d=%01img.png",
    "/data/local-files/?d=img.png%7f",
    "/data/upload/1/img.png%00.jpg",
]


@pytest.mark.parametrize("ref", CONTROL_REFS)
def test_nul_and_control_characters_are_a_400(ref, internal, tmp_path, network):
    (tmp_path / "img.png").write_bytes(PNG)
    local = fetcher(local_files_root=str(tmp_path), label_studio_url=internal.url)
    assert local.fetch("/data/local-files/?d=img.png").size == (8, 6)
    assert refused(local, ref).status == 400
    proxied = fetcher(label_studio_url=internal.url, label_studio_api_key="tok-SECRET")
    assert refused(proxied, ref).status == 400
    assert internal.seen.requests == []


# ---------------------------------------------------------------------------- through the app
@pytest.mark.parametrize(
    "ref, status",
    [
        ("/data/local-files/?d=img.png%00.jpg", 400),
        ("/data/upload/../../api/current-user/token", 403),
        ("http://127.0.0.1:{port}\\@1.1.1.1/img.png", 400),
    ],
)
def test_predict_answers_refused_images_with_a_4xx(ref, status, internal, tmp_path, tiny_checkpoint):
    from backend.app import create_app
    from backend.serving import ModelHolder
    from tests.test_backend_app import SCENE, detail, ls_task, make_settings, predict_payload, rect

    (tmp_path / "img.png").write_bytes(PNG)
    settings = make_settings(
        tmp_path, tiny_checkpoint, label_studio_url=internal.url, local_files_root=str(tmp_path)
    )
    client = create_app(settings, ModelHolder(settings)).test_client()
    task = ls_task(1, [rect("a", SCENE.objects[0].box)], image=ref.format(port=internal.port))
    resp = client.post("/predict", json=predict_payload([task]))
    assert resp.status_code == status, detail(resp)
    assert internal.seen.requests == []
