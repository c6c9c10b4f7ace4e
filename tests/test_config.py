"""Strict configuration: every problem reported at once, each with file:line and a hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import config_from, write_config

from horizon_dns.config.load import load_config
from horizon_dns.config.schema import parse_listen
from horizon_dns.errors import ConfigError, ConfigIssue
from horizon_dns.stages.cache import CacheStage

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


# Review findings: every one reported with file:line and a hint, never a traceback.

TEMPLATE_ZONE = r"""
zones:
  t.:
    stages:
      - template: {answer: ['{{ name }} 1 IN A 192.0.2.1']}
"""


def located(issue: ConfigIssue, file: str, line: int) -> str:
    """``str(issue)`` after checking that it names ``file:line``, as ``check`` prints it."""
    text = str(issue)
    assert f"{file}:{line}:" in text, text
    return text


@pytest.mark.parametrize(
    ("listen", "message", "hint"),
    [
        ('[{adress: "127.0.0.1:5491"}]', "required key 'address' is missing", "address: 100.64.0.1:53"),
        ("[{allow: [10.0.0.0/8]}]", "required key 'address' is missing", "address: 100.64.0.1:53"),
        ("[{address: null}]", "expected a string, found None", "address: 100.64.0.1:53"),
        ("{a: 1}", "required key 'address' is missing", "address: 100.64.0.1:53"),
    ],
)
def test_bad_listen_entries_are_errors_not_tracebacks(
    tmp_path: Path, listen: str, message: str, hint: str
) -> None:
    issues = issues_of(tmp_path, TEMPLATE_ZONE, f"listen: {listen}\n")
    issue = find(issues, message)
    assert "hint: " + hint in located(issue, "horizon.yaml", 2)


def test_misspelt_listen_key_gets_did_you_mean(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, TEMPLATE_ZONE, 'listen: [{adress: "127.0.0.1:5491"}]\n')
    assert "did you mean 'address'?" in located(find(issues, "unknown key 'adress'"), "horizon.yaml", 2)


def test_fallback_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    rules = TEMPLATE_ZONE + "    fallback: '.'\n"
    issue = find(issues_of(tmp_path, rules), "expected a mapping of keys, found str '.'")
    assert "hint: write fallback: {zone: '.'}" in located(issue, "rules/10-test.yaml", 6)


@pytest.mark.parametrize("soa", ["", "    soa: false\n"])
def test_non_ascii_zone_name_asks_for_the_idna_form(tmp_path: Path, soa: str) -> None:
    rules = TEMPLATE_ZONE.replace("  t.:\n", "  bücher.test:\n" + soa)
    issue = find(issues_of(tmp_path, rules), "zone 'bücher.test' is not a domain name: it is not ASCII")
    assert "write the IDNA form xn--bcher-kva.test" in located(issue, "rules/10-test.yaml", 3)


@pytest.mark.parametrize(
    ("zone", "message", "hint"),
    [
        ("a test", "it contains ' '", "labels of letters, digits"),
        ("a..b", "it has an empty label", "remove the doubled"),
        ("a" * 64 + ".tld", "is 64 octets long", "at most 63 octets"),
        (".".join(["a" * 60] * 5), "longer than 255 octets", "at most 255 octets"),
    ],
)
def test_zone_names_must_be_domain_names(tmp_path: Path, zone: str, message: str, hint: str) -> None:
    rules = TEMPLATE_ZONE.replace("  t.:\n", f"  {zone}:\n")
    issue = find(issues_of(tmp_path, rules), message)
    assert f"zone {zone!r} is not a domain name" in issue.message
    assert "hint: " in located(issue, "rules/10-test.yaml", 3) and hint in issue.hint


def test_service_and_classless_reverse_zone_names_load(tmp_path: Path) -> None:
    rules = TEMPLATE_ZONE.replace("  t.:\n", "  _tcp.Example.tld:\n") + TEMPLATE_ZONE.replace(
        "zones:\n  t.:\n", "  0/25.2.0.192.in-addr.arpa:\n"
    )
    config = config_from(tmp_path, rules)
    assert [z.name for z in config.zones] == ["_tcp.example.tld.", "0/25.2.0.192.in-addr.arpa."]


def test_yaml_merge_keys_work_and_own_keys_win(tmp_path: Path) -> None:
    rules = """
    zones:
      a.test:
        stages:
          - cache: &small {max_entries: 5, max_ttl: 60}
      b.test:
        stages:
          - cache: {<<: *small, max_ttl: 120}
      c.test:
        stages:
          - cache: {<<: [{max_entries: 7}, *small]}
    """
    config = config_from(tmp_path, rules)
    caches = [zone.stages[0] for zone in config.zones]
    assert all(isinstance(cache, CacheStage) for cache in caches)
    assert [(c.max_entries, c.max_ttl) for c in caches if isinstance(c, CacheStage)] == [
        (5, 60),
        (5, 120),
        (7, 60),
    ]


def test_merged_keys_are_checked_where_they_are_written(tmp_path: Path) -> None:
    rules = """
    zones:
      a.test:
        stages:
          - cache: &bad {max_entires: 5}
      b.test:
        stages:
          - cache: {<<: [*bad, 1]}
    """
    issues = issues_of(tmp_path, rules)
    issue = find(issues, "the merge key '<<' takes a mapping or a list of mappings, found int 1")
    assert "hint: write '<<: *name'" in located(issue, "rules/10-test.yaml", 8)
    typos = [i for i in issues if i.message == "unknown key 'max_entires'"]
    assert [i.line for i in typos] == [5, 5] and typos[0].hint == "did you mean 'max_entries'?"


def test_unknown_yaml_tag_is_an_error(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE, "nsid: !host name\n"), "cannot read 'name' (!host)")
    assert "hint: quote it as a string" in located(issue, "horizon.yaml", 2)


def test_second_yaml_document_is_an_error(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE + "---\naliases: {}\n"), "one file holds one document")
    assert "hint: remove the '---' line" in located(issue, "rules/10-test.yaml", 6)


def test_unreadable_rules_folder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run as root, where chmod 000 does not stop reading: fail the listing instead.
    config = write_config(tmp_path, TEMPLATE_ZONE)
    rules_dir = str(tmp_path / "rules")
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path) == rules_dir:
            raise PermissionError(13, "Permission denied", rules_dir)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    issue = find(info.value.issues, f"cannot read rules folder {rules_dir}: Permission denied")
    assert "hint: let the server's user read" in located(issue, "horizon.yaml", 1)


def test_rules_path_that_is_a_file_says_so(tmp_path: Path) -> None:
    config = tmp_path / "horizon.yaml"
    config.write_text("rules: horizon.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    issue = find(info.value.issues, f"rules folder {config} is a file, not a folder")
    assert "hint: point 'rules:' at the folder" in located(issue, "horizon.yaml", 1)


@pytest.mark.parametrize("listen", ["listen: []\n", "listen:\n"])
def test_empty_listen_is_an_error(tmp_path: Path, listen: str) -> None:
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE, listen), "no listen address")
    assert "127.0.0.1:5300 and [::1]:5300" in located(issue, "horizon.yaml", 2)


def test_same_listen_address_twice_is_an_error_naming_both(tmp_path: Path) -> None:
    server = """
    listen:
      - 127.0.0.1:5494
      - {address: "127.0.0.1:5494"}
      - "[::1]:5494"
      - "[0::1]:5494"
      - 127.0.0.1:0
      - 127.0.0.1:0
    """
    issues = issues_of(tmp_path, TEMPLATE_ZONE, server)
    twice = [i for i in issues if "listed twice" in i.message]
    assert [i.message for i in twice] == [
        "127.0.0.1:5494 is listed twice: listen[0] (line 4) and listen[1]",
        "[0::1]:5494 is listed twice: listen[2] (line 6) and listen[3]",
    ]
    assert "hint: the second bind would fail" in located(twice[0], "horizon.yaml", 5)
    assert twice[1].line == 7


def test_loopback_listen_map_needs_no_allow(tmp_path: Path) -> None:
    config = config_from(tmp_path, TEMPLATE_ZONE, 'listen: [{address: "127.0.0.1:5491"}, {address: "::1"}]\n')
    assert [(str(a), a.allow) for a in config.listen] == [
        ("127.0.0.1:5491", ("127.0.0.0/8", "::1/128")),
        ("[::1]:53", ("127.0.0.0/8", "::1/128")),
    ]


def test_non_loopback_listen_map_still_needs_allow(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, TEMPLATE_ZONE, 'listen: [{address: "100.64.0.1:53"}]\n')
    issue = find(issues, "100.64.0.1:53 is not a loopback address")
    assert "hint: add allow: [...] with 100.64.0.0/10" in located(issue, "horizon.yaml", 2)


def test_nsid_is_capped_at_128_octets(tmp_path: Path) -> None:
    assert config_from(tmp_path, TEMPLATE_ZONE, f"nsid: {'n' * 128}\n").nsid == "n" * 128
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE, f"nsid: {'ü' * 65}\n"), "nsid is 130 octets long")
    assert "the limit is 128" in issue.message and "hint: a short name" in located(issue, "horizon.yaml", 2)


def test_ipv6_listen_without_brackets_hints_at_brackets(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE, 'listen: ["::1:5491"]\n'), "is not a loopback address")
    assert "if you meant port 5491 on ::1, write [::1]:5491" in located(issue, "horizon.yaml", 2)


def test_metrics_yes_hints_at_false_or_a_mapping(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE, "metrics: yes\n"), "expected a mapping of keys")
    assert "hint: write metrics: false to turn it off, or a mapping" in located(issue, "horizon.yaml", 2)


def test_unknown_stage_kind_gets_did_you_mean(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, TEMPLATE_ZONE.replace("template:", "templat:")), "unknown stage kind")
    assert "hint: did you mean 'template'?" in located(issue, "rules/10-test.yaml", 5)


def test_server_key_in_rules_file_says_where_it_belongs(tmp_path: Path) -> None:
    issues = issues_of(tmp_path, TEMPLATE_ZONE + "listen: [127.0.0.1:53]\nnsdi: x\n")
    issue = find(issues, "'listen' is a server setting: it belongs in the server file")
    assert f"move it to {tmp_path / 'horizon.yaml'}" in located(issue, "rules/10-test.yaml", 6)
    assert find(issues, "unknown key 'nsdi'").hint == "known keys: aliases, zones"


def test_duplicate_stage_names_across_files_point_at_the_second(tmp_path: Path) -> None:
    stage = (
        "zones:\n  t.:\n    stages:\n      - template: {name: x, answer: ['{{ name }} 1 IN A 192.0.2.1']}\n"
    )
    issues = issues_of(tmp_path, {"10-a.yaml": stage, "20-b.yaml": "\n" + stage})
    issue = find(issues, "two stages are named 'template:x'")
    text = located(issue, "rules/20-b.yaml", 5)
    assert "rules/10-a.yaml:4 (zones.t..stages[0])" in text and "hint: give each stage a distinct" in text


def test_check_cli_reports_former_tracebacks_as_problems(tmp_path: Path) -> None:
    rules = TEMPLATE_ZONE + "    fallback: '.'\n  bücher.test:\n    stages: [cache: {}]\n"
    config = write_config(tmp_path, rules, 'listen: [{adress: "127.0.0.1:5491"}]\n')
    result = subprocess.run(
        [sys.executable, "-m", "horizon_dns", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "horizon.yaml:2: listen[0].address: required key 'address' is missing" in result.stderr
    assert "10-test.yaml:6: zones.t..fallback: expected a mapping of keys" in result.stderr
    assert "10-test.yaml:7: zones.bücher.test: zone 'bücher.test' is not a domain name" in result.stderr


def test_a_yml_file_in_the_rules_folder_is_named_not_skipped_silently(tmp_path: Path) -> None:
    config = write_config(tmp_path, TEMPLATE_ZONE)
    (tmp_path / "rules" / "20-extra.yml").write_text("zones: {}\n")
    loaded = load_config(config)
    warning = next(w for w in loaded.warnings if "20-extra.yml is not read" in w.message)
    assert warning.severity == "warning" and "rename it to 20-extra.yaml" in warning.hint
