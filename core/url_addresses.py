"""Which addresses a user-supplied URL may reach: public unicast only, each refusal naming its range.

Non-public means loopback, private (RFC 1918), shared/CGNAT (100.64/10), link-local (169.254.169.254 is the cloud
metadata service), unspecified, multicast, reserved, documentation and benchmarking ranges, IPv6 unique-local,
link-local and site-local, and any IPv4 address carried inside IPv6 (IPv4-mapped, 6to4, NAT64) that is one of these.
:mod:`core.url_fetch` checks every address a host name resolves to, then connects to a checked one.

The rule is the same idea as the RunPod SDK's ``rp_ssrf.is_safe_address`` (runpod 1.12), written out here as a
table so the refusal can name the range; a test checks that this module never admits an address ``rp_ssrf`` refuses.
"""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Special-purpose ranges (IANA's IPv4 and IPv6 special-purpose registries) that no public image server uses.
# Written out rather than taken from ``ipaddress.is_global`` alone: that list changed between Python patch
# releases (3.11.7 calls 224.0.0.1 and 64:ff9b:1::1 global) and cannot say which range an address is in.
# The more specific ranges come first, so the reason names them.
_NON_PUBLIC_RANGES: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(network), reason)
    for network, reason in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "shared carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata services answer there)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("::/8", "reserved"),  # includes the deprecated IPv4-compatible ::a.b.c.d
        ("100::/64", "discard-only"),
        ("2001:db8::/32", "documentation"),
        ("2001::/23", "IETF protocol assignment"),  # Teredo (2001::/32) included
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment-routing"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are the IPv4 destination
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")  # IANA allocates public IPv6 only from here


def non_public_reason(address: str | Address) -> str | None:
    """Why ``address`` is not a public unicast address (``"loopback"``, ``"private (RFC 1918)"``, ...), or None
    when it is. An unparseable address is not public."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return "unparseable"
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 reaches that IPv4 host (mapped: through this host's own stack; NAT64 and
        # 6to4: through a gateway), so it is judged as that address. NAT64's prefix lies in ::/8, which Python
        # calls reserved: judging the embedded address instead keeps IPv6-only (DNS64) networks working.
        embedded = ip.ipv4_mapped or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            inner = non_public_reason(embedded)
            return None if inner is None else f"{inner} (IPv4 {embedded} inside IPv6)"
        if ip.sixtofour is not None and (inner := non_public_reason(ip.sixtofour)) is not None:
            return f"{inner} (IPv4 {ip.sixtofour} inside IPv6)"
        if ip.scope_id:
            return "link-local (scoped)"
    for network, reason in _NON_PUBLIC_RANGES:
        if ip.version == network.version and ip in network:
            return reason
    if ip.version == 6 and ip not in _GLOBAL_UNICAST_V6:
        return "reserved (outside IPv6 global unicast)"
    # Python's own tables as a backstop: whatever they call special (they only grow between versions).
    if ip.is_private or ip.is_reserved or ip.is_loopback or ip.is_link_local or ip.is_multicast:
        return "reserved"
    if ip.is_unspecified or not ip.is_global:
        return "not globally routable"
    return None


def is_public_address(address: str | Address) -> bool:
    """True only for a globally routable unicast address (see :func:`non_public_reason`)."""
    return non_public_reason(address) is None
