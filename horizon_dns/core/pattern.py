"""Regexes over query names, with a bound on the time one match may take.

Contract: :func:`compile_pattern` compiles a rule's regex (``re`` syntax; raises
:class:`PatternError` with the reason); :func:`search` runs it over a query name and
returns the match or None, raising :class:`PatternTimeout` once matching has taken
:data:`MATCH_TIMEOUT` seconds; :func:`runaway_on` tries a regex on names that make
backtracking regexes explode, so ``check`` can reject one before a query finds it.

Why a bound: Python's ``re`` backtracks, and a rule such as ``^(a+)+$`` needs minutes
for a 30-letter query name -- every query of the server waits that long, since
matching holds the event loop. The ``regex`` package (re-compatible syntax and match
objects) takes a timeout; a name is at most 255 octets, so an honest rule matches in
microseconds and the bound only ever stops a pathological one.
"""

from __future__ import annotations

import regex

Pattern = regex.Pattern
Match = regex.Match

#: Seconds one search may take. Ordinary rules need a few microseconds.
MATCH_TIMEOUT = 0.01


class PatternError(ValueError):
    """A regex that does not compile; the message says why."""


class PatternTimeout(Exception):
    """A search that took longer than :data:`MATCH_TIMEOUT` (catastrophic backtracking)."""


def compile_pattern(source: str) -> Pattern[str]:
    """Compile a rule's regex (``re`` syntax, named groups ``(?P<name>...)``)."""
    try:
        return regex.compile(source)
    except regex.error as exc:
        raise PatternError(str(exc)) from None


def search(pattern: Pattern[str], name: str) -> Match[str] | None:
    """``pattern.search(name)`` within :data:`MATCH_TIMEOUT` seconds."""
    try:
        return pattern.search(name, timeout=MATCH_TIMEOUT)
    except TimeoutError:
        raise PatternTimeout(f"regex {pattern.pattern!r} took over {MATCH_TIMEOUT * 1000:.0f} ms") from None


# Long runs of one kind of character, each spoiled at the end: a regex with nested or
# overlapping repetition tries every way to split the run before it gives up.
_RUNS = ("a", "0", "-", "a.", "a-", "ab.", "a0-")
_PROBES = (*(run * (60 // len(run)) + "!" for run in _RUNS), ("a" * 60 + ".") * 3 + "!")


RUNAWAY_HINT = "avoid a repeated group whose body can match the same text in several ways, such as (a|aa)+"


def runaway_on(pattern: Pattern[str]) -> str | None:
    """A probe name on which ``pattern`` exceeds the time bound, or None if it has none."""
    for probe in _PROBES:
        try:
            search(pattern, probe)
        except PatternTimeout:
            return probe
    return None
