"""Issue 22, item 5: the callback check on addresses alone (the classifier netguard uses both at
submission and at delivery). The same URLs go through the real HTTP API in tests/app/test_trust.py."""

from __future__ import annotations

import ipaddress

import pytest

from fprotoseg.worker.service.netguard import (
    CallbackURLError,
    check_callback_url,
    embedded_ipv4,
    is_public,
)

# Every IPv6 way to name an IPv4 host (or a range that a local operator translates), each with an
# embedded address that must never be reached from the worker's network.
INSIDE_VIA_IPV6 = [
    "::127.0.0.1",  # IPv4-compatible (deprecated, ::/96)
    "::169.254.169.254",  # cloud metadata, IPv4-compatible
    "::10.0.0.5",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "::ffff:0:a9fe:a9fe",  # SIIT IPv4-translated (::ffff:0:0:0/96) -> 169.254.169.254
    "::ffff:0:7f00:1",
    "64:ff9b::7f00:1",  # NAT64 well-known prefix -> 127.0.0.1
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::a00:5",  # -> 10.0.0.5
    "64:ff9b:1::7f00:1",  # local-use NAT64 (RFC 8215)
    "64:ff9b:1:ffff::808:808",  # local-use NAT64, whatever it holds
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:470:1::200:5efe:7f00:1",  # ISATAP interface id on a global prefix -> 127.0.0.1
    "2001:470:1::5efe:a9fe:a9fe",
]

NOT_GLOBAL_IPV6 = [
    "::", "::1", "fe80::1", "fc00::1", "fd12::1", "ff02::1", "2001:db8::1", "3fff::1", "5f00::1",
]


@pytest.mark.parametrize("text", [*INSIDE_VIA_IPV6, *NOT_GLOBAL_IPV6])
def test_ipv6_addresses_that_reach_inside_are_not_public(text: str) -> None:
    assert not is_public(ipaddress.ip_address(text))


@pytest.mark.parametrize(
    ("text", "inner"),
    [
        ("::127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:0:a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::808:808", "8.8.8.8"),
        ("64:ff9b:1::7f00:1", "127.0.0.1"),
        ("2002:808:808::1", "8.8.8.8"),
        ("2001:470:1::200:5efe:7f00:1", "127.0.0.1"),
        ("2606:4700::1111", None),
        ("::1", None),
    ],
)
def test_the_embedded_ipv4_address_is_found_in_every_form(text: str, inner: str | None) -> None:
    found = embedded_ipv4(ipaddress.IPv6Address(text))
    assert (str(found) if found is not None else None) == inner


@pytest.mark.parametrize("text", ["8.8.8.8", "2606:4700::1111", "2a00:1450:4001:80b::200e"])
def test_global_addresses_stay_public(text: str) -> None:
    assert is_public(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", ["64:ff9b::808:808", "64:ff9b::8efa:b4ce"])
def test_a_translated_public_address_is_public_when_resolved(text: str) -> None:
    """DNS64 answers a public name with 64:ff9b::/96 on an IPv6-only network: delivery must work."""
    assert is_public(ipaddress.IPv6Address(text))


@pytest.mark.parametrize(
    "text", [*INSIDE_VIA_IPV6, "::8.8.8.8", "::ffff:8.8.8.8", "::ffff:0:808:808", "64:ff9b::808:808"]
)
def test_a_literal_ipv6_spelling_of_an_ipv4_address_is_refused_at_submission(text: str) -> None:
    """No LIMS writes its own address that way: refused like octal or hex IPv4 spellings."""
    with pytest.raises(CallbackURLError):
        check_callback_url(f"http://[{text}]:8080/hook", [])


def test_an_allowed_network_still_admits_its_ipv6_literals() -> None:
    url = "http://[fd00:20::4]/hook"
    with pytest.raises(CallbackURLError):
        check_callback_url(url, [])
    assert check_callback_url(url, ["fd00:20::/64"]) == url


# Issue 22 (brief item 3): every range the IANA special-purpose registries mark not globally
# reachable, by its first, a middle and its last address, whatever this Python's is_global says
# (3.11.7 calls 192.0.0.8, fec0::1, 100:0:0:1::1 and 4000::1 global), plus the space outside
# 2000::/3 that is not allocated at all.
NOT_GLOBAL_NETWORKS = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::/96", "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "2001::/23",
    "2001::/32", "2001:2::/48", "2001:10::/28", "2001:20::/28", "2001:db8::/32", "2002::/16",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    "1::/16", "4000::/2", "8000::/1", "e000::/4",
]


def _samples(network: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    net = ipaddress.ip_network(network)
    return [net.network_address, net.network_address + net.num_addresses // 2 + 1, net.broadcast_address]


@pytest.mark.parametrize("network", NOT_GLOBAL_NETWORKS)
def test_every_range_that_is_not_globally_reachable_is_refused(network: str) -> None:
    for addr in _samples(network):
        if addr.version == 6 and int(addr) <= 1 and network not in ("::/128", "::1/128"):
            continue  # :: and ::1 are their own entries
        assert not is_public(addr), addr
        host = f"[{addr}]" if addr.version == 6 else str(addr)
        with pytest.raises(CallbackURLError):
            check_callback_url(f"https://{host}/hook", [])


@pytest.mark.parametrize("text", ["::ffff:0.0.0.0", "64:ff9b::", "64:ff9b::e000:1", "::ffff:100.64.0.1"])
def test_translated_forms_are_judged_by_their_ipv4_address_when_resolved(text: str) -> None:
    assert not is_public(ipaddress.IPv6Address(text))
