"""Errors raised by the engine.

    WardenError
     +-- RuleError            one problem in a rule file, with file, line and a hint
     +-- RuleSetError         a rule set that failed to load: carries every RuleError found
     +-- SecretError          a `${secret:NAME}` that cannot be resolved (never carries the value)
     +-- SuffixListError      the Public Suffix List Warden checks rule hosts against looks incomplete

Messages never contain secret values or tokens: they are printed on stderr, written to
the audit log (reload failures) and sent to alert sinks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class WardenError(Exception):
    """Base class for Warden's own errors."""


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One problem in a rule file. `line` is 1-based; 0 when the file as a whole is at fault."""

    file: str
    line: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class RuleError(WardenError):
    """A single rule-file problem, raised while loading one file."""

    def __init__(self, file: str | Path, line: int, message: str, hint: str = "") -> None:
        self.problem = RuleProblem(str(file), line, message, hint)
        super().__init__(str(self.problem))


class RuleSetError(WardenError):
    """A rule set could not be loaded. `problems` lists every problem found, in file order."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} {noun} in the rule files:\n{lines}")


class SecretError(WardenError):
    """A secret reference could not be resolved. Names the secret, never holds its value."""


class SuffixListError(WardenError):
    """The bundled Public Suffix List is missing entries it must have (a truncated or foreign
    file): no rule set loads, since `*.co.uk` could pass as a registrable domain."""
