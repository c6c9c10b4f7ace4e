"""The server file's own settings: listen addresses, limits, TCP, LLMNR, metrics, NSID.

Contract: ``read_server(loader, section, base, rules_optional)`` reads the server
file's settings into a :class:`~horizon_dns.config.schema.Config`, then has
``loader`` read the server file's own rules and every ``*.yaml`` of the rules
folder. A server setting found in a rules file is an error that says where it
belongs. Problems go to the loader's issues; nothing raises.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from horizon_dns.config.rules import RulesLoader, rules_files
from horizon_dns.config.schema import (
    DEFAULT_LISTEN,
    EMBEDDED,
    Config,
    ListenAddress,
    LlmnrSettings,
    parse_listen,
)
from horizon_dns.config.source import (
    Section,
    as_bool,
    as_str,
    int_range,
    line_of,
    number_range,
    scalar_value,
)
from horizon_dns.core.access import LOOPBACK
from horizon_dns.core.encode import DEFAULT_UDP_PAYLOAD
from horizon_dns.core.names import text_to_name


def _label(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    if not name or ".." in name:
        raise ValueError(f"{text!r} is not a name")
    text_to_name(name)
    return name


DEFAULT_METRICS = "127.0.0.1:9153"  # CoreDNS's port


def _read_metrics(section: Section) -> ListenAddress | None:
    node = section.raw("metrics")
    if isinstance(node, ScalarNode) and scalar_value(node) is False:
        return None
    metrics = Section(
        node,
        section.where.child("metrics"),
        hint=f"write metrics: false to turn it off, or a mapping: metrics: {{listen: {DEFAULT_METRICS}}}",
    )
    text = metrics.get("listen", as_str, default=DEFAULT_METRICS)
    metrics.finish()
    try:
        return parse_listen(text)
    except ValueError as exc:
        metrics.where.child("listen").error(metrics.node_of("listen"), str(exc))
        return None


def _read_query_log(section: Section) -> float | None:
    node = section.raw("query_log")
    if node is None or (isinstance(node, ScalarNode) and scalar_value(node) is False):
        return None
    query_log = Section(node, section.where.child("query_log"))
    sample = query_log.get("sample", number_range(0.0, 1.0), default=1.0)
    query_log.finish()
    return sample


def _read_llmnr(section: Section) -> LlmnrSettings:
    interfaces = tuple(section.string_list("interfaces", default=[]))
    aliases: list[str] = []
    for i, text in enumerate(section.string_list("aliases", default=[])):
        try:
            aliases.append(_label(text))
        except ValueError as exc:
            section.where.child("aliases").child(i).error(section.node_of("aliases"), str(exc))
    devices: list[tuple[str, tuple[str, ...]]] = []
    device_section = section.section("devices")
    for name in device_section.names():
        addresses = device_section.string_list(name, hint="printer: [100.64.0.22, fd7a:115c:a1e0::22]")
        for text in addresses:
            try:
                ipaddress.ip_address(text)
            except ValueError:
                device_section.where.child(name).error(
                    device_section.node_of(name), f"{text!r} is not an IP address"
                )
        try:
            devices.append((_label(name), tuple(addresses)))
        except ValueError as exc:
            device_section.where.child(name).error(device_section.node_of(name), str(exc))
    device_section.finish()
    settings = LlmnrSettings(
        interfaces=interfaces,
        aliases=tuple(aliases),
        devices=tuple(devices),
        hostname=section.get("hostname", as_str, default=""),
        ttl=section.get("ttl", int_range(0, 86400), default=30),
        tcp=section.get("tcp", as_bool, default=True),
        conflict_check=section.get("conflict_check", as_bool, default=True),
        mdns_announce=section.get("mdns_announce", as_bool, default=False),
    )
    section.finish()
    return settings


OVERLAY_PREFIXES = "100.64.0.0/10 and fd7a:115c:a1e0::/48 (tailscale), or your zerotier network's prefix"


def _port_slip(text: str) -> str:
    """``::1:5491`` is a valid IPv6 address, but most likely meant ``[::1]:5491``."""
    head, _, tail = text.strip().rpartition(":")
    if tail.isdigit() and head.count(":") >= 1:
        try:
            ipaddress.IPv6Address(head)
        except ValueError:
            return ""
        return f"if you meant port {tail} on {head}, write [{head}]:{tail}; otherwise "
    return ""


def _read_listen(section: Section) -> list[ListenAddress]:
    """``listen``: addresses as text, or ``{address: ..., allow: [networks]}``.

    ``allow`` may be left out exactly where the text form needs none: on a
    loopback address, which then allows loopback clients.
    """
    node = section.raw("listen")  # marked as used even when absent: a rules file may not set it
    if node is None:
        return [parse_listen(text) for text in DEFAULT_LISTEN]
    listen: list[ListenAddress] = []
    where = section.where.child("listen")
    empty = isinstance(node, ScalarNode) and scalar_value(node) is None
    items = [] if empty else node.value if isinstance(node, SequenceNode) else [node]
    if not items:
        where.error(
            node,
            "no listen address: the server would answer nobody",
            f"list one, or delete 'listen:' for the default ({' and '.join(DEFAULT_LISTEN)})",
        )
        return listen
    seen: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], tuple[int, Node]] = {}
    for i, item in enumerate(items):
        here = where.child(i)
        allow: tuple[str, ...] | None = None
        if isinstance(item, MappingNode):
            entry = Section(item, here)
            text = entry.get("address", as_str, hint="address: 100.64.0.1:53")
            if entry.has("allow"):
                allow = tuple(
                    entry.string_list("allow", hint=f"the overlay's prefixes, e.g. {OVERLAY_PREFIXES}")
                )
            entry.finish()
            if text is None:
                continue
        elif isinstance(item, ScalarNode):
            text = str(scalar_value(item))
        else:
            here.error(item, "expected an address or {address: ..., allow: [...]}")
            continue
        try:
            address = parse_listen(text)
        except ValueError as exc:
            here.error(item, str(exc))
            continue
        for network in allow or ():
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                here.child("allow").error(item, f"{network!r} is not a network such as 100.64.0.0/10")
        ip = ipaddress.ip_address(address.host)
        if allow is None:
            if not ip.is_loopback:
                form = (
                    "add allow: [...]"
                    if isinstance(item, MappingNode)
                    else f"write {{address: '{address}', allow: [...]}}"
                )
                here.error(
                    item,
                    f"{address} is not a loopback address: say who may ask there",
                    f"{_port_slip(text)}{form} with {OVERLAY_PREFIXES}",
                )
                continue
            allow = LOOPBACK
        # Port 0 picks a free port on each bind, so only fixed ports can collide.
        if address.port != 0:
            first = seen.get((ip, address.port))
            if first is not None:
                twice = f"listen[{first[0]}] (line {line_of(first[1])}) and listen[{i}]"
                here.error(
                    item,
                    f"{address} is listed twice: {twice}",
                    "the second bind would fail with 'Address already in use': delete one of them",
                )
                continue
            seen[(ip, address.port)] = (i, item)
        listen.append(ListenAddress(address.host, address.port, allow))
    return listen


def read_server(loader: RulesLoader, section: Section, base: Path, rules_optional: bool) -> Config:
    listen = _read_listen(section)
    config = Config(listen=listen)
    config.udp_payload = section.get(
        "udp_payload",
        int_range(512, 4096),
        default=DEFAULT_UDP_PAYLOAD,
        hint="1232 avoids IP fragmentation (DNS Flag Day 2020)",
    )
    config.shutdown_timeout = section.get("shutdown_timeout", number_range(0, 600), default=5.0)
    tcp = section.section("tcp")
    config.tcp_idle_timeout = tcp.get("idle_timeout", number_range(0.1, 3600), default=10.0)
    config.tcp_max_connections = tcp.get("max_connections", int_range(1, 65535), default=256)
    config.tcp_max_inflight = tcp.get("max_inflight", int_range(1, 65535), default=64)
    config.tcp_message_timeout = tcp.get("message_timeout", number_range(0.1, 600), default=5.0)
    config.tcp_per_client = tcp.get("per_client", int_range(1, 65535), default=32)
    tcp.finish()
    limits = section.section("limits")
    config.max_inflight = limits.get("max_inflight", int_range(1, 1_000_000), default=4096)
    config.rate_qps = limits.get("rate_qps", number_range(0, 1e7), default=1000.0)
    config.rate_burst = limits.get("rate_burst", int_range(1, 10_000_000), default=2000)
    limits.finish()
    config.workers = section.get("workers", int_range(1, 64), default=1)
    if config.workers > 1 and any(a.port == 0 for a in listen):
        section.where.child("workers").error(
            section.node_of("workers"), "workers share their listen addresses: port 0 cannot be shared",
            "give every listen address a fixed port",
        )  # fmt: skip
    config.refuse_udp = section.get("refuse_udp", as_str, default="silence")
    if config.refuse_udp not in ("silence", "refused"):
        section.where.child("refuse_udp").error(
            section.node_of("refuse_udp"), f"unknown value {config.refuse_udp!r}", "use silence or refused"
        )
    llmnr = section.section("llmnr")  # marked as used even when absent, as listen above
    if llmnr.node is not None:
        config.llmnr = _read_llmnr(llmnr)
    config.metrics = _read_metrics(section)
    config.query_log_sample = _read_query_log(section)
    config.nsid = section.get(
        "nsid",
        _nsid,
        default=socket.gethostname().split(".")[0],
        hint=f'a short name for this server, at most {MAX_NSID} octets; "" for none',
    )
    config.watch = section.get("watch", as_bool, default=True)
    rules = section.get("rules", as_str, default="rules")
    loader.read_rules_content(section)
    section.finish()
    rules_dir = (base / rules) if not os.path.isabs(rules) else Path(rules)
    config.rules_dir = rules_dir
    rules_node = section.node_of("rules") or section.node
    try:
        paths = rules_files(rules_dir)
    except (FileNotFoundError, NotADirectoryError):
        if not rules_optional:
            section.where.child("rules").error(
                rules_node,
                f"rules folder {rules_dir} does not exist",
                "create it, or point 'rules:' at the folder holding your *.yaml rules",
            )
        return config
    except OSError as exc:
        # Loading no rules would serve a different configuration (and a reload
        # would replace the running one with it): an unreadable folder is an error.
        section.where.child("rules").error(
            rules_node,
            f"cannot read rules folder {rules_dir}: {exc.strerror or exc}",
            "let the server's user read and enter it (chmod u+rx), or point 'rules:' elsewhere",
        )
        return config
    if paths is None:
        if not rules_optional:
            section.where.child("rules").error(
                rules_node,
                f"rules folder {rules_dir} is a file, not a folder",
                "point 'rules:' at the folder holding your *.yaml rules files",
            )
        return config
    for stray in sorted(rules_dir.glob("*.yml")):  # a common slip: say so rather than skip it silently
        section.where.child("rules").warn(
            rules_node, f"{stray} is not read: rules files end in .yaml", f"rename it to {stray.stem}.yaml"
        )
    server_keys = section.used - {"aliases", "zones"}
    for path in paths:
        rules_section = loader.read_file(path)
        if rules_section is not None:
            loader.read_rules_content(rules_section)
            _refuse_server_keys(rules_section, server_keys, section.where.file)
            rules_section.finish()
    return config


MAX_NSID = 128  # octets; RFC 5001 sets no limit, but every NSID reply carries it


def _nsid(value: object) -> str:
    """The ``nsid`` setting: a string of at most MAX_NSID octets in UTF-8, as it is sent."""
    text = as_str(value)
    size = len(text.encode("utf-8"))
    if size > MAX_NSID:
        # An NSID of kilobytes would push UDP replies past the client's payload size.
        raise ValueError(f"nsid is {size} octets long; the limit is {MAX_NSID}")
    return text


def _refuse_server_keys(section: Section, server_keys: set[str], server_file: str) -> None:
    """A server setting in a rules file: say where it belongs, rather than "did you mean"."""
    for key in section.names():
        if key in server_keys and key not in section.used:
            key_node, _value = section.items.pop(key)  # reported here, not again by finish()
            if server_file == EMBEDDED:
                hint = "rules files hold only 'aliases' and 'zones'; write a server file and pass --config"
            else:
                hint = f"rules files hold only 'aliases' and 'zones'; move it to {server_file}"
            section.where.child(key).error(
                key_node,
                f"{key!r} is a server setting: it belongs in the server file, not in a rules file",
                hint,
            )
