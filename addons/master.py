"""WardenMaster: mitmdump's master with the Warden chain placed where `-s` scripts would run.

Unlike `-s`, the addons are not loaded through the script loader, so nothing is ever
hot-reloaded from code (a failed script reload would remove the policy and let traffic
pass). The flow dumper is left out: the audit log is the record.
"""

from __future__ import annotations

from mitmproxy import addons, master, options
from mitmproxy.addons import errorcheck, script

from .chain import build_chain


class WardenMaster(master.Master):
    def __init__(self, opts: options.Options, loop=None) -> None:  # noqa: ANN001
        super().__init__(opts, event_loop=loop, with_termlog=True)
        defaults = addons.default_addons()
        at = next(i for i, a in enumerate(defaults) if isinstance(a, script.ScriptLoader)) + 1
        self.addons.add(*defaults[:at], *build_chain(), *defaults[at:])
        self.addons.add(errorcheck.ErrorCheck())
