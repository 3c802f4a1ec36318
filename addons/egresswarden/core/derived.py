"""State derived from a RuleSet (the leak scanner's automaton, the MCP validators), built with it.

A RuleSet is immutable and swapped as one reference on reload; what is computed from it
must follow it. `derived(builder)` turns `builder(rules) -> T` into a lookup that builds T
once per RuleSet and keeps it as long as the rule set is among the few most recent.
`load_ruleset` builds every registered derivation right after compiling, in the loading
thread, so the first request after a reload never pays for it on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .ruleset import RuleSet

_KEEP = 4  # the current rule set plus a few that in-flight flows may still hold
_builders: list[Callable[[RuleSet], object]] = []


def derived[T](builder: Callable[[RuleSet], T]) -> Callable[[RuleSet], T]:
    """Memoise `builder` per RuleSet (by identity; the rule set is kept alive with its value)."""
    cache: dict[int, tuple[RuleSet, T]] = {}
    lock = threading.Lock()

    def lookup(rules: RuleSet) -> T:
        entry = cache.get(id(rules))
        if entry is not None and entry[0] is rules:
            return entry[1]
        with lock:
            entry = cache.get(id(rules))
            if entry is not None and entry[0] is rules:
                return entry[1]
            value = builder(rules)
            while len(cache) >= _KEEP:
                cache.pop(next(iter(cache)))
            cache[id(rules)] = (rules, value)
            return value

    lookup.__name__ = builder.__name__
    lookup.__doc__ = builder.__doc__
    _builders.append(lookup)
    return lookup


def build_all(rules: RuleSet) -> None:
    """Build every registered derivation of `rules` now (called by the loader, off the event loop)."""
    for lookup in _builders:
        lookup(rules)
