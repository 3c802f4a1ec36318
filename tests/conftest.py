from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from .harness import Origin, run_origin


@pytest.fixture(scope="session", autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Warden processes started by tests keep learned MCP pins in $XDG_STATE_HOME: never the user's."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(scope="session")
def origin_ca() -> trustme.CA:
    """The CA of the test origins (upstream of Warden)."""
    return trustme.CA()


@pytest.fixture(scope="session")
def origin_ca_file(origin_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("origin-ca") / "origin-ca.pem"
    origin_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def shared_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One interception CA for the session: generating a CA per test wastes seconds."""
    return tmp_path_factory.mktemp("warden-confdir")


@pytest.fixture
def tls_origin(origin_ca: trustme.CA) -> Iterator[Origin]:
    with run_origin(ca=origin_ca) as origin:
        yield origin


@pytest.fixture
def plain_origin() -> Iterator[Origin]:
    with run_origin() as origin:
        yield origin
