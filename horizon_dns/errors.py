"""The one exception hierarchy of horizon-dns."""

from __future__ import annotations

from dataclasses import dataclass


class Error(Exception):
    """Base class of every error horizon-dns raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in the configuration, located to file, line and key."""

    file: str
    line: int  # 1-based; 0 when the whole file is meant
    key: str  # dotted path to the offending key, "" for the document
    message: str
    hint: str = ""
    severity: str = "error"  # or "warning": reported by check, does not stop start-up

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        label = "" if self.severity == "error" else f" {self.severity}:"
        text = f"{where}:{label}{key} {self.message}"
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class ConfigError(Error):
    """The configuration cannot be used; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        issues = [issue for issue in issues if issue.severity == "error"] or issues
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class LocalLimit(Error):
    """A limit of this node refused the work (lookup cap, multicast rate, in-flight cap).

    Final by design: the answer becomes SERVFAIL with an Extended DNS Error and never
    triggers a zone's ``fallback``, so an inside name cannot get the public answer
    because this node was busy.
    """
