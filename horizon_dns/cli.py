"""Command line: ``serve``, ``check``, ``explain``. Argument parsing and exit codes only.

Exit codes: 0 success; 1 configuration errors (each printed with file:line);
2 usage errors; 3 a listen address could not be bound. ``explain`` exits with
the reply's rcode (0 NOERROR, 3 NXDOMAIN, ...) so scripts can test it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Sequence

from horizon_dns import __version__
from horizon_dns.config.load import describe, load_config
from horizon_dns.config.schema import Config
from horizon_dns.core.names import text_to_name
from horizon_dns.errors import ConfigError

log = logging.getLogger("horizon_dns")


def _load(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"horizon-dns: the configuration has {len(exc.issues)} problem(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    from horizon_dns.net.server import BindError, install_uvloop
    from horizon_dns.runtime import serve

    config = _load(args.config)
    if config is None:
        return 1
    install_uvloop()
    if config.workers > 1:
        from horizon_dns.workers import run_workers

        return run_workers(config)
    try:
        return asyncio.run(serve(config))
    except BindError as exc:
        print(f"horizon-dns: {exc}", file=sys.stderr)
        print(f"  hint: {exc.hint}", file=sys.stderr)
        return 3


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    for issue in config.warnings:
        print(f"  {issue}", file=sys.stderr)
    print(describe(config))
    print(
        f"ok: {len(config.files)} file(s), {len(config.zones)} zone(s), "
        f"{sum(len(z.stages) for z in config.zones)} stage(s)"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from horizon_dns.explain import explain, parse_qtype

    try:
        parse_qtype(args.type)
        ipaddress.ip_address(args.client)
        if not args.name.isascii():
            # What a stub resolver sends for a name typed in Unicode (RFC 5891 §5).
            args.name = args.name.encode("idna").decode("ascii")
        text_to_name(args.name)
    except (ValueError, UnicodeError) as exc:
        print(f"horizon-dns explain: {exc}", file=sys.stderr)
        return 2
    config = _load(args.config)
    if config is None:
        return 1
    text, rcode = asyncio.run(explain(config, args.name, args.type, args.client, args.offline, args.repeat))
    print(text)
    return rcode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="horizon-dns", description="Split-horizon DNS for overlay networks."
    )
    parser.add_argument("--version", action="version", version=f"horizon-dns {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default info)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("serve", cmd_serve, "run the DNS server"),
        ("check", cmd_check, "load the configuration, build every stage, report every problem"),
        ("explain", cmd_explain, "show which stages answer a name, and why"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", "-c", help="server YAML file (default: the embedded default)")
        sub.set_defaults(func=func)
        if name == "explain":
            sub.add_argument("name", help="query name, e.g. www.nodeb.mydomain.tld")
            sub.add_argument("type", nargs="?", default="A", help="query type (default A)")
            sub.add_argument("--client", default="127.0.0.1", help="client address seen by templates")
            sub.add_argument("--offline", action="store_true", help="skip stages that use the network")
            sub.add_argument(
                "--repeat",
                type=int,
                default=1,
                choices=range(1, 11),
                metavar="N",
                help="ask N times on one pipeline: later runs show the caches",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    result: int = args.func(args)
    return result
