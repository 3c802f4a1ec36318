"""Wrapping one mitmproxy method, once.

Warden bounds a few of mitmproxy's own behaviours by wrapping the method (runtime/
http1_trailers.py, runtime/body_buffers.py). The chain is built once per `warden run`, but
`mitmdump -s` and tests build it again in one process: the wrap must not stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MARK = "warden_wrapped"


def wrap_once(cls: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace `cls.<name>` by `make(original)` unless an earlier call already did."""
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapper = make(original)
    setattr(wrapper, _MARK, True)
    setattr(cls, name, wrapper)
