"""Regexes over query names, with a bound on the time one match may take.

Contract: :func:`compile_pattern` compiles a rule's regex (``re`` syntax; raises
:class:`PatternError` with the reason); :func:`search` runs it over a query name and
returns the match or None, raising :class:`PatternTimeout` once matching has taken
:data:`MATCH_TIMEOUT` seconds; :func:`runaway_on` tries a regex on names that make
backtracking regexes explode, so ``check`` can reject one before a query finds it.

Why a bound: Python's ``re`` backtracks, and a rule such as ``^(a|aa)+$`` needs
minutes for a 40-letter query name -- every query of the server waits that long,
since matching holds the event loop. Two engines, chosen per regex when it is
compiled:

* a regex that cannot backtrack badly by its shape -- no repetition inside a
  repetition, no alternation inside one, no lookaround or backreference, at most
  two long repetitions when anchored with ``^`` and one when not (then a 255-octet
  name costs at most ~65,000 steps, about a millisecond) -- runs on ``re``: the
  rules people write (``^(?P<h>[^.]+)\\.mydomain\\.tld\\.$``) and ``.*``; it needs
  no timer;
* any other runs on the ``regex`` package (same syntax and match objects) with a
  timeout. Its bookkeeping costs 3-10 µs a search and importing it 1.5 MiB, so it
  is loaded only when a rule needs it.
"""

from __future__ import annotations

import re
from re import _parser  # type: ignore[attr-defined]  # the parser re itself uses
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import regex

    Pattern: TypeAlias = re.Pattern[str] | regex.Pattern[str]
    Match: TypeAlias = re.Match[str] | regex.Match[str]
else:
    Pattern = Match = Any

#: Seconds one search may take on the ``regex`` engine. Ordinary rules need microseconds.
MATCH_TIMEOUT = 0.01

# A repetition allowed more than this many times counts as long: three long ones in a
# row make a name of n octets cost up to n**3 steps.
_LONG = 16


class PatternError(ValueError):
    """A regex that does not compile; the message says why."""


class PatternTimeout(Exception):
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
    """Whether ``source`` cannot backtrack badly, judged from its parse tree alone."""
    try:
        tree = _parser.parse(source)
    except Exception:  # a private parser may change: then trust only the timeout
        return False
    long_repeats = [0]
    # search() tries every start: unanchored, each long repetition multiplies by n once more.
    anchored = len(tree) > 0 and tree[0] == (_parser.AT, _parser.AT_BEGINNING)
    return _shape_ok(tree, False, long_repeats) and long_repeats[0] <= (2 if anchored else 1)


_REPEATS = {_parser.MAX_REPEAT, _parser.MIN_REPEAT, getattr(_parser, "POSSESSIVE_REPEAT", None)}


def _shape_ok(tree: Any, inside_repeat: bool, long_repeats: list[int]) -> bool:
    for op, av in tree:
        if op in _REPEATS:
            _low, high, body = av
            repeats = high == _parser.MAXREPEAT or high > 1
            if repeats and inside_repeat:
                return False  # (a+)+: every split of a run is tried
            if high == _parser.MAXREPEAT or high > _LONG:
                long_repeats[0] += 1
            if not _shape_ok(body, inside_repeat or repeats, long_repeats):
                return False
        elif op is _parser.SUBPATTERN:
            if not _shape_ok(av[-1], inside_repeat, long_repeats):
                return False
        elif op is _parser.BRANCH:
            if inside_repeat:
                return False  # (a|aa)+: overlapping branches, again every split
            if not all(_shape_ok(branch, inside_repeat, long_repeats) for branch in av[1]):
                return False
        elif op in (_parser.GROUPREF, _parser.GROUPREF_EXISTS, _parser.ASSERT, _parser.ASSERT_NOT):
            return False  # backreferences and lookarounds: leave them to the timeout
    return True


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
    """A probe name on which ``pattern`` exceeds the time bound, or None if it has none."""
    if isinstance(pattern, re.Pattern):
        return None  # bounded by its shape
    for probe in _PROBES:
        try:
            search(pattern, probe)
        except PatternTimeout:
            return probe
    return None
