"""Regexes over query names, with a bound on the time one match may take.

Contract: :func:`compile_pattern` compiles a rule's regex (``re`` syntax; raises
:class:`PatternError` with the reason); :func:`search` runs it over a query name and
returns the match or None, raising :class:`PatternTimeout` once matching has taken
:data:`MATCH_TIMEOUT` seconds; :func:`runaway_on` tries a regex on names that make
backtracking regexes explode and says what it found, so ``check`` can reject one
before a query finds it.

Why a bound: Python's ``re`` backtracks, and a rule such as ``^(a|aa)+$`` needs
minutes for a 40-letter query name -- every query of the server waits that long,
since matching holds the event loop. Two engines, chosen per regex when it is
compiled:

* a regex that cannot backtrack badly by its shape (:func:`bounded_by_shape`:
  at most ~65,000 ways to split a name, about a millisecond) runs on ``re``: the
  rules people write (``^(?P<h>[^.]+)\\.mydomain\\.tld\\.$``) and ``.*``; it needs
  no timer;
* any other runs on the ``regex`` package (same syntax and match objects) with a
  timeout. Its bookkeeping costs 3-10 µs a search and importing it 1.5 MiB, so it
  is loaded only when a rule needs it.
"""

from __future__ import annotations

import re

# No public module parses a regex into its tree: re._parser (sre_parse before 3.11,
# where the deprecated public alias still exists) is the one re itself uses. Its
# shape is pinned by tests/test_template.py (test_private_regex_parser_shape); if a
# Python release changes it, bounded_by_shape() returns False and every rule falls
# back to the regex engine's timeout -- slower, never unbounded.
from re import _parser  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, TypeAlias

from horizon_dns.errors import Error

if TYPE_CHECKING:
    import regex

    Pattern: TypeAlias = re.Pattern[str] | regex.Pattern[str]
    Match: TypeAlias = re.Match[str] | regex.Match[str]
else:
    Pattern = Match = Any

#: Seconds one search may take on the ``regex`` engine. Ordinary rules need microseconds.
MATCH_TIMEOUT = 0.01


class PatternError(Error, ValueError):
    """A regex that does not compile; the message says why."""


class PatternTimeout(Error):
    """A search that took longer than :data:`MATCH_TIMEOUT` (catastrophic backtracking)."""


def compile_pattern(source: str) -> Pattern:
    """Compile a rule's regex (``re`` syntax, named groups ``(?P<name>...)``)."""
    try:
        compiled = re.compile(source)
    except re.error as exc:
        raise PatternError(str(exc)) from None
    if bounded_by_shape(source):
        return compiled
    import regex

    try:
        return regex.compile(source)
    except regex.error as exc:
        raise PatternError(str(exc)) from None


def bounded_by_shape(source: str) -> bool:
    """Whether ``source`` cannot backtrack badly, judged from its parse tree alone.

    Counts the ways the regex can split a name between its parts -- a repetition
    offers one per length it may take (up to a name's length), an alternation one per
    branch, ``?`` two -- times every start position when not anchored with ``^``.
    Backtracking tries at most that many; up to 65,536 is about a millisecond. A
    repetition of anything that itself has choices ((a+)+, (a|aa)+), a lookaround or
    a backreference counts as too many.
    """
    try:
        tree = _parser.parse(source)
    except Exception:  # a private parser may change: then trust only the timeout
        return False
    anchored = len(tree) > 0 and tree[0] == (_parser.AT, _parser.AT_BEGINNING)
    return _ways(tree) * (1 if anchored else _NAME_TEXT) <= _WAYS_MAX


_NAME_TEXT = 255  # a query name's text: 255 characters at most (more only with escapes)
_WAYS_MAX = 2**16
_TOO_MANY = _WAYS_MAX + 1
_REPEATS = {_parser.MAX_REPEAT, _parser.MIN_REPEAT, getattr(_parser, "POSSESSIVE_REPEAT", None)}
_ATOMIC = getattr(_parser, "ATOMIC_GROUP", None)
_ONE_WAY = {_parser.LITERAL, _parser.NOT_LITERAL, _parser.ANY, _parser.IN, _parser.AT}


def _ways(tree: Any) -> int:
    """An upper bound of the ways ``tree`` can match, capped at _TOO_MANY."""
    total = 1
    for op, av in tree:
        if op in _ONE_WAY:
            continue
        if op in _REPEATS:
            low, high, body = av
            inner = _ways(body)
            if high <= 1:  # x? or x{1}: skip it or take one of its ways
                total *= inner if low else 1 + inner
            elif inner > 1:
                return _TOO_MANY  # a repeated part with choices: every split is tried
            else:
                total *= min(high, _NAME_TEXT) - min(low, _NAME_TEXT) + 1
        elif op is _parser.SUBPATTERN:
            total *= _ways(av[-1])
        elif op is _ATOMIC:
            total *= _ways(av)
        elif op is _parser.BRANCH:
            total *= sum(_ways(branch) for branch in av[1])
        else:  # backreferences, lookarounds, conditionals: leave them to the timeout
            return _TOO_MANY
        if total > _WAYS_MAX:
            return _TOO_MANY
    return total


def search(pattern: Pattern, name: str) -> Match | None:
    """``pattern.search(name)``, on the ``regex`` engine within :data:`MATCH_TIMEOUT` seconds."""
    if isinstance(pattern, re.Pattern):
        return pattern.search(name)
    try:
        return pattern.search(name, timeout=MATCH_TIMEOUT)
    except TimeoutError:
        raise PatternTimeout(f"regex {pattern.pattern!r} took over {MATCH_TIMEOUT * 1000:.0f} ms") from None


# Long runs of one kind of character, each spoiled at the end: a regex with nested or
# overlapping repetition tries every way to split the run before it gives up.
_RUNS = ("a", "0", "-", "a.", "a-", "ab.", "a0-")
_PROBES = (*(run * (60 // len(run)) + "!" for run in _RUNS), ("a" * 60 + ".") * 3 + "!")

RUNAWAY_HINT = "avoid a repeated group whose body can match the same text in several ways, such as (a|aa)+"


def runaway_on(pattern: Pattern) -> str | None:
    """What ``check`` says of a regex that exceeds the time bound on a probe name
    ("backtracks catastrophically: ..."), or None if it has none."""
    if isinstance(pattern, re.Pattern):
        return None  # bounded by its shape
    for probe in _PROBES:
        try:
            search(pattern, probe)
        except PatternTimeout:
            return f"backtracks catastrophically: over {MATCH_TIMEOUT * 1000:.0f} ms on the name {probe!r}"
    return None
