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
from typing import Any

import yaml

from .errors import RuleError

MAX_NODES = 2_000_000  # bounds alias expansion ("billion laughs")
MAX_DEPTH = 64  # rule files are shallow; deeper means a recursive alias or garbage
MAX_FILE_BYTES = 64 * 1024 * 1024

PathKey = tuple[str | int, ...]


@dataclass
class LineMap:
    """Line numbers (1-based) of values, by their path inside one document."""

    file: str
    lines: dict[PathKey, int] = field(default_factory=dict)

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


class _Composer:
    def __init__(self, lines: LineMap) -> None:
        self.lines = lines
        self.count = 0
        self.scalars = yaml.SafeLoader("")

    def convert(self, node: yaml.Node, path: PathKey) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.lines.error(path, f"document expands to more than {MAX_NODES} values (alias bomb?)")
        self.lines.lines.setdefault(path, node.start_mark.line + 1)
        if len(path) > MAX_DEPTH:
            raise RuleError(self.lines.file, node.start_mark.line + 1,
                            f"nesting deeper than {MAX_DEPTH} levels (recursive alias?)")
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise RuleError(self.lines.file, key_node.start_mark.line + 1, "YAML merge keys ('<<') are not supported")
                key = self.scalars.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    raise RuleError(self.lines.file, key_node.start_mark.line + 1, f"mapping keys must be strings, got {key!r}")
                if key in out:
                    raise RuleError(self.lines.file, key_node.start_mark.line + 1, f"duplicate key '{key}'",
                                    "each key may appear once per mapping; merge the two entries")
                self.lines.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.convert(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalars.construct_object(node)


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
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines
        return _Composer(lines).convert(node, ()), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise RuleError(path, line, f"invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RuleError(path, 0, f"invalid YAML: {e}") from None
    finally:
        loader.dispose()
