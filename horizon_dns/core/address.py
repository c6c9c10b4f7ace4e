"""``IP``, ``IP:PORT`` and ``[IPv6]:PORT`` as written in configuration files."""

from __future__ import annotations

import ipaddress


def split_host_port(text: str, default_port: int, min_port: int = 0) -> tuple[str, int]:
    """The IP address and port of ``text``; ValueError naming what is wrong.

    A bare IPv6 address has several colons and no brackets; with a port it is
    written ``[::1]:53`` (RFC 3986 §3.2.2 style).
    """
    whole = text.strip()
    host, port = whole, default_port
    if whole.startswith("["):
        end = whole.find("]")
        if end < 0:
            raise ValueError(f"{whole!r}: missing ']' after an IPv6 address")
        host, rest = whole[1:end], whole[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{whole!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], whole, min_port)
    elif whole.count(":") == 1:
        host, port_text = whole.split(":")
        port = _port(port_text, whole, min_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{whole!r} is not an IP address") from None
    return host, port


def _port(text: str, whole: str, min_port: int) -> int:
    if not text.isdigit() or not min_port <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: port must be a number {min_port}..65535")
    return int(text)
