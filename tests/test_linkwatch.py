"""The rtnetlink link watcher: its parser on hand-built bytes, and the real kernel.

The kernel tests need root: each creates a network namespace of its own
(``hzlw-<random>``), makes and changes interfaces only inside it, and runs the
watcher in a child process inside it (a netlink socket sees the namespace it was
opened in). Nothing is sent on any network. Without root or ``ip`` they skip on a
laptop and fail in CI, like the lab tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_tool, tools_required
from hypothesis import given
from hypothesis import strategies as st

from horizon_dns.net.linkwatch import (
    AF_INET,
    AF_INET6,
    IFA_ADDRESS,
    IFA_LABEL,
    IFA_LOCAL,
    IFF_RUNNING,
    IFF_UP,
    IFLA_IFNAME,
    IFLA_OPERSTATE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    AddressEvent,
    LinkEvent,
    LinkWatcher,
    parse_messages,
)

ROOT = Path(__file__).resolve().parent.parent
WITHIN = 2.0  # seconds: the promise to the cache
AF_BRIDGE = 7
IF_OPER_UP = 6

# ---------------------------------------------------------------- hand-built netlink


def rtattr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(kind: int, body: bytes) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def link_msg(kind: int, index: int, name: str, flags: int, family: int = 0) -> bytes:
    body = struct.pack("=BxHiII", family, 1, index, flags, 0)
    body += rtattr(IFLA_IFNAME, name.encode() + b"\0") + rtattr(IFLA_OPERSTATE, bytes([IF_OPER_UP]))
    return nlmsg(kind, body)


def addr_msg(kind: int, index: int, prefix: int, *attrs: bytes, family: int = AF_INET) -> bytes:
    return nlmsg(kind, struct.pack("=BBBBI", family, prefix, 0, 0, index) + b"".join(attrs))


def test_parser_reads_several_messages_of_one_datagram() -> None:
    v4 = socket.inet_aton
    data = (
        link_msg(RTM_NEWLINK, 3, "tailscale0", IFF_UP | IFF_RUNNING)
        + link_msg(RTM_DELLINK, 4, "eth1", 0)
        # a point-to-point address: IFA_LOCAL is ours, IFA_ADDRESS the peer's
        + addr_msg(
            RTM_NEWADDR, 3, 32, rtattr(IFA_ADDRESS, v4("100.64.0.9")), rtattr(IFA_LOCAL, v4("100.64.0.1")),
            rtattr(IFA_LABEL, b"tailscale0\0"),
        )
        + addr_msg(
            RTM_DELADDR, 3, 64, rtattr(IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fd7a::1")),
            family=AF_INET6,
        )
        + nlmsg(3, b"\0\0\0\0")  # NLMSG_DONE: not an event
    )  # fmt: skip
    assert parse_messages(data) == [
        LinkEvent(3, "tailscale0", IFF_UP | IFF_RUNNING, IF_OPER_UP),
        LinkEvent(4, "eth1", 0, IF_OPER_UP, removed=True),
        AddressEvent(3, ipaddress.ip_interface("100.64.0.1/32"), "tailscale0"),
        AddressEvent(3, ipaddress.ip_interface("fd7a::1/64"), None, removed=True),
    ]
    up, down = parse_messages(data)[:2]
    assert isinstance(up, LinkEvent) and up.up
    assert isinstance(down, LinkEvent) and not down.up


def test_parser_skips_what_is_not_an_interface_event() -> None:
    good = link_msg(RTM_NEWLINK, 2, "d0", IFF_UP)
    assert parse_messages(good)[0] == LinkEvent(2, "d0", IFF_UP, IF_OPER_UP)
    assert not LinkEvent(2, "d0", IFF_UP, IF_OPER_UP).up  # up but not running (no carrier)
    # A bridge's AF_BRIDGE notice that a port left it: the port itself still exists.
    assert parse_messages(link_msg(RTM_DELLINK, 2, "d0", 0, family=AF_BRIDGE)) == []
    # An impossible prefix, an address of the wrong size, an unknown family.
    v4 = rtattr(IFA_LOCAL, socket.inet_aton("10.0.0.1"))
    assert parse_messages(addr_msg(RTM_NEWADDR, 2, 33, v4)) == []
    assert parse_messages(addr_msg(RTM_NEWADDR, 2, 64, v4, family=AF_INET6)) == []
    assert parse_messages(addr_msg(RTM_NEWADDR, 2, 8, v4, family=99)) == []
    assert parse_messages(addr_msg(RTM_NEWADDR, 2, 8)) == []  # no address at all
    # A message whose length overruns the datagram ends it; what came before stands.
    assert parse_messages(good + good[:-4]) == parse_messages(good)
    # A malformed attribute ends the attribute list, not the message.
    broken = nlmsg(RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 2, IFF_UP, 0) + struct.pack("=HH", 2, 3))
    assert parse_messages(broken) == [LinkEvent(2, None, IFF_UP, None)]
    assert parse_messages(b"") == [] and parse_messages(nlmsg(RTM_NEWLINK, b"short")) == []


_MESSAGE = st.tuples(
    st.sampled_from([RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, 2, 3, 99]),
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda head, attrs: head + b"".join(rtattr(k, v) for k, v in attrs),
            st.binary(min_size=8, max_size=16),
            st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=20)), max_size=4),
        ),
    ),
)


@given(st.binary(max_size=512))
def test_parser_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    events = parse_messages(data)
    assert all(isinstance(event, LinkEvent | AddressEvent) for event in events)


@given(st.lists(_MESSAGE, max_size=6), st.integers(0, 64))
def test_parser_never_raises_on_plausible_messages(messages: list[tuple[int, bytes]], cut: int) -> None:
    data = b"".join(nlmsg(kind, body) for kind, body in messages)
    for chunk in (data, data[: max(0, len(data) - cut)]):
        for event in parse_messages(chunk):
            if isinstance(event, AddressEvent):
                assert event.address.network.prefixlen <= event.address.max_prefixlen


# ---------------------------------------------------------------- lifecycle, this process


@pytest.mark.skipif(sys.platform != "linux", reason="rtnetlink is Linux only")
def test_start_and_stop_are_idempotent() -> None:
    """Opening a netlink socket and reading the interface list changes nothing on the host."""

    async def run() -> None:
        watcher = LinkWatcher(lambda reason: None)
        assert watcher.start() and watcher.start()
        watcher.stop()
        watcher.stop()
        assert watcher.start()  # again after a stop
        watcher.stop()
        assert watcher.changes == 0

    asyncio.run(run())
    with pytest.raises(RuntimeError):  # no running loop: a caller's bug, not "unavailable"
        LinkWatcher(lambda reason: None).start()


# ---------------------------------------------------------------- the real kernel, in a namespace


def require_root() -> str:
    if os.geteuid() != 0:
        problem = "the link watcher's kernel tests need root (network namespaces)"
        if tools_required():
            pytest.fail(problem + " -- CI forbids skipping", pytrace=False)
        pytest.skip(problem)
    return require_tool("ip")


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    name = f"hzlw-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def ip(ns: str, *args: str, stdin: str | None = None) -> float:
    """Run ``ip -n ns args``; the monotonic time just before it ran (when the change began)."""
    began = time.monotonic()
    result = subprocess.run(["ip", "-n", ns, *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"
    return began


def ip_output(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def add_link(ns: str, name: str) -> Callable[[str], bool]:
    """Add an interface that is up and running once set up; which lines to ignore about its kind.

    dummy is the plain choice; some kernels lack it, so ifb, then veth, whose peer
    must be up for the link to run and reports its own up and down (ignored).
    """
    for kind in ("dummy", "ifb"):
        added = subprocess.run(["ip", "-n", ns, "link", "add", name, "type", kind], capture_output=True)
        if added.returncode == 0:
            return lambda line: False
    ip(ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    ip(ns, "link", "set", f"{name}p", "up")
    return lambda line: f" {name}p " in f" {line} "


CHILD = r"""
import asyncio, logging, os, sys, time
from horizon_dns.net.linkwatch import LinkWatcher

