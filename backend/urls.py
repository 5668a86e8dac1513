"""Image URLs judged as the HTTP client will use them: one parse, one resolution, one verdict.

* :func:`parse_http_url` parses with urllib3's ``parse_url`` (the parser of the connection the
  fetcher opens) after refusing what parsers disagree on: a ``\\`` anywhere, control characters,
  whitespace or user info (``user@``) in the authority.  ``http://127.0.0.1:8080\\@1.1.1.1/`` is
  host 1.1.1.1 to ``urllib.parse`` and 127.0.0.1 to urllib3; it never gets that far.
* :func:`origin` is the ``(scheme, host, port)`` compared with Label Studio's before the API key
  is sent.
* :func:`resolve` is the one DNS lookup of a fetch; the fetcher connects to the addresses it
  returned (and :func:`address_problem` accepted), so a name cannot answer differently later.
* :func:`address_problem` judges an address; IPv6 forms that carry an IPv4 address (IPv4-mapped,
  IPv4-compatible, 6to4, NAT64, Teredo) are judged by that IPv4 address.
* :func:`label_studio_media_path` normalises a Label Studio path (percent-decoding, ``..``, ``//``)
  and accepts only Label Studio's media routes.

Every refusal is a :class:`URLRefused` with an HTTP status and a reason.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from urllib.parse import parse_qsl, quote, unquote

from urllib3.exceptions import LocationParseError
from urllib3.util import Url, parse_url

__all__ = [
    "DEFAULT_PORTS",
    "MEDIA_ROUTES",
    "URLRefused",
    "address_problem",
    "bare_host",
    "embedded_ipv4",
    "is_localhost_name",
    "label_studio_media_path",
    "origin",
    "parse_http_url",
    "resolve",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, local use
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT; not private to ipaddress

# Label Studio's media routes: (normalised path pattern, query parameter that names the file)
MEDIA_ROUTES: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"/data/upload/.+"), None),  # uploaded files
    (re.compile(r"/data/local-files/?"), "d"),  # local storage, LOCAL_FILES_SERVING_ENABLED
    (re.compile(r"/storage-data/uploaded/?"), "filepath"),  # uploads kept in cloud storage
    (re.compile(r"/(tasks|projects)/\d+/(presign|resolve)/?"), "fileuri"),  # cloud storage proxy
)
_MEDIA_NAMES = (
    "/data/upload/…, /data/local-files/?d=…, /storage-data/uploaded/?filepath=…, "
    "/tasks/<id>/presign/?fileuri=…"
)


class URLRefused(ValueError):
    """A URL or address the fetcher will not use; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _shown(text: str, limit: int = 200) -> str:
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


