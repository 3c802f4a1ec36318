from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from .harness import Origin, run_origin


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
