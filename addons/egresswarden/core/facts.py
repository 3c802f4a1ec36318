"""The input to `decide`: one frozen record, so that new fields never change the signature."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What is known about a connection or request when it is decided.

    `host` is as the client sent it (CONNECT authority or URL host); `decide` normalises it.
    `method` and `path` are None for a CONNECT-stage decision, set for every HTTP request.
    `path` is the raw request path (query included); `decide` canonicalises it.
    """

    agent: str
    host: str
    port: int
    scheme: str = "https"
    method: str | None = None
    path: str | None = None