def say(text):
    print(f"{time.monotonic():.6f} {text}", flush=True)

async def main(names):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    watcher = LinkWatcher(say, (lambda: names) if names else None)
    fd = sys.stdin.fileno()

    def command():
        data = os.read(fd, 4096)
        if not data or b"quit" in data:
            done.done() or done.set_result(None)
        elif b"stall" in data:
            # Block the loop, as a busy server would: the kernel queues events meanwhile.
            say("stalled")
            while b"resume" not in data:
                data = os.read(fd, 4096)

    loop.add_reader(fd, command)
    say(f"ready {watcher.start()}")
    await done
    watcher.stop()
    watcher.stop()
    say(f"stopped {watcher.changes}")

logging.basicConfig(level=logging.DEBUG)  # to the stderr file the test shows on failure
names = [n for n in sys.argv[1].split(",") if n]
factory = None
if sys.argv[2] == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(main(names))
"""


class Child:
    """The watcher running inside ``ns``; reads its ``<monotonic> <reason>`` lines with deadlines."""

    def __init__(self, ns: str, tmp: Path, names: str = "", loop: str = "asyncio") -> None:
        self.stderr = tmp / f"child-{names or 'all'}-{secrets.token_hex(2)}.err"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, names, loop],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            )  # fmt: skip
        self.buffer = b""
        self.reasons = 0

    def wait_ready(self) -> None:
        assert self.line(time.monotonic() + 15) == "ready True", self.diagnosis()

    def diagnosis(self) -> str:
        return f"child stderr:\n{self.stderr.read_text()}"

    def timed_line(self, deadline: float) -> tuple[float, str] | None:
        """The next line as (child's monotonic time, text), or None at the deadline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"the watcher exited ({self.proc.poll()})\n{self.diagnosis()}"
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n", 1)
        stamp, _, text = raw.decode().partition(" ")
        return float(stamp), text

    def line(self, deadline: float) -> str | None:
        got = self.timed_line(deadline)
        return None if got is None else got[1]

    def expect(
        self, began: float, *wanted: str, ignore: Callable[[str], bool] = lambda line: False
    ) -> list[str]:
        """Each of ``wanted``, in any order, within WITHIN seconds of ``began``.

        Any other line fails unless ``ignore`` takes it, so a spurious report from an
        earlier step (a no-op) shows up here. Returns the ignored lines.
        """
        missing, ignored = list(wanted), []
        while missing:
            got = self.timed_line(began + WITHIN)
            assert got is not None, f"no {missing} within {WITHIN} s\n{self.diagnosis()}"
            stamp, text = got
            self.reasons += 1
            if text in missing:
                missing.remove(text)
                assert stamp - began < WITHIN, (text, stamp - began)
            elif ignore(text):
                ignored.append(text)
            else:
                pytest.fail(f"unexpected report {text!r} while waiting for {missing}")
        return ignored

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, ignore: Callable[[str], bool] = lambda line: False) -> None:
        """Stop the watcher: no report may be left, and ``changes`` counted every one."""
        self.send("quit")
        deadline = time.monotonic() + 10
        while (text := self.line(deadline)) is not None and not text.startswith("stopped"):
            assert ignore(text), f"unexpected report {text!r}"
            self.reasons += 1
        assert text == f"stopped {self.reasons}", text
        assert self.proc.wait(10) == 0, self.diagnosis()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def wait_for(check: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)  # polling kernel state the test cannot be told about


