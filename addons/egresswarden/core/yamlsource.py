"""YAML rule files -> plain Python values, remembering the line of every value.

PyYAML's `safe_load` forgets where things came from and silently keeps the last of two
duplicate keys. Security teams need "rules/github.yaml:14: unknown key 'method'", and a
duplicated key is almost always a mistake that would silently drop a rule, so this module
composes the node tree itself: duplicate keys are errors, non-string keys are errors, and
`LineMap` maps each value's path (("policies", "github", "allow", 0, "host")) to its line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from .errors import RuleError

MAX_NODES = 2_000_000  # bounds alias expansion ("billion laughs")
MAX_DEPTH = 64  # rule files are shallow; deeper means a recursive alias or garbage
MAX_FILE_BYTES = 64 * 1024 * 1024

PathKey = tuple[str | int, ...]

_STR_TAG = "tag:yaml.org,2002:str"


# getattr: PyYAML built without libyaml has no CSafeLoader; mypy cannot type a base chosen at
# run time, hence the ignore (the class body is still checked).
class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser (~10x faster than PyYAML's pure-Python one, same nodes and line
    marks) with a shortcut in implicit tag resolution: a plain scalar whose first character
    starts none of YAML's implicit types (bool, int, float, null, timestamp...) is a string.
    Rule files are mostly such scalars (keys, host names), and resolve() runs for each."""

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode and implicit[0] and value and value[0] not in self.yaml_implicit_resolvers:
            return _STR_TAG
        tag: str = super().resolve(kind, value, implicit)
        return tag


@dataclass
class LineMap:
    """Line numbers (1-based) of values, by their path inside one document."""

    file: str
    lines: dict[PathKey, int] = field(default_factory=dict)
    # Problems that do not stop parsing (duplicate keys): reported with the file's other
    # errors instead of hiding them.
    problems: list[RuleError] = field(default_factory=list)

    def line_of(self, path: Sequence[str | int]) -> int:
        """The line of the deepest known value on `path` (0 if none is known)."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), 0)

    def error(self, path: Sequence[str | int], message: str, hint: str = "") -> RuleError:
        return RuleError(self.file, self.line_of(path), message, hint)


class _Builder:
    """Builds plain values straight from parser events: no node tree is kept in memory
    (for 100,000 rules the node tree alone was ~100 MB)."""

    def __init__(self, loader: _Loader, lines: LineMap) -> None:
        self.loader = loader
        self.lines = lines
        self.count = 0
        self.anchors: dict[str, tuple[Any, int]] = {}  # anchor -> (value, values inside it)
        self.scalars = yaml.SafeLoader("")

    def _spend(self, n: int, line: int) -> None:
        self.count += n
        if self.count > MAX_NODES:
            raise RuleError(self.lines.file, line, f"document expands to more than {MAX_NODES} values (alias bomb?)")

    def _scalar(self, event: yaml.ScalarEvent) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR_TAG:
            return event.value
        # libyaml's events carry its own Mark type; the node only keeps it for error messages,
        # which read the same line/column attributes from either kind.
        start, end = cast("yaml.Mark | None", event.start_mark), cast("yaml.Mark | None", event.end_mark)
        node = yaml.ScalarNode(tag, event.value, start, end, event.style)
        return self.scalars.construct_object(node)

    def value(self, path: PathKey) -> tuple[Any, int]:
        """The next value and how many values it holds (aliases count their full size)."""
        event = self.loader.get_event()
        line = event.start_mark.line + 1
        if len(path) > MAX_DEPTH:
            raise RuleError(self.lines.file, line, f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in self.anchors:
                raise RuleError(self.lines.file, line, f"unknown or recursive alias '*{event.anchor}'")
            value, size = self.anchors[event.anchor]
            self._spend(size, line)
            return value, size
        self._spend(1, line)
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.ScalarEvent):
            result: Any = self._scalar(event)
            size = 1
        elif isinstance(event, yaml.SequenceStartEvent):
            self.lines.lines.setdefault(path, line)
            result, size = [], 1
            while not self.loader.check_event(yaml.SequenceEndEvent):
                item, n = self.value((*path, len(result)))
                result.append(item)
                size += n
            self.loader.get_event()
        elif isinstance(event, yaml.MappingStartEvent):
            self.lines.lines.setdefault(path, line)
            result, size = {}, 1
            while not self.loader.check_event(yaml.MappingEndEvent):
                key_event = self.loader.peek_event()
                key_line = key_event.start_mark.line + 1
                if isinstance(key_event, yaml.ScalarEvent) and key_event.value == "<<" and key_event.implicit[0]:
                    raise RuleError(self.lines.file, key_line, "YAML merge keys ('<<') are not supported")
                key, _ = self.value((*path, "<key>"))
                if not isinstance(key, str):
                    raise RuleError(self.lines.file, key_line, f"mapping keys must be strings, got {key!r}")
                if key in result:
                    # Keep the first value and go on, so the file's other errors show too.
                    self.lines.problems.append(RuleError(
                        self.lines.file, key_line, f"duplicate key '{key}' (first at line "
                        f"{self.lines.lines.get((*path, key), 0)})",
                        "each key may appear once per mapping; merge the two entries"))
                    _, n = self.value((*path, "<duplicate>", key_line))
                    size += n
                    continue
                self.lines.lines[(*path, key)] = key_line
                result[key], n = self.value((*path, key))
                size += n
            self.loader.get_event()
        else:
            raise RuleError(self.lines.file, line, f"unexpected YAML event {event.__class__.__name__}")
        if anchor:
            self.anchors[anchor] = (result, size)
        return result, size

    def document(self) -> Any:
        self.loader.get_event()  # StreamStart
        if self.loader.check_event(yaml.StreamEndEvent):
            return None
        self.loader.get_event()  # DocumentStart
        value, _ = self.value(())
        self.loader.get_event()  # DocumentEnd
        if not self.loader.check_event(yaml.StreamEndEvent):
            event = self.loader.peek_event()
            raise RuleError(self.lines.file, event.start_mark.line + 1,
                            "more than one YAML document in the file", "use one document per rule file")
        return value


def load_yaml(path: Path) -> tuple[Any, LineMap]:
    """Parse one YAML file. Raises RuleError with the file and line of the first problem."""
    lines = LineMap(str(path))
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RuleError(path, 0, f"cannot read rule file: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RuleError(path, 0, f"rule file larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuleError(path, raw[: e.start].count(b"\n") + 1, "rule file is not valid UTF-8") from None
    loader = _Loader(text)
    try:
        return _Builder(loader, lines).document(), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        problem = str(e.problem or e.context)
        hint = ""
        near = text.splitlines()[max(line - 2, 0) : line]  # the reported line and the one before
        if "\\t" in problem or any("\t" in s for s in near):
            hint = "YAML does not allow tabs for indentation; indent with spaces"
        raise RuleError(path, line, f"invalid YAML: {problem}", hint) from None
    except yaml.YAMLError as e:
        raise RuleError(path, 0, f"invalid YAML: {e}") from None
    finally:
        loader.dispose()
