"""systemd's notify protocol (sd_notify(3)) without a dependency: one datagram per state.

Contract: ``notify("READY=1")`` sends to ``$NOTIFY_SOCKET`` when systemd set it
(Type=notify) and does nothing otherwise; it never raises.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``STATE=value`` lines to systemd; False when not run under Type=notify."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def reloading() -> bool:
    """RELOADING=1 with the monotonic timestamp systemd >= 253 expects (Type=notify-reload)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
