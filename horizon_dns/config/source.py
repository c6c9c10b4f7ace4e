"""Strict YAML reading with file:line on every error.

Contract: ``parse_yaml(text, file, issues)`` returns the document's node tree
(PyYAML nodes keep their line) or None after recording the syntax error; a
:class:`Section` reads one mapping key by key, converting and checking types,
and ``Section.finish()`` reports every key nobody asked for -- so a typo is an
error with a "did you mean" hint, never a silently ignored setting. Problems are
appended to a shared list so ``check`` can report all of them at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from horizon_dns.errors import ConfigIssue

T = TypeVar("T")
_MISSING: Any = object()


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that only composes; constructing is done per scalar below."""


_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


def parse_yaml(text: str, file: str, issues: list[ConfigIssue]) -> Node | None:
    """Compose ``text`` into nodes; on a syntax error record it and return None.

    Merge keys (``<<: *defaults``) are resolved here, so readers never see them.
    """
    try:
        root: Node | None = yaml.compose(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = exc.problem or "invalid YAML"
        if problem.startswith("but found another document"):
            # PyYAML's "expected a single document" reads like a syntax slip; it is not.
            issues.append(
                ConfigIssue(
                    file,
                    line,
                    "",
                    "a second YAML document starts here: one file holds one document",
                    "remove the '---' line (and merge the documents), or move the rest to its own file",
                )
            )
        else:
            issues.append(
                ConfigIssue(file, line, "", f"YAML syntax error: {problem}", "check indentation and quoting")
            )
        return None
    except yaml.YAMLError as exc:
        issues.append(ConfigIssue(file, 0, "", f"YAML error: {exc}"))
        return None
    except RecursionError:
        issues.append(ConfigIssue(file, 0, "", "YAML nested too deeply", "flatten the document"))
        return None
    if root is not None:
        _resolve(root, Where(file, issues), set())
    return root


def _resolve(node: Node, where: Where, seen: set[int]) -> None:
    """Resolve merge keys in place and make sure every scalar can be read.

    Anchored nodes are shared between their aliases, so each node is visited once
    (``seen``), which also ends alias cycles such as ``&a {<<: *a}``.
    """
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        _merge(node, where, seen)
        for key, value in node.value:
            _resolve(key, where, seen)
            _resolve(value, where, seen)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _resolve(item, where, seen)
    elif isinstance(node, ScalarNode):
        try:
            scalar_value(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else str(exc)
            where.error(node, f"cannot read {node.value!r} ({node.tag}): {problem}", "quote it as a string")
            node.tag = _STR_TAG  # read on as the text it is, so one bad value is one error


def _merge(node: MappingNode, where: Where, seen: set[int]) -> None:
    """Replace ``<<`` keys by the pairs of the mappings they name (YAML merge key).

    As the YAML 1.1 merge type says: keys of the mapping itself win, and of
    several merged mappings the earlier wins. The merged pairs come first, as
    PyYAML puts them, and keep their own lines, so an error in one points at
    where it is written.
    """
    if not any(key.tag == _MERGE_TAG for key, _value in node.value):
        return
    own = [(key, value) for key, value in node.value if key.tag != _MERGE_TAG]
    taken = {key.value for key, _value in own if isinstance(key, ScalarNode)}
    merged: list[tuple[Node, Node]] = []
    for key, value in node.value:
        if key.tag != _MERGE_TAG:
            continue
        sources = value.value if isinstance(value, SequenceNode) else [value]
        for source in sources:
            if not isinstance(source, MappingNode):
                where.error(
                    source,
                    f"the merge key '<<' takes a mapping or a list of mappings, found {_kind(source)}",
                    "write '<<: *name' where '&name' marks a mapping",
                )
                continue
            _resolve(source, where, seen)  # its own merge keys first
            for pair in source.value:
                pair_key = pair[0]
                if pair_key.tag == _MERGE_TAG:
                    continue  # only left in a mapping that merges itself
                if isinstance(pair_key, ScalarNode):
                    if pair_key.value in taken:
                        continue
                    taken.add(pair_key.value)
                merged.append(pair)
    node.value = merged + own


def scalar_value(node: ScalarNode) -> Any:
    """The Python value of a scalar node under YAML 1.1 safe rules."""
    return yaml.SafeLoader("").construct_object(node, deep=True)


def line_of(node: Node) -> int:
    return node.start_mark.line + 1


def item_node(node: Node | None, index: int) -> Node | None:
    """The ``index``-th item of a sequence node (for its line), else the node itself."""
    if isinstance(node, SequenceNode) and 0 <= index < len(node.value):
        item: Node = node.value[index]
        return item
    return node


class Where:
    """A place in the configuration: file, dotted key path, shared issue list."""

    def __init__(self, file: str, issues: list[ConfigIssue], path: str = "") -> None:
        self.file = file
        self.issues = issues
        self.path = path

    def child(self, key: str | int) -> Where:
        if isinstance(key, int):
            return Where(self.file, self.issues, f"{self.path}[{key}]")
        return Where(self.file, self.issues, f"{self.path}.{key}" if self.path else key)

    def error(self, node: Node | None, message: str, hint: str = "") -> None:
        line = line_of(node) if node is not None else 0
        self.issues.append(ConfigIssue(self.file, line, self.path, message, hint))

    def warn(self, node: Node | None, message: str, hint: str = "") -> None:
        line = line_of(node) if node is not None else 0
        self.issues.append(ConfigIssue(self.file, line, self.path, message, hint, "warning"))

    def error_count(self) -> int:
        return sum(1 for issue in self.issues if issue.severity == "error")


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = scalar_value(node) if isinstance(node, ScalarNode) else None
    if value is None:
        return "empty"
    return f"{type(value).__name__} {value!r}"


class Section:
    """Reads the keys of one YAML mapping; unknown and duplicate keys are errors."""

    def __init__(self, node: Node | None, where: Where, hint: str = "") -> None:
        self.where = where
        self.node = node
        self.items: dict[str, tuple[Node, Node]] = {}
        self.used: set[str] = set()
        self.valid = True
        if node is None or (isinstance(node, ScalarNode) and scalar_value(node) is None):
            return  # an empty section: every key takes its default
        if not isinstance(node, MappingNode):
            where.error(node, f"expected a mapping of keys, found {_kind(node)}", hint)
            self.valid = False
            return
        for key_node, value_node in node.value:
            key = scalar_value(key_node) if isinstance(key_node, ScalarNode) else None
            if isinstance(key, bool) and isinstance(key_node, ScalarNode):
                where.error(
                    key_node,
                    f"key {key_node.value!r} reads as {str(key).lower()} in YAML",
                    "YAML 1.1 turns on/off/yes/no into booleans: quote the key",
                )
                continue
            if not isinstance(key, str | int | float):
                where.error(key_node, "keys must be plain names")
                continue
            key = str(key)
            if key in self.items:
                where.child(key).error(
                    key_node,
                    f"key {key!r} appears twice (first on line {line_of(self.items[key][0])})",
                    "YAML keeps only the last one; delete one of them",
                )
                continue
            self.items[key] = (key_node, value_node)

    def names(self) -> list[str]:
        return list(self.items)

    def has(self, key: str) -> bool:
        return key in self.items

    def node_of(self, key: str) -> Node | None:
        item = self.items.get(key)
        return item[1] if item else None

    def line(self, key: str | None = None) -> int:
        if key is not None and key in self.items:
            return line_of(self.items[key][0])
        return line_of(self.node) if self.node is not None else 0

    def raw(self, key: str) -> Node | None:
        """The node of ``key`` (marked as used), None when absent."""
        self.used.add(key)
        item = self.items.get(key)
        return item[1] if item else None

    def section(self, key: str, hint: str = "") -> Section:
        """The mapping at ``key``; ``hint`` says what to write when it is not one."""
        return Section(self.raw(key), self.where.child(key), hint)

    @overload
    def get(self, key: str, convert: Callable[[Any], T], *, what: str = "", hint: str = "") -> T | None: ...

    @overload
    def get(self, key: str, convert: Callable[[Any], T], default: T, what: str = "", hint: str = "") -> T: ...

    def get(
        self,
        key: str,
        convert: Callable[[Any], T],
        default: T = _MISSING,
        what: str = "",
        hint: str = "",
    ) -> T | None:
        """Convert the scalar at ``key``; on a bad or missing value record an issue.

        Then the result is ``default``, or None for a required key (no default):
        the sentinel must never leak to a caller that would use it as a value.
        """
        node = self.raw(key)
        where = self.where.child(key)
        fallback = None if default is _MISSING else default
        if node is None:
            if default is _MISSING:
                where.error(self.node, f"required key {key!r} is missing", hint)
            return fallback
        if not isinstance(node, ScalarNode):
            where.error(node, f"expected {what or 'a single value'}, found {_kind(node)}", hint)
            return fallback
        try:
            return convert(scalar_value(node))
        except (TypeError, ValueError) as exc:
            where.error(node, f"{exc}", hint)
            return fallback

    def string_list(self, key: str, default: list[str] | None = None, hint: str = "") -> list[str]:
        """A list of strings; a single string is a list of one."""
        node = self.raw(key)
        where = self.where.child(key)
        if node is None:
            if default is None:
                where.error(self.node, f"required key {key!r} is missing", hint)
                return []
            return list(default)
        if isinstance(node, ScalarNode):
            value = scalar_value(node)
            if isinstance(value, str):
                return [value]
            where.error(node, f"expected a string or a list of strings, found {_kind(node)}", hint)
            return []
        if not isinstance(node, SequenceNode):
            where.error(node, f"expected a list of strings, found {_kind(node)}", hint)
            return []
        out: list[str] = []
        for i, item in enumerate(node.value):
            value = scalar_value(item) if isinstance(item, ScalarNode) else None
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out.append(str(value))
            else:
                where.child(i).error(item, f"expected a string, found {_kind(item)}", hint)
        return out

    def sequence(self, key: str) -> list[tuple[Node, Where]]:
        """The items of a list at ``key`` with their locations; absent means empty."""
        node = self.raw(key)
        where = self.where.child(key)
        if node is None:
            return []
        if not isinstance(node, SequenceNode):
            where.error(node, f"expected a list, found {_kind(node)}")
            return []
        return [(item, where.child(i)) for i, item in enumerate(node.value)]

    def finish(self) -> None:
        """Report every key that no reader asked for."""
        known = sorted(self.used)
        for key, (key_node, _value) in self.items.items():
            if key in self.used:
                continue
            self.where.child(key).error(key_node, f"unknown key {key!r}", did_you_mean(key, known))


def did_you_mean(word: str, known: Iterable[str], listing: str = "known keys") -> str:
    """A hint for an unknown name: the closest known one, else the whole list."""
    names = list(known)
    close = difflib.get_close_matches(word, names, n=1)
    return f"did you mean {close[0]!r}?" if close else f"{listing}: {', '.join(names)}"


# Converters for Section.get -------------------------------------------------


def as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, found {value!r}")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, found {value!r}")


def int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, found {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range {low}..{high}")
        return value

    return convert


def number_range(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, found {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range {low}..{high}")
        return float(value)

    return convert
