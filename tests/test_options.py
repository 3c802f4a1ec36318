"""ScalarOptions (runtime/options.py): the same values and errors as mitmproxy's Options,
without deep copies of immutable values, and still with copies of mutable ones."""

from __future__ import annotations

import pytest
from egresswarden.runtime.options import ScalarOptions, use_scalar_reads
from mitmproxy import options
from mitmproxy.addons import proxyserver, tlsconfig


def _both() -> tuple[options.Options, options.Options]:
    plain, scalar = options.Options(), options.Options()
    use_scalar_reads(scalar)
    for opts in (plain, scalar):
        for addon in (proxyserver.Proxyserver(), tlsconfig.TlsConfig()):
            addon.load(opts)  # type: ignore[attr-defined]
    return plain, scalar


def test_every_option_reads_the_same_value_as_mitmproxys() -> None:
    plain, scalar = _both()
    assert isinstance(scalar, ScalarOptions)
    names = sorted(plain.keys())
    assert len(names) > 30
    for name in names:
        assert getattr(scalar, name) == getattr(plain, name), name
    scalar.update(body_size_limit="5m", listen_port=8123, ssl_insecure=True)
    assert (scalar.body_size_limit, scalar.listen_port, scalar.ssl_insecure) == ("5m", 8123, True)


def test_immutable_values_are_not_copied_and_mutable_ones_still_are() -> None:
    _, scalar = _both()
    scalar.update(body_size_limit="5m")
    assert scalar.body_size_limit is scalar.body_size_limit
    mode = scalar.mode
    mode.append("socks5")  # a caller mutating what it read must not change the option
    assert scalar.mode == ["regular"]
    assert scalar.mode is not scalar.mode


def test_unknown_option_is_an_attribute_error() -> None:
    _, scalar = _both()
    with pytest.raises(AttributeError, match="No such option: nope"):
        _ = scalar.nope  # type: ignore[attr-defined]
    assert not hasattr(scalar, "nope")


def test_only_mitmproxys_own_options_class_is_swapped() -> None:
    class Custom(options.Options):
        pass

    custom = Custom()
    use_scalar_reads(custom)
    assert type(custom) is Custom
