"""Strict configuration: every problem reported at once, each with file:line and a hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import config_from, write_config

from horizon_dns.config.model import load_config, parse_listen
from horizon_dns.errors import ConfigError, ConfigIssue

GOOD_TEMPLATE = r"""
zones:
  mydomain.tld:
    stages:
      - template:
          type: [A]
          match: ['^(?P<h>[^.]+)\.mydomain\.tld\.$']
          answer: ['{{ name }} 60 IN A 100.64.0.1']
"""


def issues_of(tmp: Path, rules: str | dict[str, str], server: str = "") -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        config_from(tmp, rules, server)
    return info.value.issues


def find(issues: list[ConfigIssue], text: str) -> ConfigIssue:
    for issue in issues:
        if text in issue.message:
            return issue
    raise AssertionError(f"no issue mentions {text!r}: {[str(i) for i in issues]}")


def test_good_config_loads(tmp_path: Path) -> None:
    config = config_from(tmp_path, GOOD_TEMPLATE)
    assert [z.name for z in config.zones] == ["mydomain.tld."]
    assert [s.name for s in config.zones[0].stages] == ["template:mydomain.tld#0"]


def test_typo_in_template_variable_fails_at_load(tmp_path: Path) -> None:
    # CoreDNS accepts `.Grup.h` and fails at query time; we refuse it at load.
    issues = issues_of(tmp_path, GOOD_TEMPLATE.replace("100.64.0.1", "{{ grup.h }}"))
    issue = find(issues, "unknown template variable 'grup'")
    assert issue.file.endswith("rules/10-test.yaml") and issue.line == 8
    assert issue.key == "zones.mydomain.tld.stages[0].template.answer[0]"
    assert "available:" in issue.hint


def test_unknown_group_fails_at_load(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, GOOD_TEMPLATE.replace("100.64.0.1", "{{ group.host }}"))
    issue = find(issues, "group 'host' is not a named group")
    assert issue.line == 8 and "named groups: h" in issue.hint


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    rules = {
        "10-a.yaml": r"""
        zones:
          mydomain.tld:
            stages:
              - template:
                  typ: [A]
                  match: ['^(?P<h>[^.+\.mydomain\.tld\.$']
                  answer: ['{{ name }} 60 IN A {{ group.h }']
                  rcode: NOSUCH
        """,
        "20-b.yaml": """
        aliases:
          hub: nodec
          hub: noded
        zones:
          other.tld:
            stages:
              - tempalte: {}
              - template: {ttl: -1, answer: 'x 60 IN A 1.2.3.4', fallthrough: maybe}
        """,
    }
    issues = issues_of(tmp_path, rules)
    a = [i for i in issues if i.file.endswith("10-a.yaml")]
    b = [i for i in issues if i.file.endswith("20-b.yaml")]
    assert find(a, "unknown key 'typ'").hint == "did you mean 'type'?"
    assert find(a, "unknown key 'typ'").line == 6
    assert find(a, "invalid regex").line == 7
    assert find(a, "template syntax error").line == 8
    assert find(a, "unknown rcode 'NOSUCH'").line == 9
    assert find(b, "appears twice").line == 4
    assert find(b, "unknown stage kind 'tempalte'").line == 8
    assert find(b, "out of range").line == 9
    assert find(b, "expected true or false").line == 9
    assert len(issues) >= 8


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, "zones:\n  a.tld:\n    stages: [\n")
    issue = find(issues, "YAML syntax error")
    assert issue.file.endswith("10-test.yaml") and issue.line >= 3


def test_server_file_errors(tmp_path: Path) -> None:
    issues = issues_of(
        tmp_path, GOOD_TEMPLATE, "listen: [localhost:53, '[::1]:99999']\nudp_payload: 100\nport: 5\n"
    )
    assert find(issues, "'localhost:53' is not an IP address").file.endswith("horizon.yaml")
    find(issues, "port must be a number")
    find(issues, "100 is out of range 512..4096")
    assert find(issues, "unknown key 'port'").line == 4


def test_missing_rules_folder_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "horizon.yaml"
    config.write_text("rules: nowhere\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "does not exist" in str(info.value)


def test_example_that_renders_an_invalid_record_is_an_error(tmp_path: Path) -> None:
    issues = issues_of(
        tmp_path,
        r"""
        zones:
          t.:
            stages:
              - template:
                  match: ['^(?P<x>[a-z]+)\.t\.$']
                  answer: ['{{ name }} 60 IN A {{ group.x }}']
                  example: hello.t
        """,
    )
    assert "for example hello.t.:" in find(issues, "is not a valid record").message


def test_sample_render_problems_are_warnings(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        r"""
        zones:
          t.:
            stages:
              - template:
                  match: ['^(?P<x>[a-z-]+)\.t\.$']
                  answer: ["{{ name }} 60 IN A {{ group.x | replace('-', '.') }}"]
        """,
    )
    assert [w.severity for w in config.warnings] == ["warning"]
    assert "example" in config.warnings[0].hint


def test_zones_merge_across_files_in_lexical_order(tmp_path: Path) -> None:
    template = """
    zones:
      t.:
        stages:
          - template:
              {{name: {name}, match: ['^{name}\\.t\\.$'], answer: ['{{{{ name }}}} 1 IN A 192.0.2.1']}}
    """
    config = config_from(
        tmp_path, {"20-b.yaml": template.format(name="b"), "10-a.yaml": template.format(name="a")}
    )
    assert [s.name for s in config.zones[0].stages] == ["template:a", "template:b"]


def test_duplicate_stage_names_are_an_error(tmp_path: Path) -> None:
    stage = "      - template: {name: x, answer: ['{{ name }} 1 IN A 192.0.2.1']}\n"
    issues = issues_of(tmp_path, "zones:\n  t.:\n    stages:\n" + stage + stage)
    find(issues, "two stages are named 'template:x'")


def test_parse_listen() -> None:
    assert str(parse_listen("127.0.0.1:5300")) == "127.0.0.1:5300"
    assert str(parse_listen("[::1]:5300")) == "[::1]:5300"
    assert parse_listen("::1").port == 53
    with pytest.raises(ValueError):
        parse_listen("[::1:53")


def test_embedded_default_loads_without_rules_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert [str(a) for a in config.listen] == ["127.0.0.1:5300", "[::1]:5300"]
    assert [(z.name, [s.name for s in z.stages]) for z in config.zones] == [
        (".", ["cache", "overlay:single-label", "forward:root"])
    ]


def test_shipped_rules_pass_check() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "horizon_dns", "check"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (
        "zone mydomain.tld.: cache, template:service-cname, template:hub-alias, overlay:mydomain.tld;"
        " on NXDOMAIN,REFUSED,SERVFAIL fall back to zone ." in result.stdout
    )
    assert "warning" not in result.stderr


def test_check_cli_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        GOOD_TEMPLATE.replace("100.64.0.1", "{{ grup.h }}").replace(
            "type: [A]", "type: [A]\n          colour: red"
        ),
    )
    result = subprocess.run(
        [sys.executable, "-m", "horizon_dns", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "2 problem(s)" in result.stderr
    assert (
        "10-test.yaml:7: zones.mydomain.tld.stages[0].template.colour: unknown key 'colour'" in result.stderr
    )
    assert "10-test.yaml:9:" in result.stderr and "'grup'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("example", ["zerotier", "tailscale"])
def test_example_rules_pass_check(tmp_path: Path, example: str) -> None:
    root = Path(__file__).resolve().parent.parent
    rules = (root / "rules" / "examples" / f"{example}.yaml").read_text()
    server = "zones:\n  .:\n    stages:\n      - forward: {upstreams: [127.0.0.1:9]}\n"
    config = config_from(tmp_path, rules, server)
    names = [stage.name for zone in config.zones for stage in zone.stages]
    assert f"overlay:{example}" in names
