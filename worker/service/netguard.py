"""Which callback URLs the service may call: never a way into the network it runs in.

A callback URL comes from a client, and the worker that POSTs to it sits inside the hospital
network next to Redis, databases and cloud metadata endpoints. So:

- only ``http``/``https``, no credentials in the URL (they would be sent and shown in job views);
- an address that is loopback, private, link-local, multicast, reserved or otherwise not globally
  routable is refused unless its host is on FPROTOSEG_CALLBACK_ALLOWED_HOSTS (names, IPs or CIDR
  networks: the LIMS on the hospital network is the usual entry);
- at submission (:func:`check_callback_url`), everything the URL alone shows: scheme,
  credentials, and a literal IP in any notation (``0x7f000001``, ``2130706433``, ``0177.1``,
  ``[::ffff:127.0.0.1]``). Non-canonical IPv4 spellings are refused outright: no LIMS writes them,
  and they exist to slip past filters;
- at delivery (:func:`resolve_for_delivery`), the host name is resolved, every address checked
  the same way, and the request is sent to the checked address (DNS rebinding cannot swap it).

Stdlib only: the API and the workers both import it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["CallbackTarget", "CallbackURLError", "check_callback_url", "resolve_for_delivery"]

MAX_URL_CHARS = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# NAT64 (RFC 6052) embeds an IPv4 address that a translator on the path would reach.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class CallbackURLError(ValueError):
    """The URL may not be called; the message says why, in one line for the client."""


@dataclass(frozen=True)
class CallbackTarget:
    """Where one delivery goes: the URL as given and the checked address to connect to."""

    url: str
    host: str
    port: int
    scheme: str
    address: str  # the IP the request is pinned to


def _embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr in _NAT64:
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if addr.sixtofour is not None:
            return addr.sixtofour
        if addr.teredo is not None:
            return addr.teredo[1]
    return None


def is_public(addr: IPAddress) -> bool:
    """Globally routable, and so is any IPv4 address embedded in it."""
    inner = _embedded_ipv4(addr)
    if inner is not None and not is_public(inner):
        return False
    return bool(addr.is_global) and not addr.is_multicast


class _Allowed:
    """FPROTOSEG_CALLBACK_ALLOWED_HOSTS: exact host names (case-insensitive), IPs and networks."""

    def __init__(self, entries: list[str]) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().strip("[]").lower().rstrip(".")
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry)

    def host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def address(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.networks)


def _literal_ip(host: str) -> IPAddress | None:
    """The address a host spells as an IP literal in *any* notation, or None for a name.

    ``inet_aton`` accepts what C resolvers accept (hex, octal, 1-3 part forms), which is exactly
    the set of spellings an HTTP client may turn into an address.
    """
    bare = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    try:
        packed = socket.inet_aton(bare)
    except (OSError, ValueError):
        return None
    return ipaddress.IPv4Address(packed)


def _split(url: str) -> tuple[str, str, int]:
    if len(url) > MAX_URL_CHARS:
        raise CallbackURLError(f"callback_url is longer than {MAX_URL_CHARS} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise CallbackURLError("callback_url contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise CallbackURLError("callback_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackURLError("callback_url must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise CallbackURLError(
            "callback_url must not carry credentials (user:password@); the callback is signed instead"
        )
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_callback_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL, if what it shows by itself may be called; CallbackURLError otherwise."""
    _, host, _ = _split(url)
    allowed = _Allowed(allowed_hosts)
    addr = _literal_ip(host)
    if addr is None or allowed.host(host):
        return url
    if str(addr) != host.strip("[]").split("%", 1)[0].lower() and addr.version == 4:
        raise CallbackURLError(f"callback_url spells an IP address in a non-standard way ({host!r})")
    if not is_public(addr) and not allowed.address(addr):
        raise CallbackURLError(
            f"callback_url points at {addr}, which is not a public address; an operator can allow it "
            "with FPROTOSEG_CALLBACK_ALLOWED_HOSTS"
        )
    return url


def resolve_for_delivery(url: str, allowed_hosts: list[str]) -> CallbackTarget:
    """Resolve the host now and return the address to connect to; CallbackURLError when any
    address it resolves to may not be called (one bad answer is enough to refuse)."""
    scheme, host, port = _split(url)
    allowed = _Allowed(allowed_hosts)
    literal = _literal_ip(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise CallbackURLError(
                f"callback host {host!r} does not resolve: {exc.strerror or exc}"
            ) from None
        addresses = []
        for info in infos:
            addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if addr not in addresses:
                addresses.append(addr)
        if not addresses:
            raise CallbackURLError(f"callback host {host!r} has no address")
    if not allowed.host(host):
        for addr in addresses:
            if not is_public(addr) and not allowed.address(addr):
                raise CallbackURLError(
                    f"callback host {host!r} resolves to {addr}, which is not a public address "
                    "(FPROTOSEG_CALLBACK_ALLOWED_HOSTS)"
                )
    return CallbackTarget(url=url, host=host, port=port, scheme=scheme, address=str(addresses[0]))
