"""The client of a tracking hit: its address, and X-Forwarded-For only from trusted proxies.

A request's peer is the client unless the peer is one of the operator's proxies (load
balancers); then the X-Forwarded-For list is read from the right, each trusted proxy in
it skipped, and the first other address is the client. Anything else in the header (a
name, `unknown`, garbage, an endless list) ends the walk at the last address known good,
so a client can neither hide behind a forged header nor break the request with one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Hops read from the right of X-Forwarded-For: past this many proxies the header is
# someone's invention.
MAX_FORWARDED_HOPS = 20
# Longer headers are read from their end only (the right, where our proxies write).
MAX_FORWARDED_LENGTH = 2048


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """Networks from config (already checked there)."""
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def normal_address(text: str) -> str | None:
    """The address in its usual form (an IPv4-mapped IPv6 address as IPv4), or None when
    `text` is none; a port or brackets, as proxies write them, are dropped."""
    text = text.strip()
    if text.startswith("["):  # [2001:db8::1]:443
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # 192.0.2.1:443
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def in_networks(address: str, candidates: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in candidates)


def client_address(peer: str, forwarded: Sequence[bytes] | None,
                   trusted_proxies: Sequence[Network]) -> str:
    """The client's address: the peer's (as Twisted writes it, an IPv4-mapped one as IPv4),
    or the one its trusted proxies forwarded."""
    client = peer.removeprefix("::ffff:") if "." in peer else peer
    if not forwarded or not trusted_proxies or not in_networks(client, trusted_proxies):
        return client
    header = b",".join(forwarded)[-MAX_FORWARDED_LENGTH:].decode("latin-1")
    for hop in reversed(header.split(",")[-MAX_FORWARDED_HOPS:]):
        address = normal_address(hop)
        if address is None:
            break
        client = address
        if not in_networks(address, trusted_proxies):
            break
    return client
