"""The files in contrib/ are tested, not just written."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

from conftest import require_tool

from horizon_dns.config.load import load_config

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def _unit_for_verify(tmp_path: Path) -> Path:
    """The shipped unit with its command pointed at a binary that exists here."""
    unit = tmp_path / "horizon-dns.service"
    text = (CONTRIB / "systemd-resolved" / "horizon-dns.service").read_text()
    unit.write_text(text.replace("/usr/local/bin/horizon-dns", shutil.which("true") or "/bin/true"))
    return unit


def test_unit_file_verifies_cleanly(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(_unit_for_verify(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # The check can fail: a misspelt key is reported.
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nType=notfy\nExecStart=/bin/true\n")
    result = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True)
    assert "notfy" in result.stderr


def test_unit_file_is_hardened(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", str(_unit_for_verify(tmp_path))],
        capture_output=True,
        text=True,
    )
    found = re.search(
        r"Overall exposure level for horizon-dns.service: ([\d.]+)", result.stdout + result.stderr
    )
    assert found, result.stdout[-2000:]
    print(f"\nsystemd-analyze security exposure: {found.group(1)}")
    assert float(found.group(1)) <= 2.0


def test_unit_notifies_and_reloads() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((CONTRIB / "systemd-resolved" / "horizon-dns.service").read_text())
    service = unit["Service"]
    assert service["Type"] == "notify" and "kill -HUP $MAINPID" in service["ExecReload"]
    assert "serve --config /etc/horizon-dns/horizon-dns.yaml" in service["ExecStart"]


def test_resolved_drop_in_says_what_the_docs_say() -> None:
    drop_in = configparser.ConfigParser(strict=False, interpolation=None)
    drop_in.read_string((CONTRIB / "systemd-resolved" / "resolved.conf.d" / "horizon-dns.conf").read_text())
    resolve = drop_in["Resolve"]
    assert resolve["DNS"] == "127.0.0.1:5300" and resolve["Domains"] == "~mydomain.tld"
    assert resolve["LLMNR"] == "no" and resolve["ResolveUnicastSingleLabel"] == "yes"
    link = configparser.ConfigParser(strict=False, interpolation=None)
    link.read_string((CONTRIB / "systemd-resolved" / "networkd" / "horizon-dns.conf").read_text())
    assert dict(link["Network"]) == {"dns": "127.0.0.1:5300", "domains": "~mydomain.tld", "llmnr": "no"}


def test_shipped_server_file_passes_check(tmp_path: Path) -> None:
    server = tmp_path / "horizon-dns.yaml"
    shutil.copy(CONTRIB / "systemd-resolved" / "horizon-dns.yaml", server)
    shutil.copytree(Path(__file__).resolve().parent.parent / "rules", tmp_path / "rules")
    config = load_config(server)
    assert [zone.name for zone in config.zones] == [".", "mydomain.tld."]


def test_grafana_dashboard_is_valid_json() -> None:
    dashboard = json.loads((CONTRIB / "grafana" / "horizon-dns.json").read_text())
    assert dashboard["uid"] == "horizon-dns" and len(dashboard["panels"]) >= 8