@pytest.fixture
def spawn(netns: str, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start watchers in the test's namespace; all are killed at the end, whatever happened."""
    children: list[Child] = []

    def start(names: str = "", loop: str = "asyncio") -> Child:
        if loop == "uvloop":
            pytest.importorskip("uvloop")
        children.append(Child(netns, tmp_path, names, loop))
        children[-1].wait_ready()
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            child.kill()


@pytest.mark.needs_tool("ip")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_kernel_changes_are_reported_within_two_seconds_and_noise_is_not(
    netns: str, spawn: Callable[..., Child], loop: str
) -> None:
    every = spawn(loop=loop)  # every interface but lo
    only_lo = spawn(names="lo", loop=loop)
    began = ip(netns, "link", "set", "lo", "up")
    only_lo.expect(began, "link lo up", "address 127.0.0.1/8 added on lo", "address ::1/128 added on lo")

    peer = add_link(netns, "d0")  # created down: not a change
    every.expect(ip(netns, "link", "set", "d0", "up"), "link d0 up", ignore=peer)

    # MTU and flag noise is not a change; the next report must be the address.
    ip(netns, "link", "set", "d0", "mtu", "1400")
    ip(netns, "link", "set", "d0", "multicast", "off")
    every.expect(ip(netns, "addr", "add", "100.64.0.1/24", "dev", "d0"), "address 100.64.0.1/24 added on d0")

    # An IPv6 address is announced again once duplicate address detection ends,
    # and fe80:: addresses come and go with the link: neither is reported.
    every.expect(ip(netns, "addr", "add", "fd7a::1/64", "dev", "d0"), "address fd7a::1/64 added on d0")
    wait_for(lambda: "tentative" not in ip_output(netns, "-6", "addr", "show", "dev", "d0"))

    # A bridge tells of a port leaving it with an AF_BRIDGE RTM_DELLINK: not a removal.
    ip(netns, "link", "add", "br0", "type", "bridge")
    ip(netns, "link", "set", "d0", "master", "br0")
    ip(netns, "link", "set", "d0", "nomaster")
    began = ip(netns, "addr", "del", "100.64.0.1/24", "dev", "d0")
    every.expect(began, "address 100.64.0.1/24 removed from d0")
    every.expect(ip(netns, "link", "del", "br0"), "link br0 removed")

    # Down takes the IPv6 address with it (IPv4 addresses stay).
    began = ip(netns, "link", "set", "d0", "down")
    every.expect(began, "link d0 down", "address fd7a::1/64 removed from d0", ignore=peer)
    every.expect(ip(netns, "link", "set", "d0", "up"), "link d0 up", ignore=peer)
    # Deleting a link that is up closes it first: the kernel sends "down", then RTM_DELLINK.
    every.expect(ip(netns, "link", "del", "d0"), "link d0 down", "link d0 removed", ignore=peer)

    # The lo-only watcher saw none of that: its next report is lo's own.
    only_lo.expect(ip(netns, "link", "set", "lo", "down"), "link lo down", "address ::1/128 removed from lo")
    every.finish(ignore=peer)
    only_lo.finish()


@pytest.mark.needs_tool("ip")
def test_overflow_is_reported_once_and_the_state_is_read_again(
    netns: str, spawn: Callable[..., Child]
) -> None:
    child = spawn()
    peer = add_link(netns, "d0")
    child.send("stall")
    assert child.line(time.monotonic() + 10) == "stalled"
    # More notifications than the socket's buffer holds, while nobody reads it...
    count = 6000
    batch = "".join(f"addr add 10.{i >> 8 & 255}.{i & 255}.1/32 dev d0\n" for i in range(count))
    ip(netns, "-batch", "-", stdin=batch)
    # ...so this one is lost; after the overflow the watcher must know d0 is up.
    ip(netns, "link", "set", "d0", "up")
    child.send("resume")
    # One report for the whole burst, once the state has been read again: the
    # messages that were queued are not reported one by one.
    child.expect(time.monotonic(), "netlink overflow", ignore=peer)
    # It knows d0 is up although that event was lost: going down is a change.
    child.expect(ip(netns, "link", "set", "d0", "down"), "link d0 down", ignore=peer)
    child.finish(ignore=peer)