def parse_http_url(raw: str) -> Url:
    """``raw`` -> urllib3 :class:`Url` of an ``http``/``https`` URL with a host and no user info.

    Refuses (400) a backslash anywhere, control characters anywhere, whitespace or ``@`` in the
    authority: with those removed, every URL parser agrees on the host."""
    if _CONTROL.search(raw):
        raise URLRefused(f"image URL {_shown(raw)} contains control characters")
    if "\\" in raw:
        raise URLRefused(f"image URL {_shown(raw)} contains a backslash ('\\'); parsers disagree on its host")
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in DEFAULT_PORTS:
        raise URLRefused(f"image URL {_shown(raw)} must be http:// or https://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise URLRefused(f"image URL {_shown(raw)} has user info ('user@host'); not allowed")
    if any(ch.isspace() for ch in authority):
        raise URLRefused(f"image URL {_shown(raw)} has whitespace in its host")
    try:
        url = parse_url(raw)
    except LocationParseError as exc:
        raise URLRefused(f"image URL {_shown(raw)} cannot be parsed: {exc}") from None
    if url.scheme not in DEFAULT_PORTS or not url.host or url.auth is not None:
        raise URLRefused(f"image URL {_shown(raw)} must be http(s) with a host")
    return url


def bare_host(url: Url) -> str:
    """The host as the resolver wants it: no IPv6 brackets, no zone, lower case."""
    host = (url.host or "").lower()
    if host.startswith("["):
        host = host[1:-1].split("%", 1)[0]
    return host


def origin(url: Url) -> tuple[str, str, int]:
    """``(scheme, host, port)``, with the host's trailing dot dropped, IPv6 in compressed form
    and the scheme's default port filled in."""
    host = bare_host(url).rstrip(".")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    scheme = url.scheme or ""
    return scheme, host, url.port or DEFAULT_PORTS.get(scheme, 0)


def is_localhost_name(host: str) -> bool:
    """``localhost`` and ``*.localhost`` (RFC 6761), with or without the trailing dot."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver, as the HTTP client would use it;
    numeric forms such as ``2130706433`` or ``0x7f.1`` resolve as the C library reads them).
    Raises :class:`OSError` or :class:`UnicodeError` when it does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, each with the name of its form (empty if none).

    ``ipaddress`` knows IPv4-mapped, 6to4 and Teredo (server and de-obfuscated client); NAT64
    (``64:ff9b::/96``, and ``64:ff9b:1::/48`` in its /96 layout) and IPv4-compatible
    (``::/96`` but ``::`` and ``::1``) keep the IPv4 address in the last 32 bits."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo server", server), ("Teredo client", client)]
    last32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64 or (ip in _LOCAL_NAT64 and (int(ip) >> 32) & (2**48 - 1) == 0):
        found.append(("NAT64", last32))
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are unspecified and loopback (RFC 4291)
        found.append(("IPv4-compatible", last32))
    return found


def _first_problem(checks: tuple[tuple[str, bool], ...]) -> str | None:
    return next((problem for problem, hit in checks if hit), None)


def _ipv4_problem(ip: ipaddress.IPv4Address) -> str | None:
    return _first_problem(
        (
            ("unspecified", ip.is_unspecified),
            ("loopback", ip.is_loopback),
            ("link-local (cloud metadata lives here)", ip.is_link_local),
            ("private", ip.is_private),
            ("shared address space (carrier-grade NAT)", ip in _SHARED_V4),
            ("multicast", ip.is_multicast),
            ("reserved", ip.is_reserved),
            ("not globally routable", not ip.is_global),
        )
    )


def _ipv6_problem(ip: ipaddress.IPv6Address) -> str | None:
    return _first_problem(
        (
            ("unspecified", ip.is_unspecified),
            ("loopback", ip.is_loopback),
            ("link-local", ip.is_link_local),
            ("site-local", ip.is_site_local),
            ("private", ip.is_private),
            ("local-use NAT64 prefix with the IPv4 address outside the last 32 bits", ip in _LOCAL_NAT64),
            ("multicast", ip.is_multicast),
            ("reserved", ip.is_reserved),
            ("not globally routable", not ip.is_global),
        )
    )


def address_problem(address: str) -> str | None:
    """Why the fetcher must not connect to ``address`` (``None``: a public address).

    An IPv6 address that carries IPv4 addresses is judged by them: it is refused when any of
    them is not public (and accepted when all are, e.g. 6to4 of a public host)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_problem(ip)
    embedded = embedded_ipv4(ip)
    for form, v4 in embedded:
        problem = _ipv4_problem(v4)
        if problem:
            return f"{form} form of {v4}, which is {problem}"
    return None if embedded else _ipv6_problem(ip)


def label_studio_media_path(path: str, query: str) -> str:
    """Normalised, re-encoded ``path`` of a Label Studio media route, or :class:`URLRefused`.

    The path is percent-decoded once (as Label Studio's server decodes it), ``//`` collapsed and
    ``.``/``..`` resolved; the result must be one of :data:`MEDIA_ROUTES`, with the route's file
    parameter present.  Control characters (NUL included) in the path or query are refused (400),
    a path outside the media routes is refused (403)."""
    shown = _shown(path + (f"?{query}" if query else ""))
    try:
        decoded = unquote(path, errors="strict")
        params = parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise URLRefused(f"Label Studio path {shown} is not valid percent-encoded UTF-8") from None
    if _CONTROL.search(decoded) or any(_CONTROL.search(k + v) for k, v in params):
        raise URLRefused(f"Label Studio path {shown} has control characters")
    if "\\" in decoded:
        raise URLRefused(f"Label Studio path {_shown(path)} contains a backslash")
    collapsed = re.sub(r"/{2,}", "/", decoded)
    normal = posixpath.normpath(collapsed)
    if collapsed.endswith("/") and normal != "/":
        normal += "/"
    for pattern, file_param in MEDIA_ROUTES:
        if pattern.fullmatch(normal):
            if file_param is not None and not any(k == file_param and v for k, v in params):
                raise URLRefused(f"Label Studio path {_shown(path)} needs ?{file_param}=<file>")
            return quote(normal, safe="/!$&'()*+,;=:@-._~")
    raise URLRefused(
        f"Label Studio path {_shown(path)} (normalised: {_shown(normal)}) is not a Label Studio media "
        f"route ({_MEDIA_NAMES}); refused",
        403,
    )
