"""Option reads without a deep copy for immutable values.

mitmproxy's `OptManager.__getattr__` returns `copy.deepcopy` of the option's value (twice
for an unset option: once for the default, once for the current value), so a caller cannot
mutate a list option in place. The proxy core reads options on its hot path (every body
chunk reads `stream_large_bodies` and `body_size_limit`, every request reads TLS options):
in a 1 MiB keep-alive profile these copies were 3% of the event loop. A str, int, float,
bool, bytes or None cannot be mutated, so its copy is the value itself; everything else
(lists, dicts) is still deep-copied, so the guarantee mitmproxy gives its callers holds.
"""

from __future__ import annotations

import copy
from typing import Any

from mitmproxy import options, optmanager

_IMMUTABLE: frozenset[type] = frozenset({str, int, float, bool, bytes, type(None)})


class ScalarOptions(options.Options):
    """mitmproxy's Options with copy-free reads of immutable values (same values, same errors)."""

    def __getattr__(self, attr: str) -> Any:
        option = self.__dict__["_options"].get(attr)
        if option is None:
            raise AttributeError(f"No such option: {attr}")
        value = option._default if option.value is optmanager.unset else option.value
        if type(value) in _IMMUTABLE:
            return value
        return copy.deepcopy(value)


def use_scalar_reads(opts: options.Options) -> None:
    """Give an Options object created by mitmproxy's `main.run` the copy-free reads.

    `main.run` builds the Options itself and passes it to the master class, so the class is
    swapped on the instance: ScalarOptions adds no state, only the one method."""
    if type(opts) is options.Options:
        object.__setattr__(opts, "__class__", ScalarOptions)  # OptManager.__setattr__ takes only options
