"""Which callback URLs the service may call: never a way into the network it runs in.

A callback URL comes from a client, and the worker that POSTs to it sits inside the hospital
network next to Redis, databases and cloud metadata endpoints. So:

- only ``http``/``https``, no credentials in the URL (they would be sent and shown in job views);
- an address that is loopback, private, link-local, multicast, reserved or otherwise not globally
  routable (every non-global range of the IANA special-purpose registries, and IPv6 outside
  2000::/3, whatever the running Python's ``is_global`` says) is refused unless its host is on
  FPROTOSEG_CALLBACK_ALLOWED_HOSTS (names, IPs or CIDR
  networks: the LIMS on the hospital network is the usual entry);
- at submission (:func:`check_callback_url`), everything the URL alone shows: scheme,
  credentials, and a literal IP in any notation (``0x7f000001``, ``2130706433``, ``0177.1``,
  ``[::ffff:127.0.0.1]``). Non-canonical IPv4 spellings, and IPv6 literals that embed or translate
  to an IPv4 address (mapped, compatible, SIIT, NAT64, 6to4, Teredo, ISATAP), are refused outright:
  no LIMS writes them, and they exist to slip past filters;
- at delivery (:func:`resolve_for_delivery`), the host name is resolved, every address checked
  the same way (an IPv6 answer with an IPv4 address inside, e.g. from DNS64, is judged by that
  IPv4 address), and the request is sent to the checked address (DNS rebinding cannot swap it).

Stdlib only: the API and the workers both import it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "CallbackTarget",
    "CallbackURLError",
    "check_callback_url",
    "embedded_ipv4",
    "is_public",
    "resolve_for_delivery",
]

MAX_URL_CHARS = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_V6 = ipaddress.IPv6Network
# IPv6 forms whose last 32 bits are an IPv4 address that some host, translator or stack on the path
# turns the packet into: IPv4-mapped and IPv4-compatible (RFC 4291), SIIT IPv4-translated
# (RFC 2765), NAT64 well-known and local-use prefixes (RFC 6052, RFC 8215).
_LOW32 = (
    _V6("::ffff:0:0/96"),
    _V6("::ffff:0:0:0/96"),
    _V6("::/96"),
    _V6("64:ff9b::/96"),
    _V6("64:ff9b:1::/48"),
)
# Not globally reachable, whatever Python's tables of the day say (they differ between 3.11 patch
# releases): the IANA IPv4 and IPv6 special-purpose address registries, plus what they list as
# reachable but no LIMS is (the 192.0.0.0/24 anycast services, the deprecated 6to4 relay anycast).
_V4 = ipaddress.IPv4Network
_NOT_GLOBAL_V4 = tuple(
    _V4(net)
    for net in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    )
)
# IPv6 is global only in 2000::/3, and there not in the IETF protocol assignments (Teredo,
# benchmarking, ORCHID, …), documentation or 6to4; outside it only the forms that translate to an
# IPv4 address, judged by that address (a DNS64 answer for a public host).
_GLOBAL_UNICAST_V6 = _V6("2000::/3")
_NOT_GLOBAL_V6 = (_V6("2001::/23"), _V6("2001:db8::/32"), _V6("2002::/16"), _V6("3fff::/20"))
_TRANSLATED_V6 = (_V6("::ffff:0:0/96"), _V6("64:ff9b::/96"))
# ISATAP (RFC 5214): an interface identifier 0:5efe or 200:5efe followed by the IPv4 address of the
# host the router tunnels to, under any /64 prefix.
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)


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


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries or translates to, if any: a packet to it ends up
    at that IPv4 host (a stack's mapping, a NAT64/SIIT translator, a 6to4/ISATAP/Teredo tunnel),
    so it may be called only if that address may."""
    value = int(addr)
    if value <= 1:  # :: and ::1 are themselves, not IPv4-compatible addresses
        return None
    if any(addr in net for net in _LOW32):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if (value >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def is_public(addr: IPAddress) -> bool:
    """Globally routable, and so is any IPv4 address embedded in it (a DNS64 answer for a public
    host is public; ``::ffff:127.0.0.1`` and ``64:ff9b::a9fe:a9fe`` are not). Every range of the
    IANA special-purpose registries that is not globally reachable is refused by the tables above,
    Python's own ``is_global`` on top."""
    if isinstance(addr, ipaddress.IPv6Address):
        if any(addr in net for net in _TRANSLATED_V6):
            inner = embedded_ipv4(addr)
            return inner is not None and is_public(inner)
        if addr not in _GLOBAL_UNICAST_V6 or any(addr in net for net in _NOT_GLOBAL_V6):
            return False
        inner = embedded_ipv4(addr)  # an ISATAP interface id under a global prefix
        if inner is not None and not is_public(inner):
            return False
    elif any(addr in net for net in _NOT_GLOBAL_V4):
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
    embeds_ipv4 = isinstance(addr, ipaddress.IPv6Address) and embedded_ipv4(addr) is not None
    if embeds_ipv4 and not allowed.address(addr):
        raise CallbackURLError(
            f"callback_url spells an IPv4 address as IPv6 ({host!r}); write the IPv4 address or a host name"
        )
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
